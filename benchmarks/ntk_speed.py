"""Speed and memory of `keras_ntk.empirical_ntk` against the naive TF Jacobian.

For N=256 digits inputs (x2=None) and four models, prints the seconds per
implementation (median of warm calls; the first, compiling call separately)
and the speed-up over the naive TensorFlow reference measured in the same run:
`tf.GradientTape.jacobian` of the whole batch output with respect to every
trainable weight, contracted with einsum. Then, in a fresh subprocess, the
resident-memory high-water mark of the 1797×1797 LeNet kernel on all digits
with `memory_budget=1GiB`, and its error against a float64 reference on a
sub-block.

Run: `python benchmarks/ntk_speed.py [--quick]`. Targets from issue 4 (speed-up
of neural-tangents' best implementation over naive TF, same machine class):
MLP-1 ≥ 70×, MLP-10 traced ≥ 233×, LeNet ≥ 21×.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_ntk  # noqa: E402
from keras_ntk import ntk as ntk_module  # noqa: E402

TARGETS = {"mlp1": 70.0, "mlp10_traced": 233.0, "lenet": 21.0}


def digits(n=None, image=False):
    x = load_digits().data.astype("float32") / 16.0
    if n is not None:
        x = x[:n]
    return x.reshape(-1, 8, 8, 1) if image else x


def mlp(outputs):
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(outputs),
    ])


def lenet():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(120, activation="relu"),
        keras.layers.Dense(84, activation="relu"),
        keras.layers.Dense(1),
    ])


def naive_ntk_function(model, trace_axes, jit=False):
    """The naive reference, compiled: whole-batch Jacobian, then einsum over weights."""

    @tf.function(jit_compile=jit)
    def naive(x):
        with tf.GradientTape() as tape:
            y = model(x, training=False)
        jac = tape.jacobian(y, model.trainable_weights)
        n, o = y.shape
        flat = tf.concat([tf.reshape(j, [n, o, -1]) for j in jac], -1)
        if trace_axes == ():
            return tf.einsum("nap,mbp->nmab", flat, flat)
        return tf.einsum("nap,map->nm", flat, flat) / o

    return lambda x: naive(tf.constant(x)).numpy()


def device_name():
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                   for g in gpus]
        return "GPU: " + ", ".join(details)
    return f"CPU: {os.cpu_count()} logical cores"


def timed(fn, repeats):
    """(seconds of the first call, median seconds of `repeats` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if repeats == 0:
        return first, first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def speed(quick, naive_jit=False):
    """Seconds per implementation and speed-up over the naive reference."""
    repeats = 3 if quick else 10
    x = digits(256)
    mlp10 = mlp(10)
    cases = [
        ("mlp1", mlp(1), x, (-1,)),
        ("mlp10_traced", mlp10, x, (-1,)),
        ("mlp10_full", mlp10, x, ()),
        ("lenet", lenet(), digits(256, image=True), (-1,)),
    ]
    implementations = {
        # jacobian on MLP-10 holds 256x10x300k floats; ntvp needs N*S VJP/JVP pairs.
        "mlp1": ("structured", "jacobian", "ntvp", "auto"),
        "mlp10_traced": ("structured", "auto"),
        "mlp10_full": ("structured", "auto"),
        "lenet": ("structured", "jacobian", "ntvp", "auto"),
    }
    rows = []
    naive_seconds = {}
    for name, model, inputs, trace_axes in cases:
        naive = naive_ntk_function(model, trace_axes, naive_jit)
        if name == "mlp10_full":
            # The naive full kernel is the same Jacobian as the traced one plus a
            # 100x larger contraction (2e12 FLOPs): its time is at least the traced
            # naive time, which is used (the speed-up printed is a lower bound).
            # Errors are checked on the first 32 examples.
            naive_s = naive_seconds["mlp10_traced"]
            check = 32
            reference = naive(inputs[:check])
        else:
            # --quick: one call, its tracing (about a second) included; else a
            # second, warm call is timed.
            for _ in range(1 if quick else 2):
                start = time.perf_counter()
                reference = naive(inputs)
                naive_s = time.perf_counter() - start
            check = len(inputs)
        naive_seconds[name] = naive_s
        for impl in implementations[name]:
            if impl == "ntvp" and quick:
                continue
            run = lambda: keras_ntk.empirical_ntk(  # noqa: E731
                model, inputs, trace_axes=trace_axes, implementation=impl)
            first, seconds = timed(run, repeats if impl != "ntvp" else 1)
            kernel = run()[:check, :check]
            err = float(np.linalg.norm(kernel - reference) / np.linalg.norm(reference))
            rows.append(dict(case=name, implementation=impl, seconds=seconds,
                             first_call_seconds=first, naive_seconds=naive_s,
                             speedup=naive_s / seconds, rel_error=err))
            target = TARGETS.get(name)
            print(f"{name:13s} {impl:10s} {seconds * 1e3:9.1f} ms  (first call "
                  f"{first:6.2f} s)  naive {naive_s * 1e3:9.1f} ms  speed-up "
                  f"{'>=' if name == 'mlp10_full' else '  '}{naive_s / seconds:7.1f}x" + (f" (target >= {target:.0f}x)" if target
                                                  and impl == "auto" else "")
                  + f"  rel err vs naive {err:.1e}", flush=True)
    return rows


def memory_child():
    """Runs in a fresh process: RSS high-water mark of the 1797x1797 LeNet kernel."""
    keras.utils.set_random_seed(0)
    model = lenet()
    x = digits(image=True)
    model(x[:1])
    setup = ntk_module.kernel_setup(model, x, None, (-1,), (), "auto", None, 2**30, False, None)
    before = _status_bytes("VmHWM")
    current = _status_bytes("VmRSS")
    start = time.perf_counter()
    kernel = keras_ntk.empirical_ntk(model, x, memory_budget=2**30)
    seconds = time.perf_counter() - start
    after = _status_bytes("VmHWM")
    # Exactness: a sub-block against the float64 per-example-Jacobian kernel.
    reference_n = 128
    sub = keras_ntk.empirical_ntk(model, x[:reference_n], implementation="jacobian",
                                  dtype="float64")
    err = float(np.linalg.norm(kernel[:reference_n, :reference_n] - sub) / np.linalg.norm(sub))
    print(json.dumps(dict(shape=list(kernel.shape), seconds=seconds,
                          implementation=setup.implementation, block=setup.block,
                          rss_before=current, peak_before=before, peak_after=after,
                          peak_delta=after - current,
                          rel_error_vs_jacobian_float64=err)))


def _status_bytes(field):
    """VmRSS (current) or VmHWM (high-water mark) of this process, in bytes.

    VmHWM rather than `resource.getrusage(...).ru_maxrss`: on Linux ru_maxrss
    survives execve, so a child started by a large parent would report the
    parent's peak; VmHWM belongs to the fresh address space.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory():
    out = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"lenet 1797x1797 memory_budget=1GiB ({result['implementation']}, blocks of "
          f"{result['block']}): {result['seconds']:.2f} s, RSS high-water "
          f"mark +{result['peak_delta'] / 2**20:.0f} MiB over the {result['rss_before'] / 2**20:.0f}"
          f" MiB before (budget 1024 MiB); rel error of the [:128,:128] block vs float64 "
          f"jacobian {result['rel_error_vs_jacobian_float64']:.1e}")
    return result


def compare_with_neural_tangents(rows, python, quick):
    """Runs neural-tangents on the same cases (its own venv) and prints the ratios."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "neural_tangents_reference.py")
    completed = subprocess.run([python, script] + (["--quick"] if quick else []),
                               capture_output=True, text=True, check=True)
    theirs = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"neural-tangents: {theirs.pop('device')}")
    print(f"{'case':13s} {'ours (auto)':>12s} {'nt best':>10s} {'nt impl':>11s} "
          f"{'ours/nt':>8s}")
    for row in rows:
        if row["implementation"] != "auto":
            continue
        best_impl, best = min(theirs[row["case"]].items(), key=lambda item: item[1])
        print(f"{row['case']:13s} {row['seconds'] * 1e3:9.1f} ms {best * 1e3:7.1f} ms "
              f"{best_impl:>11s} {row['seconds'] / best:8.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip slow ntvp")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--naive-jit", action="store_true",
                        help="compile the naive reference with XLA too (a stronger baseline)")
    parser.add_argument("--neural-tangents-python", default=None,
                        help="python of a separate venv with neural-tangents 0.6.5 (see "
                             "benchmarks/neural_tangents_reference.py): prints ours / theirs")
    args = parser.parse_args()
    if args.memory_child:
        memory_child()
        return
    print(f"device: {device_name()}; TensorFlow {tf.__version__}, Keras {keras.__version__}",
          flush=True)
    keras.utils.set_random_seed(0)
    print(f"naive reference: tf.function{' with XLA' if args.naive_jit else ''}", flush=True)
    rows = speed(args.quick, args.naive_jit)
    if args.neural_tangents_python:
        compare_with_neural_tangents(rows, args.neural_tangents_python, args.quick)
    if not args.skip_memory:
        memory()


if __name__ == "__main__":
    main()
