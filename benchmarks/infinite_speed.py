"""Time and peak memory of keras_ntk.infinite_kernels on sklearn digits (8×8).

Cases (N = 1797 images by default, kernels N × N, float64):
  * fcn10:       depth-10 ReLU FCN on the 64 flattened pixels;
  * cnn2_gap:    two 3×3 'same' conv + ReLU layers, global average pooling, dense
                 (the expensive case: 64×64 position pairs per pair of images);
  * cnn2_flatten: the same convolutions with a Flatten head (only the 64
                 diagonal positions are needed), for the ratio GAP / Flatten;
  * resnet_cnn:  a residual CNN: a conv stem, two WideResNet-style blocks
                 (ReLU-conv-ReLU-conv plus the identity, Keras Add), GAP, dense.

`--nt PYTHON` also times neural-tangents (stax, parameterization "ntk", nt.batch with batch
100, float64 via jax_enable_x64) on the same architectures and inputs in the same run,
interleaved with ours case by case (each in a fresh process of that interpreter), and prints
the ratio and the largest relative difference of the NTKs.
Each case runs in its own subprocess so that its peak memory (VmHWM: ru_maxrss
can carry the parent's peak over fork/exec) is its own. Two times: the cold call
(the first full call: tracing the recursion and, on the XLA path, compiling the
full-size block) and the warm call (the same call again). For neural-tangents the
cold time is its call on the first 100 inputs, which compiles the 100 × 100 blocks
of the full call; its warm time is the full call. `--baseline FILE` also times an older copy of
keras_ntk/infinite.py (e.g. `git show 31c67be:keras_ntk/infinite.py >
/tmp/infinite_before.py`), or the keras_ntk of another checkout when FILE is a directory
(e.g. `git worktree add --detach /tmp/before <commit>`), on the same cases in the same run,
alternating, and prints the ratio and the largest relative difference of the kernels.
The keras_ntk timed as "current" is the one of the checkout holding this script (not an
installed copy). Usage:

    python benchmarks/infinite_speed.py [--n 1797] [--cases fcn10,cnn2_gap,cnn2_flatten]
        [--baseline /tmp/infinite_before.py] [--nt /work/ntvenv/bin/python]
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    # This checkout's keras_ntk, not the one an editable install points to.
    sys.path.insert(0, _ROOT)


def _model(case):
    import keras

    import keras_ntk

    w, b = 2.0 ** 0.5, 0.05 ** 0.5
    if case == "fcn10":
        layers = [keras.Input((64,))]
        layers += [keras_ntk.NTKDense(512, w, b, activation="relu") for _ in range(10)]
        layers.append(keras_ntk.NTKDense(1, w, b))
        return keras.Sequential(layers)
    if case == "resnet_cnn":
        inputs = keras.Input((8, 8, 1))
        h = keras_ntk.NTKConv2D(64, 3, weight_std=w, bias_std=b)(inputs)
        for _ in range(2):
            a = keras_ntk.NTKConv2D(64, 3, weight_std=w, bias_std=b)(keras.layers.ReLU()(h))
            a = keras_ntk.NTKConv2D(64, 3, weight_std=w, bias_std=b)(keras.layers.ReLU()(a))
            h = keras.layers.Add()([a, h])
        h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))
        return keras.Model(inputs, keras_ntk.NTKDense(1, w, b)(h))
    head = (keras.layers.GlobalAveragePooling2D() if case == "cnn2_gap"
            else keras.layers.Flatten())
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras_ntk.NTKConv2D(64, 3, weight_std=w, bias_std=b), keras.layers.ReLU(),
        keras_ntk.NTKConv2D(64, 3, weight_std=w, bias_std=b), keras.layers.ReLU(),
        head, keras_ntk.NTKDense(1, w, b),
    ])


def _nt_kernel_fn(case):
    """The same architecture in neural-tangents' stax (runs in the NT interpreter)."""
    from neural_tangents import stax

    w, b = 2.0 ** 0.5, 0.05 ** 0.5
    if case == "fcn10":
        layers = []
        for _ in range(10):
            layers += [stax.Dense(512, w, b), stax.Relu()]
        return stax.serial(*layers, stax.Dense(1, w, b))[2]
    conv = lambda: stax.Conv(64, (3, 3), padding="SAME", W_std=w, b_std=b)
    if case == "resnet_cnn":
        block = stax.serial(stax.FanOut(2), stax.parallel(
            stax.serial(stax.Relu(), conv(), stax.Relu(), conv()), stax.Identity()),
            stax.FanInSum())
        return stax.serial(conv(), block, block, stax.Relu(), stax.GlobalAvgPool(),
                           stax.Dense(1, w, b))[2]
    head = stax.GlobalAvgPool() if case == "cnn2_gap" else stax.Flatten()
    return stax.serial(conv(), stax.Relu(), conv(), stax.Relu(), head,
                       stax.Dense(1, w, b))[2]


def _run_nt_case(case, n, save):
    import jax

    jax.config.update("jax_enable_x64", True)
    import neural_tangents as nt
    import numpy as np
    from sklearn.datasets import load_digits

    x = load_digits().data[:n].astype(np.float64) / 16.0
    if case != "fcn10":
        x = x.reshape(-1, 8, 8, 1)
    kernel_fn = nt.batch(_nt_kernel_fn(case), batch_size=100, store_on_device=False)
    start = time.perf_counter()
    kernel_fn(x[:100], None, "ntk")  # Compiles the 100 × 100 blocks the full call uses.
    cold = time.perf_counter() - start
    start = time.perf_counter()
    ntk = np.asarray(kernel_fn(x, None, "ntk"))
    seconds = time.perf_counter() - start
    if save:
        np.save(save, ntk)
    print(json.dumps({"case": case, "n": n, "seconds": seconds, "cold_seconds": cold,
                      "peak_rss_mib": _peak_mib(),
                      "ntk_trace": float(np.trace(ntk)), "finite": bool(np.isfinite(ntk).all())}))


def _peak_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_case(case, n, implementation, save):
    """Runs in a child process: prints one JSON line, saves the NTK to `save`."""
    import numpy as np
    from sklearn.datasets import load_digits

    if implementation and os.path.isdir(implementation):
        sys.path.insert(0, os.path.abspath(implementation))  # Another checkout's keras_ntk.
        from keras_ntk import infinite_kernels
    elif implementation:
        import importlib.util

        spec = importlib.util.spec_from_file_location("infinite_baseline", implementation)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        infinite_kernels = module.infinite_kernels
    else:
        from keras_ntk import infinite_kernels

    x = load_digits().data[:n].astype(np.float64) / 16.0
    if case != "fcn10":
        x = x.reshape(-1, 8, 8, 1)
    model = _model(case)
    start = time.perf_counter()
    infinite_kernels(model, x)  # Cold: includes tracing (and XLA compiling) the full blocks.
    cold = time.perf_counter() - start
    start = time.perf_counter()
    kernels = infinite_kernels(model, x)
    seconds = time.perf_counter() - start
    if save:
        np.save(save, kernels.ntk)
    print(json.dumps({"case": case, "n": n, "seconds": seconds, "cold_seconds": cold,
                      "peak_rss_mib": _peak_mib(),
                      "ntk_trace": float(np.trace(kernels.ntk)),
                      "finite": bool(np.isfinite(kernels.ntk).all())}))


def _device():
    import tensorflow as tf

    devices = [d.device_type + ":" + d.name for d in tf.config.list_logical_devices()]
    gpus = tf.config.list_physical_devices("GPU")
    details = [tf.config.experimental.get_device_details(g).get("device_name", "GPU")
               for g in gpus]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
            f"TF devices {devices}, GPUs {details or 'none'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1797)
    parser.add_argument("--cases", default="fcn10,cnn2_gap,cnn2_flatten,resnet_cnn")
    parser.add_argument("--baseline", default=None,
                        help="an older copy of keras_ntk/infinite.py, or a checkout "
                             "(directory) whose keras_ntk to time in the same run")
    parser.add_argument("--nt", default=None,
                        help="a Python interpreter with neural-tangents, timed in the same run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nt-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="", help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.nt_child:
        _run_nt_case(args.child, args.n, args.save)
        return
    if args.child:
        _run_case(args.child, args.n, args.implementation, args.save)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print("device:", _device())
    import tempfile

    import numpy as np

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for case in args.cases.split(","):
            runs = [("current", "")] + ([("baseline", args.baseline)] if args.baseline else [])
            runs += [("nt", "")] if args.nt else []
            for label, implementation in runs:
                save = os.path.join(scratch, f"{case}_{label}.npy")
                python = args.nt if label == "nt" else sys.executable
                out = subprocess.run(
                    [python, __file__, "--child", case, "--n", str(args.n),
                     "--implementation", implementation, "--save", save]
                    + (["--nt-child"] if label == "nt" else []),
                    capture_output=True, text=True, check=True,
                    env={**os.environ, "JAX_PLATFORMS": "cpu"})
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results[case, label] = result
                print(f"{case:13s} {label:8s} N={result['n']}: {result['seconds']:8.2f} s "
                      f"(cold call {result.get('cold_seconds', float('nan')):.2f} s), "
                      f"peak {result['peak_rss_mib']:7.0f} MiB, finite={result['finite']}",
                      flush=True)
            for other in (["baseline"] if args.baseline else []) + (["nt"] if args.nt else []):
                new = np.load(os.path.join(scratch, f"{case}_current.npy"))
                old = np.load(os.path.join(scratch, f"{case}_{other}.npy"))
                difference = np.abs(new - old).max() / np.abs(old).max()
                ratio = results[case, "current"]["seconds"] / results[case, other]["seconds"]
                print(f"{case:13s} current / {other} time: {ratio:.3f}; "
                      f"max |ΔΘ| / max |Θ| = {difference:.1e}", flush=True)
    if ("cnn2_gap", "current") in results and ("cnn2_flatten", "current") in results:
        ratio = results["cnn2_gap", "current"]["seconds"] / results[
            "cnn2_flatten", "current"]["seconds"]
        print(f"ratio cnn2_gap / cnn2_flatten time: {ratio:.1f}")


if __name__ == "__main__":
    main()
