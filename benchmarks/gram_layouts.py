"""The traced cotangent Gram of MLP-10's first layer, by layout (issue 18 §3).

`tape_jacobian` vectorizes the backward pass over the output entries, so a Dense
layer's cotangents come out output-major, (K, N, B); the traced Gram
Σ_k G_k G_kᵀ needs them as (N, K·B) for one matrix product. Times (XLA, medians of
30 interleaved rounds) the Gram of K=10, N=256, B=512 cotangents:

* `example_major`: already (N, K, B) (what producing them example-major would give);
* `transpose_then`: a transposing copy, then one product (what ours does);
* `unrolled`: K products of the output-major slices, summed;
* `unrolled_t`: the same on the transposed tensor (XLA keeps the copy);
* `batched`: one batched product, summed over K;
* `concat_slices`: the slices concatenated side by side, then one product.

Run: `python benchmarks/gram_layouts.py`.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

K, N, B = 10, 256, 512


@tf.function(jit_compile=True)
def example_major(ge):
    t = tf.reshape(ge, [N, -1])
    return tf.matmul(t, t, transpose_b=True)


@tf.function(jit_compile=True)
def transpose_then(g):
    t = tf.reshape(tf.transpose(g, [1, 0, 2]), [N, -1])
    return tf.matmul(t, t, transpose_b=True)


@tf.function(jit_compile=True)
def unrolled(g):
    return tf.add_n([tf.matmul(g[k], g[k], transpose_b=True) for k in range(K)])


@tf.function(jit_compile=True)
def unrolled_t(g):
    t = tf.transpose(g, [1, 0, 2])
    return tf.add_n([tf.matmul(t[:, k], t[:, k], transpose_b=True) for k in range(K)])


@tf.function(jit_compile=True)
def batched(g):
    return tf.reduce_sum(tf.matmul(g, g, transpose_b=True), 0)


@tf.function(jit_compile=True)
def concat_slices(g):
    t = tf.concat([g[k] for k in range(K)], 1)
    return tf.matmul(t, t, transpose_b=True)


def main():
    g = tf.constant(np.random.default_rng(0).normal(size=(K, N, B)).astype(np.float32))
    ge = tf.constant(np.transpose(g.numpy(), [1, 0, 2]).copy())
    cases = {"example_major": (example_major, ge), "transpose_then": (transpose_then, g),
             "unrolled": (unrolled, g), "unrolled_t": (unrolled_t, g),
             "batched": (batched, g), "concat_slices": (concat_slices, g)}
    reference = example_major(ge).numpy()
    for name, (fn, arg) in cases.items():
        error = np.abs(fn(arg).numpy() - reference).max() / np.abs(reference).max()
        assert error < 1e-5, (name, error)
    times = {name: [] for name in cases}
    for _ in range(30):
        for name, (fn, arg) in cases.items():
            start = time.perf_counter()
            fn(arg).numpy()
            times[name].append(time.perf_counter() - start)
    for name in cases:
        print(f"{name:15s} {np.median(times[name]) * 1e3:6.2f} ms")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
