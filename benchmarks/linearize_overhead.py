"""Cost of training a linearized model, relative to training the model itself.

Prints, per model and compile mode (graph, XLA), the median time of one
`train_on_batch` (batch 128, SGD with momentum, MSE) for:

* plain: the Keras model itself;
* ours: `keras.Sequential([keras_ntk.Linearize(model)])`;
* naive: the same forward (ForwardAccumulator) differentiated directly,
  without our custom gradient (what a straightforward implementation does).

Measurements are interleaved round by round so the ratios compare runs taken
under the same machine load. Run: `python benchmarks/linearize_overhead.py`
(`--quick` for fewer rounds).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ntk  # noqa: E402

# experiments/ is not installed (the wheel is the library only): run from the checkout.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import models  # noqa: E402


class NaiveLinearize(keras_ntk.Linearize):
    """f(x;θ0) + J·δ differentiated through the accumulator (no custom gradient)."""

    def call(self, inputs, training=None):
        flat_inputs = [tf.convert_to_tensor(x) for x in tf.nest.flatten(inputs)]
        primals = [tf.convert_to_tensor(v) for v in self._initial]
        tangents = [tf.convert_to_tensor(d) for d in self._deltas]
        structure = {
            "frozen": [tf.convert_to_tensor(v) for v in self._frozen],
            "fixed": [tf.convert_to_tensor(v) for v in self._fixed],
        }
        terms = self._taylor_terms(inputs, flat_inputs, primals, tangents, structure)
        return tf.nest.pack_sequence_as(structure["outputs"], self._combine(terms))


CASES = {
    "mlp_64-512-512-1": (lambda: models.mlp((64,), 1, widths=(512, 512)), (64,)),
    "lenet_8x8": (lambda: models.lenet((8, 8, 1), 1), (8, 8, 1)),
    "resnet18_narrow_32x32": (lambda: models.resnet18((32, 32, 3), 1, width=16), (32, 32, 3)),
}
# Compute-bound case (not run by default): the matmul FLOP floor of a
# linearized step is 1.625x a plain one for this MLP (see docs/performance.md).
EXTRA_CASES = {
    "mlp_1024-2048-2048-1": (lambda: models.mlp((1024,), 1, widths=(2048, 2048)), (1024,)),
}


def compiled(model, jit):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse", jit_compile=jit
    )
    return model


def step_time(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def measure(name, jit, rounds, steps, naive_steps, naive=True):
    build, shape = {**CASES, **EXTRA_CASES}[name]
    batch = 512 if name in EXTRA_CASES else 128
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape).astype("float32")
    y = rng.standard_normal((batch, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    net = build()
    variants = {
        "plain": compiled(build(), jit),
        "ours": compiled(keras.Sequential([keras.Input(shape), keras_ntk.Linearize(net)]), jit),
    }
    if naive:
        variants["naive"] = compiled(keras.Sequential([keras.Input(shape), NaiveLinearize(net)]), jit)
    for model in variants.values():  # compile and warm up
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    times = {key: [] for key in variants}
    for _ in range(rounds):
        for key, model in variants.items():
            times[key].append(step_time(model, x, y, naive_steps if key == "naive" else steps))
    result = {key: float(np.median(value)) for key, value in times.items()}
    result.setdefault("naive", float("nan"))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--models", nargs="*", default=list(CASES),
                        choices=list(CASES) + list(EXTRA_CASES))
    parser.add_argument("--modes", nargs="*", default=["graph", "xla"], choices=["graph", "xla"])
    parser.add_argument("--no-naive", action="store_true",
                        help="skip the naive variant (under XLA it recompiles every step: "
                             "minutes per step for ResNet-18)")
    args = parser.parse_args()
    rounds, steps = (3, 5) if args.quick else (7, 10)
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(f"device: {'GPU' if 'GPU' in devices else 'CPU'} ({os.cpu_count()} CPU cores), "
          f"TF {tf.__version__}, Keras {keras.__version__}")
    print(f"{'model':24s} {'mode':5s} {'plain ms':>9s} {'ours ms':>9s} {'naive ms':>9s} "
          f"{'ours/plain':>10s} {'naive/plain':>11s}")
    for name in args.models:
        for jit in [mode == "xla" for mode in args.modes]:
            # A naive XLA step recompiles every call: time it on fewer steps.
            t = measure(name, jit, rounds, steps, naive_steps=2 if jit else steps,
                        naive=not args.no_naive)
            print(f"{name:24s} {'xla' if jit else 'graph':5s} {t['plain'] * 1e3:9.2f} "
                  f"{t['ours'] * 1e3:9.2f} {t['naive'] * 1e3:9.2f} "
                  f"{t['ours'] / t['plain']:10.2f} {t['naive'] / t['plain']:11.2f}", flush=True)


if __name__ == "__main__":
    main()
