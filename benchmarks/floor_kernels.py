"""Minimal TF+XLA kernels of the MLP cases of `ntk_speed.py`: a floor for ours.

Each is the structured rule written out by hand for one architecture, with the
weights as arguments, as one `jit_compile` function: the FLOPs a Dense network's
NTK needs (forward, one backward per output, one Gram per factor) and nothing
else (no validation, no planning, no padding, no host round trips). Timed in the
same rounds as ours and neural-tangents (`ntk_speed.py --neural-tangents-python`),
floor/NT says how far below neural-tangents ANY implementation of these
contractions on this machine can go, and ours/floor what ours costs above them.

MLP 64-512-512-K with ReLU, f = a2 W3 + b3, a_l = relu(z_l):

    Θ = Σ_l (A_{l-1} A_{l-1}ᵀ + 1) ⊙ (G_l G_lᵀ)   (A_0 = x; G_l the cotangents at z_l)

with G_3 = 1 (the head), G_2 = W3ᵀ ⊙ relu'(z2) per output, G_1 = (G_2 W2ᵀ) ⊙ relu'(z1).
Traced over K outputs (`trace_axes=(-1,)`) the head identity gives the layer-2
Gram at width 512: Σ_k G_2k G_2kᵀ = (D2 diag(Σ_k W3[:, k]²)) D2ᵀ.

Run as a script (`python benchmarks/floor_kernels.py [--rounds 11]`), it says what the
MLP-1 floor (N = 256) is made of, all timed in the same interleaved rounds: the floor
call; the same eight matrix products alone (its 3 forward/backward products and 5
Grams, no elementwise work); a trivial compiled call (TensorFlow's per-call cost); the
matrix-product rate of a large square product (this machine's practical peak); and two
ways to spend fewer FLOPs on a symmetric Gram A Aᵀ (A 256 × 512): 2 × 2 blocks, of which
3 are computed, and four Grams stacked into one batched product.
"""

import argparse
import time

import numpy as np
import tensorflow as tf


def _relu_factors(x, w1, b1, w2, b2):
    z1 = tf.matmul(x, w1) + b1
    a1 = tf.nn.relu(z1)
    z2 = tf.matmul(a1, w2) + b2
    return z1, a1, z2, tf.nn.relu(z2)


def _gram(a):
    return tf.matmul(a, a, transpose_b=True)


@tf.function(jit_compile=True, autograph=False)
def mlp_traced(x, w1, b1, w2, b2, w3, b3):
    """Θ(x, x) averaged over the K outputs, (N, N)."""
    del b3
    n, k = tf.shape(x)[0], w3.shape[1]
    z1, a1, z2, a2 = _relu_factors(x, w1, b1, w2, b2)
    d1, d2 = tf.cast(z1 > 0, x.dtype), tf.cast(z2 > 0, x.dtype)
    head = _gram(a2) + 1.0
    scale = tf.reduce_sum(w3 * w3, 1) / k  # (512,): the head identity
    layer2 = (_gram(a1) + 1.0) * tf.matmul(d2 * scale, d2, transpose_b=True)
    g2 = d2[:, None, :] * tf.transpose(w3)[None]  # (N, K, 512)
    g1 = tf.matmul(g2, w2, transpose_b=True) * d1[:, None, :]  # (N, K, 512)
    g1 = tf.reshape(g1, [n, -1]) / tf.sqrt(tf.cast(k, x.dtype))
    layer1 = (_gram(x) + 1.0) * _gram(g1)
    return head + layer2 + layer1


FLOORS = {"mlp1": mlp_traced, "mlp10_traced": mlp_traced}


def floor_function(case, model, x):
    """A zero-argument callable computing the case's kernel by hand, or None."""
    fn = FLOORS.get(case)
    if fn is None:
        return None
    xt = tf.constant(x)
    weights = [v.value for v in model.weights]
    return lambda: fn(xt, *weights).numpy()


def check(case, model, x, kernel):
    """Relative difference between the floor kernel and `kernel` (ours)."""
    out = floor_function(case, model, x)()
    return float(np.linalg.norm(out - np.asarray(kernel).reshape(out.shape))
                 / np.linalg.norm(out))


# --- what the MLP-1 floor is made of (run as a script) ---------------------------------

N, D, H = 256, 64, 512
# multiply-adds: forward x W1, a1 W2; backward g2 W2ᵀ; Grams x xᵀ (N²D), a1, a2, D2, g1 (N²H)
FLOOR_MACS = N * D * H + 2 * N * H * H + N * N * D + 4 * N * N * H


@tf.function(jit_compile=True, autograph=False)
def _products_alone(x, w1, w2):
    gram = _gram
    z1 = tf.matmul(x, w1)
    z2 = tf.matmul(z1, w2)
    g1 = tf.matmul(z2, w2, transpose_b=True)
    # whole Grams returned (a slice of each could be pushed into its product)
    return gram(x) + gram(z1) + gram(z2) + gram(g1) + gram(2.0 * z1)


@tf.function(jit_compile=True, autograph=False)
def _trivial(x):
    return x[:1, :1] + 1.0


@tf.function(jit_compile=True, autograph=False)
def _product(a, b):
    return tf.matmul(a, b)


@tf.function(jit_compile=True, autograph=False)
def _grams(a, b, c, d):
    return _gram(a) * _gram(b) + _gram(c) * _gram(d)


@tf.function(jit_compile=True, autograph=False)
def _grams_stacked(a, b, c, d):
    g = _gram(tf.stack([a, b, c, d]))
    return g[0] * g[1] + g[2] * g[3]


@tf.function(jit_compile=True, autograph=False)
def _gram_blocks(a):
    h = a.shape[0] // 2
    top, bottom = a[:h], a[h:]
    g11, g12, g22 = (tf.matmul(top, top, transpose_b=True),
                     tf.matmul(top, bottom, transpose_b=True),
                     tf.matmul(bottom, bottom, transpose_b=True))
    return tf.concat([tf.concat([g11, g12], 1), tf.concat([tf.transpose(g12), g22], 1)], 0)


def _breakdown(rounds):
    rng = np.random.default_rng(0)
    f32 = lambda *shape: tf.constant(rng.standard_normal(shape).astype(np.float32))
    x, w1, b1, w2, b2, w3, b3 = (f32(N, D), f32(D, H) / 8, f32(H), f32(H, H) / 22, f32(H),
                                 f32(H, 1) / 22, f32(1))
    wide = f32(N, H)
    fours = [f32(N, H) for _ in range(4)]
    big = f32(2048, 2048)
    # the variants compute what they replace
    np.testing.assert_allclose(_gram_blocks(wide).numpy(), _gram(wide).numpy(), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(_grams_stacked(*fours).numpy(), _grams(*fours).numpy(),
                               rtol=1e-3, atol=1.0)
    calls = {
        "floor (MLP-1, N = 256)": lambda: mlp_traced(x, w1, b1, w2, b2, w3, b3),
        "its 8 products alone": lambda: _products_alone(x, w1, w2),
        "trivial compiled call": lambda: _trivial(x),
        "product 2048³": lambda: _product(big, big),
        "4 Grams 256 × 512": lambda: _grams(*fours),
        "4 Grams stacked, one batched product": lambda: _grams_stacked(*fours),
        "1 Gram 256 × 512": lambda: _gram(wide),
        "1 Gram as 3 of 2 × 2 blocks": lambda: _gram_blocks(wide),
    }
    for call in calls.values():
        call().numpy()  # compile
    seconds = {name: [] for name in calls}
    for r in range(rounds):
        for name in (calls if r % 2 == 0 else reversed(list(calls))):
            repeats = 4 if name.startswith("product") else 40
            start = time.perf_counter()
            for _ in range(repeats):
                out = calls[name]()
            out.numpy()
            seconds[name].append((time.perf_counter() - start) / repeats)
    med = {name: float(np.median(s)) for name, s in seconds.items()}
    peak = 2 * 2048**3 / med["product 2048³"] / 1e9
    print(f"medians over {rounds} interleaved rounds (ms per call):")
    for name, t in med.items():
        print(f"  {name:40s} {t * 1e3:8.3f}")
    floor_rate = 2 * FLOOR_MACS / med["floor (MLP-1, N = 256)"] / 1e9
    print(f"practical peak (2048³ product): {peak:.0f} GFLOP/s")
    print(f"floor: {2 * FLOOR_MACS / 1e6:.0f} MFLOP of products, {floor_rate:.0f} GFLOP/s "
          f"({floor_rate / peak:.2f} of the peak); products alone / floor "
          f"{med['its 8 products alone'] / med['floor (MLP-1, N = 256)']:.2f}; "
          f"trivial call / floor {med['trivial compiled call'] / med['floor (MLP-1, N = 256)']:.2f}")
    print(f"stacked / separate Grams {med['4 Grams stacked, one batched product'] / med['4 Grams 256 × 512']:.2f}; "
          f"3 of 2 × 2 blocks / one Gram {med['1 Gram as 3 of 2 × 2 blocks'] / med['1 Gram 256 × 512']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    _breakdown(parser.parse_args().rounds)
