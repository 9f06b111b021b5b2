"""The naive reference kernel and the small models shared by the kernel tests.

Every kernel is checked against an independent naive reference: the explicit
Jacobian of the whole batch from `tf.GradientTape.jacobian`, contracted over
the weights in float64 with numpy, with the trace/diagonal conventions of
neural-tangents applied by `numpy.einsum` on the full (N1, *S, N2, *S) kernel.

Test modules import what they need from here (pytest puts tests/ on sys.path);
a module that imports `plain_graphs` uses it with `pytest.mark.usefixtures`.
"""

import string

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ntk import _batching

RTOL = 1e-4
IMPLEMENTATIONS = ("structured", "jacobian", "ntvp")


@pytest.fixture
def plain_graphs(monkeypatch):
    """Plain tf.function graphs: XLA compilation of every tiny test model would take
    most of the kernel tests' time budget; `test_xla_path_matches_plain_graphs`
    (test_batching.py) covers XLA."""
    monkeypatch.setattr(_batching, "_JIT", "0")


# ----------------------------------------------------------------- reference


def naive_full_kernel(model, x1, x2=None, training=False):
    """Full kernels (N1, *S, N2, *S) per output, float64, from whole-batch Jacobians."""

    def jacobians(x):
        with tf.GradientTape(persistent=True) as tape:
            ys = tf.nest.flatten(model(x, training=training))
        out = []
        for y in ys:
            jac = tape.jacobian(y, model.trainable_weights)
            jac = [np.zeros((*y.shape, *w.shape)) if j is None else j
                   for j, w in zip(jac, model.trainable_weights)]
            flat = [np.reshape(np.asarray(j, np.float64), (*y.shape, -1)) for j in jac]
            out.append(np.concatenate(flat, -1))
        return out

    j1 = jacobians(x1)
    j2 = j1 if x2 is None else jacobians(x2)
    return [np.tensordot(a, b, axes=([a.ndim - 1], [b.ndim - 1])) for a, b in zip(j1, j2)]


def reduce_reference(full, trace_axes, diagonal_axes):
    """neural-tangents conventions written out independently with numpy.einsum."""
    ndim = (full.ndim - 2) // 2  # output axes per side
    norm = lambda axes: {a % (ndim + 1) for a in axes} - {0}  # noqa: E731
    trace, diag = norm(trace_axes), norm(diagonal_axes)
    lower, upper = string.ascii_lowercase[:ndim], string.ascii_uppercase[:ndim]
    side1, side2, out, size = "", "", "", 1
    for i in range(ndim):
        side1 += lower[i]
        if i + 1 in trace:
            side2 += lower[i]
            size *= full.shape[1 + i]
        elif i + 1 in diag:
            side2 += lower[i]
            out += lower[i]
        else:
            side2 += upper[i]
            out += lower[i] + upper[i]
    return np.einsum(f"y{side1}z{side2}->yz{out}", full) / size


def reference(model, x1, x2=None, trace_axes=(-1,), diagonal_axes=(), training=False):
    fulls = naive_full_kernel(model, x1, x2, training)
    kernels = [reduce_reference(f, trace_axes, diagonal_axes) for f in fulls]
    return kernels[0] if len(kernels) == 1 else kernels


def rel_error(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def assert_close(actual, expected, rtol=RTOL):
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_close(a, e, rtol)
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert rel_error(actual, expected) < rtol, rel_error(actual, expected)


# ----------------------------------------------------------------- models


def mlp(outputs=3):
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(12, activation="tanh"),
        keras.layers.Dense(10, activation="relu"),
        keras.layers.Dense(outputs),
    ])


def randomize_batchnorm(model):
    """Non-trivial BatchNorm statistics so inference mode is not the identity."""
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(size=c) * 0.3)
            layer.moving_mean.assign(rng.normal(size=c) * 0.3)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
    return model


def cnn():
    return randomize_batchnorm(keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Conv2D(3, 2, padding="valid", activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ]))


def conv_map():
    """A fully convolutional model with a (N, 4, 4, 2) output (strided conv)."""
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(2, 3, padding="same"),
    ])


def two_outputs():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    first = keras.layers.Dense(3, name="first")(h)
    g = keras.layers.Dense(6, activation="relu")(inputs)
    second = keras.layers.Dense(2, name="second")(keras.layers.Concatenate()([h, g]))
    return keras.Model(inputs, [first, second])


def text_model():
    return keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(20, 4),
        keras.layers.Dense(6, activation="tanh"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])


class Residual(keras.Model):
    """A subclassed model: shared Dense layer, LayerNorm and a residual branch."""

    def __init__(self):
        super().__init__()
        self.inner = keras.layers.Dense(6, activation="tanh")
        self.norm = keras.layers.LayerNormalization()
        self.head = keras.layers.Dense(2)

    def call(self, x):
        h = self.inner(x)
        h = h + self.inner(h * 0.5 + x[:, :1])
        return self.head(self.norm(h))


def inputs_for(name, n, seed=0):
    rng = np.random.default_rng(seed)
    if name == "cnn":
        return rng.normal(size=(n, 6, 6, 2)).astype("float32")
    if name == "conv_map":
        return rng.normal(size=(n, 8, 8, 1)).astype("float32")
    if name == "text":
        return rng.integers(0, 20, size=(n, 5)).astype("int32")
    if name == "two_outputs":
        return rng.normal(size=(n, 4)).astype("float32")
    if name == "residual":
        return rng.normal(size=(n, 6)).astype("float32")
    return rng.normal(size=(n, 5)).astype("float32")


MODELS = {
    "mlp": mlp, "cnn": cnn, "two_outputs": two_outputs, "text": text_model,
    "residual": Residual,
}


# ----------------------------------------------------------------- parameters


def slow_unless(fast, *values):
    """A parameter set marked slow unless it is among the `fast` ones (time budget)."""
    return pytest.param(*values, marks=() if fast else pytest.mark.slow)


FAST_PAIRS = {
    ("mlp", "structured"), ("cnn", "structured"), ("two_outputs", "structured"),
    ("text", "structured"), ("residual", "structured"), ("cnn", "jacobian"),
    ("text", "jacobian"), ("two_outputs", "jacobian"), ("mlp", "ntvp"),
}


def model_cases(implementation):
    """The models of `MODELS` as parameters for one implementation (slow unless fast)."""
    return [slow_unless((n, implementation) in FAST_PAIRS, n) for n in sorted(MODELS)]


def assert_matches_naive_jacobian(name, implementation):
    """The kernel of `MODELS[name]` by `implementation` equals the naive reference."""
    import keras_ntk

    model = MODELS[name]()
    x1, x2 = inputs_for(name, 6), inputs_for(name, 4, seed=1)
    model(x1)
    expected = reference(model, x1, x2)
    actual = keras_ntk.empirical_ntk(model, x1, x2, implementation=implementation)
    assert_close(actual, expected)


def naive_subset_kernel(model, weights, x1, x2=None, trace_axes=(-1,)):
    """float64 reference over a subset of weights from whole-batch GradientTape Jacobians."""

    def jacobians(x):
        with tf.GradientTape(persistent=True) as tape:
            ys = tf.nest.flatten(model(x, training=False))
        out = []
        for y in ys:
            jac = tape.jacobian(y, weights)
            jac = [np.zeros((*y.shape, *w.shape)) if j is None else j
                   for j, w in zip(jac, weights)]
            flat = [np.reshape(np.asarray(j, np.float64), (*y.shape, -1)) for j in jac]
            out.append(np.concatenate(flat, -1))
        return out

    j1 = jacobians(x1)
    j2 = j1 if x2 is None else jacobians(x2)
    kernels = [reduce_reference(np.tensordot(a, b, axes=([a.ndim - 1], [b.ndim - 1])),
                                trace_axes, ()) for a, b in zip(j1, j2)]
    return kernels[0] if len(kernels) == 1 else kernels
