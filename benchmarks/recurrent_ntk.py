"""The cost of the empirical NTK of a recurrent model (issue 18 §1).

Recurrent layers are traced unrolled for the kernels (TensorFlow cannot
vectorize the gradient of their tf.while_loop nor run forward mode through
it). This prints, for an LSTM on N examples, the first (tracing + compiling)
and the median warm time of each implementation, and two references measured
in the same run:

* "per-example loop": the fallback that keeps the tf.while_loop, a
  `tf.map_fn` over examples of `tape.jacobian(..., experimental_use_pfor=False)`
  (one plain gradient per example and output entry), inside a tf.function;
* "naive": `tape.jacobian(..., experimental_use_pfor=False)` of the whole
  batch's outputs, then the contraction (the test reference).

Every kernel is checked against the naive one (relative Frobenius error).

    python benchmarks/recurrent_ntk.py [--n 64] [--steps 16] [--units 16] [--repeats 3]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ntk  # noqa: E402
import keras_ntk._batching  # noqa: E402


def _timed(fn, repeats):
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return np.asarray(out), first, statistics.median(warm)


def _flat_jacobian(tape, y, weights):
    jac = tape.jacobian(y, weights, experimental_use_pfor=False)
    return tf.concat([tf.reshape(j, [tf.shape(y)[0], -1]) for j in jac], 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((args.steps, args.features)),
                              keras.layers.LSTM(args.units), keras.layers.Dense(args.outputs)])
    x = np.random.default_rng(0).normal(size=(args.n, args.steps, args.features)).astype(
        "float32")
    weights = model.trainable_weights
    params = sum(int(np.prod(w.shape)) for w in weights)
    print(f"LSTM({args.units}) + Dense({args.outputs}) on N={args.n} sequences of "
          f"{args.steps}×{args.features}, {params} parameters; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    @tf.function(autograph=False)
    def naive(xb):
        with tf.GradientTape() as tape:
            y = tf.reshape(model(xb, training=False), [-1])
        j = tf.reshape(_flat_jacobian(tape, y, weights), [args.n, args.outputs, -1])
        return tf.einsum("nsp,msp->nm", j, j) / args.outputs

    @tf.function(autograph=False)
    def per_example_loop(xb):
        def one(xi):
            with tf.GradientTape() as tape:
                y = tf.reshape(model(xi[None], training=False), [-1])
            return _flat_jacobian(tape, y, weights)

        j = tf.map_fn(one, xb)
        return tf.einsum("nsp,msp->nm", j, j) / args.outputs

    reference, first, warm = _timed(lambda: naive(x), args.repeats)
    print(f"{'naive (batch jacobian, no pfor)':40s} first {first:7.2f} s  warm {warm:7.3f} s",
          flush=True)
    rows = [("per-example loop (tf.while_loop kept)", lambda: per_example_loop(x))]
    # Recurrent models run as plain graphs by default; "1" forces XLA (for comparison).
    for impl, jit in (("auto", "auto"), ("structured", "auto"), ("jacobian", "auto"),
                      ("ntvp", "auto"), ("auto", "1")):
        # A fresh copy per row: compiled block functions are cached per model.
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())

        def run(impl=impl, jit=jit, copy=copy):
            keras_ntk._batching._JIT = jit
            return keras_ntk.empirical_ntk(copy, x, implementation=impl)

        rows.append((f"empirical_ntk {impl}" + (" (XLA forced)" if jit == "1" else ""), run))
    for label, fn in rows:
        # Functions shared by copies of one architecture would make a row's first call warm.
        getattr(keras_ntk._batching, "_SHARED", {}).clear()
        kernel, first, warm = _timed(fn, args.repeats)
        error = np.linalg.norm(kernel - reference) / np.linalg.norm(reference)
        print(f"{label:40s} first {first:7.2f} s  warm {warm:7.3f} s  rel. error {error:.1e}",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
