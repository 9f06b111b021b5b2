"""Memory held per model: models still alive after gc, and RSS growth per model.

Builds many fresh models of ONE architecture (an MLP 8-16-1) and runs each
through a library path, dropping every reference to it afterwards:

* `empirical_ntk`: Θ(x, x) on 16 examples;
* `empirical_ntk_mirrored`: the same, model built and kernel computed under a
  `MirroredStrategy` over two logical CPUs;
* `linearize_fit`: `Linearize(model)` inside a functional model (a trainable
  Dense before it) and 2 epochs of `fit`;
* `tracker_fit`: 2 epochs of `fit` with an `NTKTracker` (probe of 16);

and, as plain-TensorFlow references of what TensorFlow/Keras keep by
themselves per model (no keras_ntk code involved):

* `plain_fit`: 2 epochs of `fit` of the fresh model;
* `plain_nested_fit`: `linearize_fit`'s functional model with the network
  called as a layer instead of `Linearize(net)`;
* `plain_custom_gradient_fit`: the same with a layer computing y = x with a
  `tf.custom_gradient` (graph mode registers every gradient function in
  TensorFlow's global gradient registry, never cleared; `Linearize`'s
  δ-gradient is one);
* `plain_gradient`: one `tf.function` computing the model's weight gradients;

and plain-TensorFlow reproductions of `linearize_fit`'s step (no Keras, no
keras_ntk: fresh `tf.Variable`s and a fresh `tf.function` train step per model,
4 steps of SGD, the network Dense(8) → Dense(16, relu) → Dense(1) in raw ops):

* `plain_tf_step`: the plain step (GradientTape, SGD by `assign_sub`);
* `plain_tf_forward_step`: `Linearize`'s order-1 step: f(x; θ0) + J·δ with
  `tf.autodiff.ForwardAccumulator` inside the GradientTape (XLA off), or, with
  XLA on, as `Linearize` does it there: a `tf.custom_gradient` whose
  δ-gradient is one VJP at θ0;
* `plain_tf_forward_step_shared`: the same step, but ONE `tf.function` for all
  models, the variables passed as arguments.

Both `plain_tf_*` steps pass their gradients through one `tf.custom_gradient`
identity, as Keras' optimizer does (`ReplicaContextBase.all_reduce`): graph
mode registers it in TensorFlow's global gradient registry, which then keeps
the traced step graph for good.

Each (path, XLA on/off) runs in its own subprocess: after `--warmup` models,
RSS is read, `--models` more models are run, then `gc.collect()` and RSS is
read again; growth/model = (RSS after − RSS before) / models. "alive" counts the
models (of all, warm-up included) whose weak reference survives `gc.collect()`.
XLA on means `jit_compile=True` for fit and `KERAS_NTK_JIT=1` for the kernels.

Run: `python benchmarks/memory_growth.py [--models 150] [--warmup 20]
[--paths empirical_ntk,linearize_fit] [--xla on,off]`. One case:
`python benchmarks/memory_growth.py --case empirical_ntk:off --json`.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import weakref

PATHS = ("empirical_ntk", "empirical_ntk_mirrored", "linearize_fit", "tracker_fit",
         "plain_fit", "plain_nested_fit", "plain_custom_gradient_fit", "plain_gradient",
         "plain_tf_step", "plain_tf_forward_step", "plain_tf_forward_step_shared")


def _rss_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _malloc_trim():
    """Returns freed heap pages to the OS (glibc): RSS then counts what is still in use."""
    import ctypes  # noqa: PLC0415

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _run_case(path, xla, models, warmup, trim=False, python_heap=False, drop_registry=False,
              census=False):
    """Runs in the subprocess: returns the measurements of one (path, xla) case."""
    os.environ["KERAS_NTK_JIT"] = "1" if xla else "0"
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras  # noqa: PLC0415 (after the environment is set)
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import keras_ntk  # noqa: PLC0415

    tf.get_logger().setLevel("ERROR")
    strategy = tf.distribute.get_strategy()
    if path == "empirical_ntk_mirrored":  # before TensorFlow's runtime starts
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    probe = x[:16]

    def mlp():
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(1)])

    def empirical_ntk():
        model = mlp()
        keras_ntk.empirical_ntk(model, probe)
        return [model]

    def empirical_ntk_mirrored():
        with strategy.scope():
            model = mlp()
            keras_ntk.empirical_ntk(model, probe)
        return [model]

    def linearize_fit():
        net = mlp()
        inputs = keras.Input((8,))
        model = keras.Model(inputs, keras_ntk.Linearize(net)(keras.layers.Dense(8)(inputs)))
        model.compile(optimizer="sgd", loss="mse", jit_compile=xla)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        return [net, model]

    def tracker_fit():
        model = mlp()
        model.compile(optimizer="sgd", loss="mse", jit_compile=xla)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                  callbacks=[keras_ntk.NTKTracker(probe, y[:16, 0])])
        return [model]

    def plain_fit():
        model = mlp()
        model.compile(optimizer="sgd", loss="mse", jit_compile=xla)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        return [model]

    def plain_nested_fit():
        # linearize_fit's structure without Linearize: the network called as a layer.
        net = mlp()
        inputs = keras.Input((8,))
        model = keras.Model(inputs, net(keras.layers.Dense(8)(inputs)))
        model.compile(optimizer="sgd", loss="mse", jit_compile=xla)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        return [net, model]

    @tf.custom_gradient
    def identity_with_gradient(inputs):
        return tf.identity(inputs), lambda upstream: upstream

    class CustomGradientIdentity(keras.layers.Layer):
        def call(self, inputs):
            return identity_with_gradient(inputs)

    def plain_custom_gradient_fit():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  CustomGradientIdentity(), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse", jit_compile=xla)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        return [model]

    def plain_gradient():
        model = mlp()

        @tf.function(jit_compile=xla)
        def gradients(inputs):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(inputs))
            return tape.gradient(loss, model.trainable_weights)

        gradients(tf.constant(probe))
        return [model]

    # ---- plain TensorFlow (no Keras, no keras_ntk): linearize_fit's step in raw ops
    zero = tf.UnconnectedGradients.ZERO
    shapes = [(8, 8), (8,), (8, 16), (16,), (16, 1), (1,)]  # Dense(8), then the MLP

    @tf.custom_gradient
    def all_reduce_like(*grads):  # as Keras' optimizer: one registry entry per trace
        return [tf.identity(g) for g in grads], lambda *upstream: list(upstream)

    def net(inputs, theta):
        return tf.matmul(tf.nn.relu(tf.matmul(inputs, theta[0]) + theta[1]), theta[2]) + theta[3]

    def linearized(inputs, theta0, deltas):
        """f(x; θ0) + J·δ as `Linearize` (order 1) computes it, XLA off or on."""
        if not xla:
            with tf.autodiff.ForwardAccumulator(theta0, deltas) as accumulator:
                f0 = net(inputs, theta0)
            return f0 + accumulator.jvp(f0, unconnected_gradients=zero)

        @tf.custom_gradient
        def with_vjp(inputs, *tangents):
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch([inputs] + theta0)
                with tf.autodiff.ForwardAccumulator(theta0, list(tangents)) as accumulator:
                    f0 = net(inputs, theta0)
            jvp = accumulator.jvp(f0, unconnected_gradients=zero)

            def grad(upstream):  # (∂f0/∂x)ᵀu and Jᵀu at θ0
                return tape.gradient(f0, [inputs] + theta0, output_gradients=upstream,
                                     unconnected_gradients=zero)

            return f0 + jvp, grad

        return with_vjp(inputs, *deltas)

    def tf_train_step(variables, deltas, forward):
        trainable = variables[:2] + (deltas if forward else variables[2:])
        with tf.GradientTape() as tape:
            hidden = tf.matmul(tf.constant(x), variables[0]) + variables[1]
            if forward:
                theta0 = [tf.convert_to_tensor(v) for v in variables[2:]]
                out = linearized(hidden, theta0, [tf.convert_to_tensor(d) for d in deltas])
            else:
                out = net(hidden, variables[2:])
            loss = tf.reduce_mean((out - tf.constant(y)) ** 2)
        grads = all_reduce_like(*tape.gradient(loss, trainable))
        for v, g in zip(trainable, grads):
            v.assign_sub(0.01 * g)
        return loss

    def tf_variables():
        variables = [tf.Variable(0.1 * rng.normal(size=s).astype("float32")) for s in shapes]
        return variables, [tf.Variable(tf.zeros_like(v)) for v in variables[2:]]

    def plain_tf_step():
        variables, deltas = tf_variables()
        step = tf.function(lambda: tf_train_step(variables, deltas, False), jit_compile=xla)
        for _ in range(4):
            step()
        return variables

    def plain_tf_forward_step():
        variables, deltas = tf_variables()
        step = tf.function(lambda: tf_train_step(variables, deltas, True), jit_compile=xla)
        for _ in range(4):
            step()
        return variables + deltas

    shared_step = tf.function(lambda v, d: tf_train_step(v, d, True), jit_compile=xla)

    def plain_tf_forward_step_shared():
        variables, deltas = tf_variables()
        for _ in range(4):
            shared_step(variables, deltas)
        return variables + deltas

    run = locals()[path]
    refs = []

    from tensorflow.python.framework import ops  # noqa: PLC0415 (TF's gradient registry)

    def one():
        keys = set(ops._gradient_registry._registry)  # noqa: SLF001
        refs.extend(weakref.ref(obj) for obj in run())
        if drop_registry:
            # Experiment only (TensorFlow's private API): forget the gradient
            # functions this model registered, and with them the graphs they hold.
            for key in set(ops._gradient_registry._registry) - keys:  # noqa: SLF001
                del ops._gradient_registry._registry[key]  # noqa: SLF001

    def registered():
        return len(ops._gradient_registry._registry)  # noqa: SLF001

    def counts():
        """What TensorFlow, Keras and keras_ntk hold globally (all private, read only)."""
        from tensorflow.python.eager import context, forwardprop  # noqa: PLC0415

        from keras_ntk import _batching  # noqa: PLC0415

        return {
            "gradient registry entries": registered(),
            "eager-context functions": len(context.context().list_function_names()),
            "forward-mode JVP function cache": len(forwardprop._jvp_function_cache),  # noqa: SLF001
            "keras_ntk shared block functions": len(_batching._SHARED),  # noqa: SLF001
            "keras_ntk per-model caches": len(_batching._COMPILED),  # noqa: SLF001
        }

    def types():
        import collections  # noqa: PLC0415

        return collections.Counter(type(o).__qualname__ for o in gc.get_objects())

    import tracemalloc  # noqa: PLC0415

    for _ in range(warmup):
        one()
    gc.collect()
    if trim:
        _malloc_trim()
    if python_heap:
        tracemalloc.start()
    python_before = tracemalloc.get_traced_memory()[0]
    if census:
        tracemalloc.start(8)
        counts_before, types_before = counts(), types()
        heap_before = tracemalloc.take_snapshot()
    before = _rss_mib()
    registered_before = registered()
    start = time.perf_counter()
    for _ in range(models):
        one()
    seconds = time.perf_counter() - start
    gc.collect()
    if trim:
        _malloc_trim()
    after = _rss_mib()
    python_after = tracemalloc.get_traced_memory()[0]
    alive = sum(ref() is not None for ref in refs)
    extra = {}
    if census:
        # Growth per model of global registries, of live objects by type, and the
        # Python-heap allocation sites that grew most (tracemalloc, 8 frames).
        heap = tracemalloc.take_snapshot().compare_to(heap_before, "traceback")
        counts_after, types_after = counts(), types()
        grown = types_after - types_before
        extra["census"] = {
            "registries_per_model": {k: (counts_after[k] - counts_before[k]) / models
                                     for k in counts_after},
            "objects_per_model": {k: v / models for k, v in grown.most_common(25)},
            "python_heap_kib_per_model": sum(d.size_diff for d in heap) / 2**10 / models,
            "heap_sites": [
                {"kib_per_model": d.size_diff / 2**10 / models,
                 "blocks_per_model": d.count_diff / models,
                 "where": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                           for f in d.traceback][:8]}
                for d in heap[:15]],
        }
    return {**extra,
        "path": path, "xla": xla, "models": models, "warmup": warmup,
        "alive": alive, "objects": len(refs),
        "rss_before_mib": before, "rss_after_mib": after,
        "mib_per_model": (after - before) / models,
        # Gradient functions registered (never removed) per model: each holds its traced graph.
        "registered_per_model": (registered() - registered_before) / models,
        "seconds_per_model": seconds / models,
        # Python-heap growth (tracemalloc, only with --python-heap) and glibc trimming.
        "python_mib_per_model": (python_after - python_before) / 2**20 / models,
        "trim": trim, "drop_registry": drop_registry, "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "load_average": os.getloadavg()[0],
    }


def measure(path, xla, models=150, warmup=20, cwd=None, trim=False, python_heap=False,
            drop_registry=False):
    """Runs one case in a fresh Python process and returns its measurements (a dict)."""
    command = [sys.executable, os.path.abspath(__file__), "--case",
               f"{path}:{'on' if xla else 'off'}", "--models", str(models),
               "--warmup", str(warmup), "--json"]
    command += (["--trim"] * trim + ["--python-heap"] * python_heap
                + ["--drop-registry"] * drop_registry)
    root = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {path}:{xla} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--xla", default="off,on")
    parser.add_argument("--case", help="path:on|off, run in this process")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trim", action="store_true",
                        help="malloc_trim(0) before each RSS reading (freed heap vs held)")
    parser.add_argument("--python-heap", action="store_true",
                        help="also measure Python-heap growth with tracemalloc (slower)")
    parser.add_argument("--drop-registry", action="store_true",
                        help="experiment: delete the gradient-registry entries each model "
                             "added (TF private API), to see what they hold")
    parser.add_argument("--census", action="store_true",
                        help="with --case: growth per model of TensorFlow's and keras_ntk's "
                             "global registries, of live objects by type and of the Python "
                             "heap by allocation site (slow; for finding what is held)")
    args = parser.parse_args()
    if args.case:
        path, xla = args.case.split(":")
        if path not in PATHS or xla not in ("on", "off"):
            parser.error(f"unknown case {args.case!r}")
        result = _run_case(path, xla == "on", args.models, args.warmup, args.trim,
                           args.python_heap, args.drop_registry, args.census)
        print(json.dumps(result) if args.json else result, flush=True)
        return
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"{args.models} models after {args.warmup} warm-up, one process per case")
    print(f"trim={args.trim}, drop_registry={args.drop_registry}, MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}")
    print(f"{'path':26s} {'XLA':>4s} {'alive':>9s} {'MiB/model':>10s} {'s/model':>8s} "
          f"{'reg/model':>9s} {'py MiB/model':>12s} {'load':>5s}")
    for path in args.paths.split(","):
        for xla in args.xla.split(","):
            r = measure(path, xla == "on", args.models, args.warmup, trim=args.trim,
                        python_heap=args.python_heap, drop_registry=args.drop_registry)
            print(f"{path:26s} {xla:>4s} {r['alive']:>4d}/{r['objects']:<4d} "
                  f"{r['mib_per_model']:10.3f} {r['seconds_per_model']:8.3f} "
                  f"{r['registered_per_model']:9.1f} {r['python_mib_per_model']:12.3f} "
                  f"{r['load_average']:5.1f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
