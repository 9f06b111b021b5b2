"""Speed and memory of `keras_ntk.empirical_ntk` against naive TF and neural-tangents.

Three parts:

* `--neural-tangents-python PY` (issue 18 §3): ours against neural-tangents 0.6.5 in
  its own venv, INTERLEAVED: one neural-tangents process stays alive
  (`neural_tangents_reference.py --serve`, JSON lines over stdin/stdout) and rounds of
  ours and theirs alternate (order flipped every round), so load affects both alike.
  Per case the median over `--rounds` (≥ 7) of the per-round ratio ours/theirs is
  printed with its range. Cases: MLP 64-512-512-1 ("mlp1"), MLP-10 traced and
  `trace_axes=()`, LeNet-8×8 (N=256 digits), ResNet-18 width 16 with BatchNorm in
  inference mode (32×32×3, N=64) and a 2-block transformer encoder (Embedding +
  MultiHeadAttention + LayerNorm + MLP, sequence 16, N=64), the last two written in Flax
  on the other side with our weights copied (the relative kernel difference is
  printed). neural-tangents' fastest implementation among those run is the
  reference: structured (3) for the stax models, structured and jacobian (1, 3) for
  ResNet-18, jacobian and NTK-vector products (1, 2) for the transformer (its
  structured rules have no gather rule for the embedding).
* `--naive`: seconds per implementation on the first four cases and the speed-up over
  the naive TensorFlow reference (`tf.GradientTape.jacobian` of the whole batch
  output, contracted with einsum) measured in the same run. Targets from issue 4:
  MLP-1 ≥ 70×, MLP-10 traced ≥ 233×, LeNet ≥ 21×.
* unless `--skip-memory`: in a fresh subprocess, the resident-memory high-water mark
  of the 1797×1797 LeNet kernel on all digits with `memory_budget=1GiB`, and its
  error against a float64 reference on a sub-block.

Run: `python benchmarks/ntk_speed.py --neural-tangents-python /work/ntvenv/bin/python
--skip-memory [--rounds 7] [--cases mlp1,lenet,...]`.
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

# This checkout's keras_ntk and experiments, not an installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras_ntk  # noqa: E402
from experiments import models as study_models  # noqa: E402
from keras_ntk import _block_factors, ntk as ntk_module  # noqa: E402
import floor_kernels  # noqa: E402  (beside this script)

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


ESTIMATE_CASES = {
    # case: (N, implementations measured)
    "mlp1": (256, ("structured", "jacobian")),
    "mlp10_traced": (256, ("structured", "jacobian")),
    "mlp10_full": (256, ("structured",)),
    "lenet": (1797, ("structured", "jacobian")),
    "resnet18": (64, ("jacobian", "structured")),
    "transformer": (64, ("jacobian", "structured")),
}


def estimate_case(case, n=None):
    """(model, x, trace_axes, baseline) of an estimate case: its N inputs (`n`, else the
    case's N; the case's data repeated up to N), the model built and called on one example, and the resident
    size (bytes) after that and a garbage collection: what a first call is measured above."""
    import gc

    model, x, trace_axes, _ = build_case(case)
    n = n or ESTIMATE_CASES[case][0]
    if len(x) < n:
        x = np.concatenate([x] * (-(-n // len(x))))[:n]
    x = x[:n]
    model(x[:1])
    gc.collect()
    return model, x, trace_axes, _status_bytes("VmRSS")


def estimate_child(case, implementation, block=None, n=None, vector=False):
    """Runs in a fresh process: the estimated peak of one call against the measured one.

    `block`: blocks of that many examples (`batch_size`, no budget limit); None: what
    the default memory budget picks. `vector`: `ntk_vector_product(model, x, None, v)`
    with one column of ones instead of `empirical_ntk(model, x)`.

    Baseline: the resident size once TensorFlow is imported and the model built (and
    called once on one example). Measured: the resident high-water mark (VmHWM) of the
    FIRST call above that baseline (tracing, XLA compilation, the block's working
    memory and the host result: everything the call adds), and of a warm call above
    the resident size before it (the mark reset by writing 5 to /proc/self/clear_refs;
    a lower bound, since memory the first call freed is reused without raising RSS).
    (CPU-only: tf.config.experimental.get_memory_info does not report CPU memory.)
    """
    import gc

    model, x, trace_axes, baseline = estimate_case(case, n)
    n = len(x)
    start = time.perf_counter()
    fixed = {} if block is None else dict(batch_size=block, memory_budget=2**40)
    if vector:
        kept = model.output_shape[1:] if trace_axes == () else model.output_shape[1:-1]
        v = np.ones((n, *kept), "float32")

        def call():
            return keras_ntk.ntk_vector_product(model, x, None, v, trace_axes=trace_axes,
                                                implementation=implementation, **fixed)
    else:
        def call():
            return keras_ntk.empirical_ntk(model, x, trace_axes=trace_axes,
                                           implementation=implementation, **fixed)
    kernel = call()
    first_seconds = time.perf_counter() - start
    first_peak = _status_bytes("VmHWM") - baseline
    setup = ntk_module.kernel_setup(model, x, None, trace_axes, (), implementation,
                                    block, fixed.get("memory_budget"), False, None,
                                    vector=vector)
    del kernel
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    kernel = call()
    seconds = time.perf_counter() - start
    warm_peak = _status_bytes("VmHWM") - before
    from keras_ntk._batching import padded_size
    from keras_ntk._costs import block_estimates
    p = padded_size(n, setup.block)
    _, block_peak = block_estimates(setup.implementation, setup.profile, setup.out_axes, n,
                                    p, p, not vector, setup.plan.dtype.size, vector,
                                    factors=block is None)
    result = kernel.nbytes
    # Whether the first call also compiled the block-factor functions (default path, N >= 128).
    factors = any(isinstance(b, int) for b in _block_factors._sizes_compiled(setup))
    print(json.dumps(dict(case=case, vector=vector, implementation=setup.implementation, n=n,
                          factors=factors,
                          block=setup.block, measured=first_peak, measured_warm=warm_peak,
                          estimated=block_peak + result, result=result,
                          first_seconds=first_seconds, seconds=seconds,
                          activations=setup.profile.activations,
                          n_params=setup.profile.n_params)))


def memory_estimates(cases, blocks=None, sizes=None, vector=False):
    """Estimated / measured peak per case and implementation, each in a fresh process.

    `blocks`: {case: [block sizes]} to measure fixed blocks instead of the default budget's;
    `sizes`: {case: [N]} to measure other N than the case's; `vector`: of
    `ntk_vector_product` (one column) instead of `empirical_ntk`.
    """
    print(f"{'case':12s} {'impl':10s} {'N':>5s} {'block':>5s} {'measured':>10s} "
          f"{'warm':>10s} {'estimated':>10s} {'est/meas':>8s} factors", flush=True)
    rows = []
    for case in cases:
        for impl, block, n in [(i, b, n) for i in ESTIMATE_CASES[case][1]
                               for b in (blocks or {}).get(case, [None])
                               for n in (sizes or {}).get(case, [None])]:
            extra = [] if block is None else ["--estimate-block", str(block)]
            extra += [] if n is None else ["--estimate-n", str(n)]
            extra += ["--estimate-vector"] if vector else []
            out = subprocess.run([sys.executable, __file__, "--estimate-child", case, impl,
                                  *extra], capture_output=True, text=True, check=False,
                                 cwd=ROOT)
            if out.returncode != 0:
                print(f"{case:12s} {impl:10s} failed: {out.stderr.strip()[-500:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{case:12s} {r['implementation']:10s} {r['n']:5d} {r['block']:5d} "
                  f"{r['measured'] / 2**20:8.1f} MiB {r['measured_warm'] / 2**20:6.1f} MiB "
                  f"{r['estimated'] / 2**20:8.1f} MiB "
                  f"{r['estimated'] / max(r['measured'], 1):8.2f} "
                  f"{'yes' if r['factors'] else 'no'}", flush=True)
    return rows


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
                         text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"lenet 1797x1797 memory_budget=1GiB ({result['implementation']}, blocks of "
          f"{result['block']}): {result['seconds']:.2f} s, RSS high-water "
          f"mark +{result['peak_delta'] / 2**20:.0f} MiB over the {result['rss_before'] / 2**20:.0f}"
          f" MiB before (budget 1024 MiB); rel error of the [:128,:128] block vs float64 "
          f"jacobian {result['rel_error_vs_jacobian_float64']:.1e}")
    return result


# ------------------------------------------------------------------ against neural-tangents

CASES = ("mlp1", "mlp10_traced", "mlp10_full", "lenet", "resnet18", "transformer")
NT_IMPLS = {"resnet18": [3, 1], "transformer": [1, 2]}  # others: [3] (structured)
TRANSFORMER = dict(vocab=64, dim=32, heads=2, key_dim=16, hidden=64)


def transformer(vocab, dim, heads, key_dim, hidden, sequence=16):
    """2 encoder blocks (post-LN): Embedding, MultiHeadAttention, LayerNorm, GeLU MLP."""
    tokens = keras.Input((sequence,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim, name="embedding")(tokens)
    for i in range(2):
        y = keras.layers.MultiHeadAttention(heads, key_dim, name=f"mha{i}")(x, x)
        x = keras.layers.LayerNormalization(epsilon=1e-3, name=f"ln{i}a")(
            keras.layers.Add()([x, y]))
        y = keras.layers.Dense(hidden, activation=study_models.gelu_tanh, name=f"ff{i}a")(x)
        y = keras.layers.Dense(dim, name=f"ff{i}b")(y)
        x = keras.layers.LayerNormalization(epsilon=1e-3, name=f"ln{i}b")(
            keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(1, name="logits")(x))


_FLAX_NAMES = {"gamma": "scale", "beta": "bias", "embeddings": "embedding",
               "attention_output": "out", "moving_mean": "mean", "moving_variance": "var"}


def flax_weights(model, case):
    """{"params/<flax module path>/<name>": array}: the Keras weights named as in Flax."""
    out = {}
    for v in model.weights:
        parts = v.path.split("/")
        layer = parts[0]
        prefix = []
        if case == "resnet18" and layer.startswith("stage"):
            prefix = ["_".join(layer.split("_")[:2])]  # stageS_blockB
        digits_in_name = [c for c in layer if c.isdigit()]
        if case == "transformer" and digits_in_name:
            prefix = [f"block{digits_in_name[0]}"]  # mha0, ln0a, ff0b: in block0
        collection = "batch_stats" if parts[-1].startswith("moving_") else "params"
        names = [_FLAX_NAMES.get(p, p) for p in parts[1:]]
        out["/".join([collection, *prefix, layer, *names])] = np.asarray(v)
    return out


def build_case(name, seed=0):
    """(model, x, trace_axes, npz data for the Flax side or None)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if name in ("mlp1", "mlp10_traced", "mlp10_full", "lenet"):
        model = lenet() if name == "lenet" else mlp(1 if name == "mlp1" else 10)
        x = digits(256, image=name == "lenet")
        return model, x, () if name == "mlp10_full" else (-1,), None
    if name == "resnet18":
        model = study_models.resnet18((32, 32, 3), 1, width=16)
        x = rng.normal(size=(64, 32, 32, 3)).astype("float32")
        # Non-trivial inference-mode statistics and scales (fresh ones are 0, 1).
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                c = layer.gamma.shape[0]
                layer.moving_mean.assign(rng.normal(0, 0.1, c))
                layer.moving_variance.assign(rng.uniform(0.5, 1.5, c))
                layer.gamma.assign(rng.uniform(0.5, 1.5, c))
                layer.beta.assign(rng.normal(0, 0.1, c))
        meta = {"width": 16}
    else:
        model = transformer(**TRANSFORMER)
        x = rng.integers(0, TRANSFORMER["vocab"], size=(64, 16)).astype("int32")
        meta = dict(TRANSFORMER)
    model(x[:1])
    data = dict(flax_weights(model, name), x=x, meta=json.dumps(meta))
    return model, x, (-1,), data


class NeuralTangents:
    """The neural-tangents process, kept alive; one JSON line per request and reply."""

    def __init__(self, python):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "neural_tangents_reference.py")
        self.proc = subprocess.Popen([python, script, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.device = self._read()["device"]

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the neural-tangents process ended")
        return json.loads(line)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.ask(op="quit")
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        self.proc.wait(timeout=60)


def compare_with_neural_tangents(python, cases, rounds, tmp):
    """Interleaved rounds of ours and theirs; prints and returns per-case ratios."""
    nt_proc = NeuralTangents(python)
    print(f"neural-tangents: {nt_proc.device}", flush=True)
    rows = []
    try:
        for name in cases:
            model, x, trace_axes, data = build_case(name)
            path = None
            if data is not None:
                path = os.path.join(tmp, f"{name}.npz")
                np.savez(path, **data)
            impls = NT_IMPLS.get(name, [3])
            setup = nt_proc.ask(op="setup", case=name, impls=impls, data=path)
            if "error" in setup:
                print(f"{name}: neural-tangents setup failed: {setup['error']}", flush=True)
                continue
            ours = lambda: keras_ntk.empirical_ntk(  # noqa: E731
                model, x, trace_axes=trace_axes)
            start = time.perf_counter()
            kernel = ours()
            first = time.perf_counter() - start
            impl_name = ntk_module.kernel_setup(
                model, x, None, trace_axes, (), "auto", None, None, False, None).implementation
            if data is not None:
                for impl in impls:
                    out = os.path.join(tmp, f"{name}_{impl}.npy")
                    nt_proc.ask(op="kernel", case=name, impl=impl, out=out)
                    theirs = np.load(out).reshape(kernel.shape)
                    diff = np.linalg.norm(kernel - theirs) / np.linalg.norm(theirs)
                    print(f"{name}: |ours - NT impl {impl}| / |NT| = {diff:.1e}", flush=True)
            floor = floor_kernels.floor_function(name, model, x)
            if floor is not None:
                print(f"{name}: |ours - floor| / |floor| = "
                      f"{floor_kernels.check(name, model, x, kernel):.1e}", flush=True)
            # Their fastest implementation (one warm call each), then rounds.
            warm = {i: min(nt_proc.ask(op="time", case=name, impl=i, repeats=2)["seconds"])
                    for i in impls}
            best = min(warm, key=warm.get)
            t_ours = min(timed(ours, 1))
            calls = int(max(1, min(5, 1.0 / max(t_ours, warm[best]))))
            ratios, ours_s, theirs_s, floor_s, floor_ratios = [], [], [], [], []
            sides = ("ours", "theirs") + (("floor",) if floor is not None else ())
            for r in range(rounds):
                pair = {}
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    if side != "theirs":
                        fn = ours if side == "ours" else floor
                        times = []
                        for _ in range(calls):
                            start = time.perf_counter()
                            fn()
                            times.append(time.perf_counter() - start)
                    else:
                        times = nt_proc.ask(op="time", case=name, impl=best,
                                            repeats=calls)["seconds"]
                    pair[side] = float(np.median(times))
                ours_s.append(pair["ours"])
                theirs_s.append(pair["theirs"])
                ratios.append(pair["ours"] / pair["theirs"])
                if floor is not None:
                    floor_s.append(pair["floor"])
                    floor_ratios.append(pair["floor"] / pair["theirs"])
            row = dict(case=name, ours_impl=impl_name, nt_impl=best, rounds=rounds,
                       calls=calls, ours_first_call=first, nt_compile=setup["compile_seconds"],
                       ours_median=float(np.median(ours_s)),
                       nt_median=float(np.median(theirs_s)),
                       ratio_median=float(np.median(ratios)), ratio_min=min(ratios),
                       ratio_max=max(ratios), load=os.getloadavg()[0])
            if floor is not None:
                row.update(floor_median=float(np.median(floor_s)),
                           floor_ratio_median=float(np.median(floor_ratios)),
                           floor_ratio_min=min(floor_ratios), floor_ratio_max=max(floor_ratios))
            rows.append(row)
            print(f"{name:13s} ours ({impl_name}) {row['ours_median'] * 1e3:8.1f} ms  NT (impl "
                  f"{best}) {row['nt_median'] * 1e3:8.1f} ms  ours/NT median "
                  f"{row['ratio_median']:.2f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}] "
                  f"over {rounds} rounds of {calls} calls (ours first call {first:.1f} s; "
                  f"load {row['load']:.1f})", flush=True)
            if floor is not None:
                print(f"{'':13s} floor (hand-written TF+XLA kernel) {row['floor_median'] * 1e3:.1f} ms: "
                      f"floor/NT median {row['floor_ratio_median']:.2f} "
                      f"[{row['floor_ratio_min']:.2f}, {row['floor_ratio_max']:.2f}], ours/floor "
                      f"{row['ours_median'] / row['floor_median']:.2f}", flush=True)
    finally:
        nt_proc.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip slow ntvp")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--estimate-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--memory-estimates", action="store_true",
                        help="estimated vs measured peak memory of one call per case")
    parser.add_argument("--estimate-block", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--estimate-n", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--estimate-vector", action="store_true",
                        help="with --memory-estimates: of ntk_vector_product (one column of "
                             "ones) instead of empirical_ntk")
    parser.add_argument("--estimate-sizes", default=None,
                        help="with --memory-estimates: N per case instead of the case's, "
                             "e.g. resnet18=128:256,transformer=512")
    parser.add_argument("--estimate-blocks", default=None,
                        help="with --memory-estimates: fixed blocks per case instead of the "
                             "default budget's, e.g. 'resnet18=64:32,lenet=2048'")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--naive", action="store_true",
                        help="time every implementation against the naive TF reference")
    parser.add_argument("--naive-jit", action="store_true",
                        help="compile the naive reference with XLA too (a stronger baseline)")
    parser.add_argument("--neural-tangents-python", default=None,
                        help="python of a separate venv with neural-tangents 0.6.5 (see "
                             "benchmarks/neural_tangents_reference.py): interleaved ours / theirs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json-out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.memory_child:
        memory_child()
        return
    if args.estimate_child:
        estimate_child(*args.estimate_child, block=args.estimate_block, n=args.estimate_n,
                       vector=args.estimate_vector)
        return
    print(f"device: {device_name()}; TensorFlow {tf.__version__}, Keras {keras.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    keras.utils.set_random_seed(0)
    out = {}
    if args.naive:
        print(f"naive reference: tf.function{' with XLA' if args.naive_jit else ''}", flush=True)
        out["naive"] = speed(args.quick, args.naive_jit)
    if args.neural_tangents_python:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out["neural_tangents"] = compare_with_neural_tangents(
                args.neural_tangents_python, args.cases.split(","), args.rounds, tmp)
    if args.memory_estimates:
        def per_case(option):
            values = {}
            for item in (option or "").split(","):
                if item:
                    case, numbers = item.split("=")
                    values[case] = [int(b) for b in numbers.split(":")]
            return values

        out["memory_estimates"] = memory_estimates(
            [c for c in args.cases.split(",") if c in ESTIMATE_CASES],
            per_case(args.estimate_blocks), per_case(args.estimate_sizes), args.estimate_vector)
    if not args.skip_memory:
        out["memory"] = memory()
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
