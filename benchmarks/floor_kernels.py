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
"""

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
