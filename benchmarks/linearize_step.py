"""Training-step time of `Linearize` (order 1): this checkout vs an earlier commit.

The earlier implementation (default: 891507c, δ-gradient through
`tf.custom_gradient` around a forward-mode JVP) is loaded from git as a
module; the current one is `keras_ntk.Linearize` (without XLA: f0 + J·δ
differentiated directly, no custom gradient; under XLA, forward mode keeps
the custom gradient, since the double VJP cost 2.0× per step on the CNN).
Each round times `fit` over the same number of steps for: old, new, and a plain (non-linearized) fit of the same network, in
turn, so machine load affects all alike. Reported: median seconds per step
over the rounds and the ratios, with the load average.

Also checks, once per model, that old and new give the same loss trajectory.

Run: `python benchmarks/linearize_step.py [--models mlp,cnn] [--xla off,on]
[--rounds 5] [--steps 20] [--old-commit 891507c]`.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import keras_ntk  # noqa: E402


def old_linearize(commit):
    """`Linearize` of keras_ntk/linearize.py at `commit`, imported from git."""
    source = subprocess.run(["git", "show", f"{commit}:keras_ntk/linearize.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    # A distinct registered name, so both classes can coexist.
    source = source.replace('package="keras_ntk"', 'package="keras_ntk_old"')
    path = os.path.join(tempfile.mkdtemp(), "linearize_old.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("linearize_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Linearize


def network(kind):
    if kind == "mlp":
        return keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                                 keras.layers.Dense(512, activation="relu"),
                                 keras.layers.Dense(10)]), (128, 784)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ]), (64, 32, 32, 3)


def build(kind, wrapper, xla):
    keras.utils.set_random_seed(0)
    net, shape = network(kind)
    inner = net if wrapper is None else wrapper(net)
    model = keras.Sequential([keras.Input(shape[1:]), inner])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=xla)
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=(shape[0], 10)).astype("float32")
    data = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    return model, data


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--xla", default="off,on")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--old-commit", default="891507c")
    parser.add_argument("--with-forward", action="store_true",
                        help='also time jvp_method="forward" (XLA off only)')
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    variants = {"old": old_linearize(args.old_commit), "new": keras_ntk.Linearize,
                "plain": None}
    if args.with_forward:
        # jvp_method="forward" differentiated directly: without XLA only (XLA recompiles it).
        variants["new_forward"] = lambda net: keras_ntk.Linearize(net, jvp_method="forward")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"{args.rounds} rounds of {args.steps} steps, interleaved old/new/plain")
    for kind in args.models.split(","):
        for xla in args.xla.split(","):
            models, losses = {}, {}
            chosen = {n: w for n, w in variants.items() if n != "new_forward" or xla == "off"}
            for name, wrapper in chosen.items():
                model, data = build(kind, wrapper, xla == "on")
                start = time.perf_counter()
                history = model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
                losses[name] = history.history["loss"][0]
                models[name] = (model, data, time.perf_counter() - start)
            same = abs(losses["old"] - losses["new"]) / abs(losses["old"])
            times = {name: [] for name in chosen}
            loads = []
            for _ in range(args.rounds):
                for name, (model, data, _) in models.items():
                    start = time.perf_counter()
                    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
                    times[name].append((time.perf_counter() - start) / args.steps)
                loads.append(os.getloadavg()[0])
            med = {name: float(np.median(t)) for name, t in times.items()}
            print(f"{kind:4s} XLA {xla:3s} ms/step: old {1e3 * med['old']:8.2f}  "
                  f"new {1e3 * med['new']:8.2f}  plain {1e3 * med['plain']:8.2f}  "
                  f"new/old {med['new'] / med['old']:.2f}  new/plain "
                  f"{med['new'] / med['plain']:.2f}  old/plain {med['old'] / med['plain']:.2f}  "
                  f"first fit (trace+compile) s: old {models['old'][2]:.1f} new "
                  f"{models['new'][2]:.1f}  |Δloss|/loss old-new {same:.1e}  "
                  f"load {min(loads):.1f}-{max(loads):.1f}", flush=True)
            if "new_forward" in med:
                print(f"     new_forward {1e3 * med['new_forward']:8.2f} ms/step, /old "
                      f"{med['new_forward'] / med['old']:.2f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
