"""Tests of keras_ntk.infinite against hand computations, an independent naive
numpy recursion, Gaussian quadrature and Monte-Carlo averages of wide networks."""
import math

import keras
import numpy as np
import pytest
import scipy.special
import tensorflow as tf

import keras_ntk
from keras_ntk import _arcsine, _kernel_plan, _kernel_recursion, infinite, mean_field
from keras_ntk.layers import Erf, NTKConv2D, NTKDense


def _relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------ hand computations


def _one_hidden_layer(activation, w2, b2):
    layers = [keras.Input((2,)), NTKDense(16, math.sqrt(w2), math.sqrt(b2))]
    layers.append(keras.layers.ReLU() if activation == "relu" else Erf())
    layers.append(NTKDense(1, math.sqrt(w2), math.sqrt(b2)))
    return keras.Sequential(layers)


def test_one_layer_relu_by_hand():
    # x1 = (√2, 0), x2 = (1, 1): K0 = [[1, √2/2], [√2/2, 1]], angle π/4.
    # σw² = 2, σb² = 0: K1 = 2 K0; ReLU: E[φφ](x1, x2) = 2/(2π)(sin π/4 + 3π/4 cos π/4),
    # E[φ'φ'] = 3/8; output NNGP = 2 E[φφ]; NTK = NNGP + 2 · (K1 · 3/8).
    x = np.array([[math.sqrt(2), 0.0], [1.0, 1.0]])
    kernels = keras_ntk.infinite_kernels(_one_hidden_layer("relu", 2.0, 0.0), x)
    s = math.sqrt(2)
    cross_nngp = s / math.pi + 3 * s / 4
    cross_ntk = cross_nngp + 2 * (s * 3 / 8)
    np.testing.assert_allclose(kernels.nngp, [[2, cross_nngp], [cross_nngp, 2]], rtol=1e-12)
    np.testing.assert_allclose(kernels.ntk, [[4, cross_ntk], [cross_ntk, 4]], rtol=1e-12)


def test_one_layer_erf_by_hand():
    # σw² = 1, σb² = 0.5: K1 = K0 + 0.5, so k11 = k22 = 1.5, k12 = √2/2 + 0.5.
    x = np.array([[math.sqrt(2), 0.0], [1.0, 1.0]])
    kernels = keras_ntk.infinite_kernels(_one_hidden_layer("erf", 1.0, 0.5), x)
    k11, k12 = 1.5, math.sqrt(2) / 2 + 0.5
    e_same = 2 / math.pi * math.asin(2 * k11 / (1 + 2 * k11))
    e_cross = 2 / math.pi * math.asin(2 * k12 / (1 + 2 * k11))
    d_same = 4 / math.pi / math.sqrt((1 + 2 * k11) ** 2 - 4 * k11 ** 2)
    d_cross = 4 / math.pi / math.sqrt((1 + 2 * k11) ** 2 - 4 * k12 ** 2)
    nngp = np.array([[e_same, e_cross], [e_cross, e_same]]) + 0.5
    ntk = nngp + np.array([[k11 * d_same, k12 * d_cross], [k12 * d_cross, k11 * d_same]])
    np.testing.assert_allclose(kernels.nngp, nngp, rtol=1e-12)
    np.testing.assert_allclose(kernels.ntk, ntk, rtol=1e-12)


def test_closed_forms_match_gaussian_sampling():
    # The arc-cosine and arcsine expectations, by sampling 2·10⁶ Gaussian pairs.
    rng = np.random.default_rng(0)
    cov = np.array([[1.3, 0.7], [0.7, 0.9]])
    u, v = rng.multivariate_normal([0, 0], cov, size=2_000_000).T
    for activation, phi, dphi in [
        ("relu", lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
        ("erf", _erf, lambda z: 2 / math.sqrt(math.pi) * np.exp(-z * z)),
    ]:
        nngp = tf.constant(cov[0, 1], tf.float64)
        fn = _kernel_recursion._relu if activation == "relu" else _kernel_recursion._erf
        k, t = fn(nngp, tf.constant(1.0, tf.float64), tf.constant(cov[0, 0], tf.float64),
                  tf.constant(cov[1, 1], tf.float64))
        np.testing.assert_allclose(k.numpy(), np.mean(phi(u) * phi(v)), rtol=5e-3)
        np.testing.assert_allclose(t.numpy(), np.mean(dphi(u) * dphi(v)), rtol=5e-3)


def _erf(z):
    return scipy.special.erf(z)


# ------------------------------------------------------------ naive numpy reference


def _same_pad(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2


def _reference(spec, x):
    """Naive recursion on the joint covariance over (example, position) pairs.

    Spatial kernels are always kept in full: K[n, h, w, m, i, j].
    """
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        k = x @ x.T / x.shape[1]
    else:
        k = np.einsum("nhwc,mijc->nhwmij", x, x) / x.shape[-1]
    t = np.zeros_like(k)
    for step in spec:
        kind = step[0]
        if kind == "dense":
            _, w2, b2 = step
            k = w2 * k + b2
            t = k + w2 * t
        elif kind == "conv":
            _, w2, b2, (kh, kw), (sh, sw), padding = step
            n, h, w = k.shape[:3]
            if padding == "same":
                (oh, ph), (ow, pw) = _same_pad(h, kh, sh), _same_pad(w, kw, sw)
            else:
                oh, ph, ow, pw = (h - kh) // sh + 1, 0, (w - kw) // sw + 1, 0
            new_k = np.zeros((n, oh, ow, n, oh, ow))
            new_t = np.zeros_like(new_k)
            for i1 in range(oh):
                for j1 in range(ow):
                    for i2 in range(oh):
                        for j2 in range(ow):
                            for dh in range(kh):
                                for dw in range(kw):
                                    a, b = i1 * sh - ph + dh, j1 * sw - pw + dw
                                    c, d = i2 * sh - ph + dh, j2 * sw - pw + dw
                                    if 0 <= a < h and 0 <= b < w and 0 <= c < h and 0 <= d < w:
                                        new_k[:, i1, j1, :, i2, j2] += k[:, a, b, :, c, d]
                                        new_t[:, i1, j1, :, i2, j2] += t[:, a, b, :, c, d]
            k = w2 / (kh * kw) * new_k + b2
            t = k + w2 / (kh * kw) * new_t
        elif kind in ("relu", "erf"):
            size = k.shape[0] * (int(np.prod(k.shape[1:3])) if k.ndim == 6 else 1)
            flat_k, flat_t = k.reshape(size, size), t.reshape(size, size)
            var = np.diag(flat_k)
            v1, v2 = var[:, None], var[None, :]
            if kind == "relu":
                c = np.clip(flat_k / np.sqrt(v1 * v2), -1, 1)
                theta = np.arccos(c)
                new_k = np.sqrt(v1 * v2) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * c)
                dot = (np.pi - theta) / (2 * np.pi)
            else:
                d = (1 + 2 * v1) * (1 + 2 * v2)
                new_k = 2 / np.pi * np.arcsin(2 * flat_k / np.sqrt(d))
                dot = 4 / np.pi / np.sqrt(d - 4 * flat_k ** 2)
            k, t = new_k.reshape(k.shape), (flat_t * dot).reshape(k.shape)
        elif kind == "avgpool":
            _, (kh, kw), (sh, sw) = step  # 'valid' padding
            n, h, w = k.shape[:3]
            oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
            new_k = np.zeros((n, oh, ow, n, oh, ow))
            new_t = np.zeros_like(new_k)
            for i1 in range(oh):
                for j1 in range(ow):
                    for i2 in range(oh):
                        for j2 in range(ow):
                            win_k = k[:, i1 * sh:i1 * sh + kh, j1 * sw:j1 * sw + kw, :,
                                      i2 * sh:i2 * sh + kh, j2 * sw:j2 * sw + kw]
                            win_t = t[:, i1 * sh:i1 * sh + kh, j1 * sw:j1 * sw + kw, :,
                                      i2 * sh:i2 * sh + kh, j2 * sw:j2 * sw + kw]
                            new_k[:, i1, j1, :, i2, j2] = win_k.mean(axis=(1, 2, 4, 5))
                            new_t[:, i1, j1, :, i2, j2] = win_t.mean(axis=(1, 2, 4, 5))
            k, t = new_k, new_t
        elif kind == "gap":
            k, t = k.mean(axis=(1, 2, 4, 5)), t.mean(axis=(1, 2, 4, 5))
        elif kind == "flatten":
            n, h, w = k.shape[:3]
            k = np.einsum("nhwmhw->nm", k) / (h * w)
            t = np.einsum("nhwmhw->nm", t) / (h * w)
    return k, t


_ARCHITECTURES = {
    "fcn": (
        (6,),
        lambda: [NTKDense(8, 1.4, 0.3, activation="relu"), NTKDense(8, 1.1, 0.2), Erf(),
                 NTKDense(8, 2.0, 0.0), keras.layers.Activation("relu"),
                 keras.layers.Identity(), NTKDense(8, 0.9, 0.5, activation="erf"),
                 NTKDense(1, 1.3, 0.1)],
        [("dense", 1.96, 0.09), ("relu",), ("dense", 1.21, 0.04), ("erf",),
         ("dense", 4.0, 0.0), ("relu",), ("dense", 0.81, 0.25), ("erf",), ("dense", 1.69, 0.01)],
    ),
    "cnn_flatten": (
        (5, 5, 2),
        lambda: [NTKConv2D(4, 3, weight_std=1.4, bias_std=0.3), keras.layers.ReLU(),
                 NTKConv2D(4, 2, strides=2, padding="valid", weight_std=1.2, bias_std=0.2),
                 Erf(), keras.layers.Flatten(), NTKDense(1, 1.1, 0.1)],
        [("conv", 1.96, 0.09, (3, 3), (1, 1), "same"), ("relu",),
         ("conv", 1.44, 0.04, (2, 2), (2, 2), "valid"), ("erf",), ("flatten",),
         ("dense", 1.21, 0.01)],
    ),
    "cnn_gap": (
        (5, 5, 2),
        lambda: [NTKConv2D(4, (2, 3), strides=(2, 1), weight_std=1.5, bias_std=0.2),
                 keras.layers.ReLU(),
                 keras.layers.AveragePooling2D(2, strides=1),
                 NTKConv2D(4, 3, weight_std=1.3, bias_std=0.1), keras.layers.ReLU(),
                 keras.layers.GlobalAveragePooling2D(), NTKDense(3, 1.2, 0.3, activation="relu"),
                 NTKDense(1, 1.0, 0.2)],
        [("conv", 2.25, 0.04, (2, 3), (2, 1), "same"), ("relu",), ("avgpool", (2, 2), (1, 1)),
         ("conv", 1.69, 0.01, (3, 3), (1, 1), "same"), ("relu",), ("gap",),
         ("dense", 1.44, 0.09), ("relu",), ("dense", 1.0, 0.04)],
    ),
    "cnn_pool_flatten": (  # Full 4-D kernels until the pooling, diagonal after it.
        (6, 5, 1),
        lambda: [NTKConv2D(4, 3, padding="valid", weight_std=1.5, bias_std=0.2), Erf(),
                 keras.layers.AveragePooling2D((2, 1), strides=(2, 1)),
                 NTKConv2D(4, 2, weight_std=1.3, bias_std=0.1), keras.layers.ReLU(),
                 keras.layers.Flatten(), NTKDense(1, 1.0, 0.2)],
        [("conv", 2.25, 0.04, (3, 3), (1, 1), "valid"), ("erf",),
         ("avgpool", (2, 1), (2, 1)), ("conv", 1.69, 0.01, (2, 2), (1, 1), "same"),
         ("relu",), ("flatten",), ("dense", 1.0, 0.04)],
    ),
}


def _model(name, functional=False):
    shape, make_layers, _ = _ARCHITECTURES[name]
    if not functional:
        return keras.Sequential([keras.Input(shape), *make_layers()])
    inputs = keras.Input(shape)
    h = inputs
    for layer in make_layers():
        h = layer(h)
    return keras.Model(inputs, h)


@pytest.mark.parametrize("name", sorted(_ARCHITECTURES))
def test_matches_naive_recursion(name):
    shape, _, spec = _ARCHITECTURES[name]
    x = np.random.normal(size=(5, *shape))
    nngp, ntk = _reference(spec, x)
    kernels = keras_ntk.infinite_kernels(_model(name), x)
    # On the diagonal c = 1 up to rounding, and arccos(1 − ε) ≈ √(2ε) ~ 1e-8 turns
    # a rounding difference into a 1e-8 relative difference of E[φ'φ'].
    np.testing.assert_allclose(kernels.nngp, nngp, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(kernels.ntk, ntk, rtol=1e-7, atol=1e-12)
    # Blocks (with a ragged last block), x2 given, and a functional model agree.
    blocked = keras_ntk.infinite_kernels(_model(name, functional=True), x[:3], x,
                                         batch_size=2)
    np.testing.assert_allclose(blocked.ntk, ntk[:3], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(blocked.nngp, nngp[:3], rtol=1e-7, atol=1e-12)


def test_xla_path_matches_naive_recursion():
    # The XLA path (fused polynomial arccos/arcsin, padded equal blocks) against
    # the naive numpy recursion; 7 examples in blocks of 3 pad the last block.
    # (The XLA path of a Flatten head: test_flatten_diagonal_path_equals_full_...)
    name = "cnn_gap"
    shape, _, spec = _ARCHITECTURES[name]
    x = np.random.default_rng(1).normal(size=(7, *shape))
    nngp, ntk = _reference(spec, x)
    kernels = keras_ntk.infinite_kernels(_model(name), x, batch_size=3, jit_compile=True)
    np.testing.assert_allclose(kernels.nngp, nngp, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(kernels.ntk, ntk, rtol=1e-7, atol=1e-12)
    cross = keras_ntk.infinite_kernels(_model(name), x[:6], x[2:], batch_size=3,
                                       jit_compile=True)
    np.testing.assert_allclose(cross.ntk, ntk[:6, 2:], rtol=1e-7, atol=1e-12)
    # Off the diagonal (no arccos(1 − ε) sensitivity) it agrees with the graph path
    # to rounding.
    graph = keras_ntk.infinite_kernels(_model(name), x, jit_compile=False)
    off = ~np.eye(7, dtype=bool)
    np.testing.assert_allclose(kernels.nngp[off], graph.nngp[off], rtol=1e-12)
    np.testing.assert_allclose(kernels.ntk[off], graph.ntk[off], rtol=1e-10)


def test_polynomial_arccos_and_arcsin_match_numpy():
    x = np.concatenate([np.linspace(-1, 1, 200_001), 1 - np.logspace(-17, -1, 300),
                        -1 + np.logspace(-17, -1, 300), [0.5, -0.5, np.nextafter(0.5, 1)]])
    for ours, reference in ((_arcsine._acos, np.arccos), (_arcsine._asin, np.arcsin)):
        got = tf.function(ours, jit_compile=True)(tf.constant(x)).numpy()
        expected = reference(x)
        ulps = np.abs(got - expected) / np.spacing(np.maximum(np.abs(expected), 1e-300))
        assert ulps.max() <= 4, (ours.__name__, ulps.max())
        x32 = x.astype(np.float32)
        np.testing.assert_allclose(ours(tf.constant(x32)).numpy(),
                                   reference(x32.astype(np.float64)), atol=5e-7)


@pytest.mark.parametrize("name", ["cnn_flatten", "cnn_pool_flatten"])
def test_flatten_diagonal_path_equals_full_covariance_path(name):
    # After the last pooling layer only the spatial diagonal is propagated; the
    # same recursion keeping every pair of positions must give the same kernels.
    shape = _ARCHITECTURES[name][0]
    x = np.random.default_rng(2).normal(size=(6, *shape))
    model = _model(name)
    diagonal = _kernel_plan._plan(_kernel_plan._model_ops(model), shape)
    full = _kernel_plan._plan(_kernel_plan._model_ops(model), shape, full_covariance=True)
    assert "diag" in [mode for _, mode, _ in diagonal]
    assert "diag" not in [mode for _, mode, _ in full]
    for jit in (False, True) if name == "cnn_flatten" else (False,):
        compiled = _kernel_recursion._Bound(_kernel_recursion._Compiled(full, jit_compile=jit),
                                   _kernel_recursion._variances_of(full))
        variances = compiled.self_variances(tf.constant(x))
        nngp, ntk = compiled.cross(tf.constant(x), tf.constant(x), variances, variances)
        kernels = keras_ntk.infinite_kernels(model, x, jit_compile=jit)
        np.testing.assert_allclose(kernels.nngp, nngp.numpy(), rtol=1e-12)
        # Diagonal: arccos(1 − ε) sensitivity (see test_matches_naive_recursion).
        off = ~np.eye(6, dtype=bool)
        np.testing.assert_allclose(kernels.ntk[off], ntk.numpy()[off], rtol=1e-11)
        np.testing.assert_allclose(np.diag(kernels.ntk), np.diag(ntk.numpy()), rtol=1e-7)


# neural-tangents 0.6.5 `stax` (JAX, float64, parameterization "ntk") on the same
# architectures and inputs, recorded: stax.serial(Dense(8, 1.4, 0.3), Relu(),
# Dense(8, 1.1, 0.2), Erf(), Dense(1, 1.3, 0.1)) and stax.serial(Conv(4, (2, 3),
# strides=(2, 1), padding="SAME", W_std=1.5, b_std=0.2), Relu(), AvgPool((2, 2),
# strides=(1, 1)), Conv(4, (3, 3), padding="SAME", W_std=1.3, b_std=0.1), Relu(),
# GlobalAvgPool(), Dense(1, 1.0, 0.2)).
_NEURAL_TANGENTS = {
    "fcn": (
        [[0.727208121452623, 0.2711097304911033, 0.10977849986024565],
         [0.2711097304911033, 0.4419873249320304, 0.24175687658069164],
         [0.10977849986024565, 0.24175687658069164, 0.45910210686117436]],
        [[2.3783555173900304, 0.6076579163185641, 0.1295787097670448],
         [0.6076579163185641, 1.2986304185582678, 0.5419503444685433],
         [0.1295787097670448, 0.5419503444685433, 1.3574028346863298]],
    ),
    "cnn_gap": (
        [[0.19171841467582798, 0.19106108270403263, 0.18006675920909865],
         [0.19106108270403263, 0.20700448363140578, 0.18384726226669218],
         [0.1800667592090987, 0.18384726226669224, 0.1927094591970332]],
        [[0.32101952617531, 0.2962341443152169, 0.26291635982900097],
         [0.29623414431521694, 0.3508069218535554, 0.2647683282304901],
         [0.26291635982900097, 0.26476832823049024, 0.31150032159926344]],
    ),
}


def test_matches_recorded_neural_tangents():
    fcn = keras.Sequential([
        keras.Input((6,)), NTKDense(8, 1.4, 0.3, activation="relu"), NTKDense(8, 1.1, 0.2),
        Erf(), NTKDense(1, 1.3, 0.1)])
    cnn = keras.Sequential([
        keras.Input((6, 6, 2)),
        NTKConv2D(4, (2, 3), strides=(2, 1), weight_std=1.5, bias_std=0.2), keras.layers.ReLU(),
        keras.layers.AveragePooling2D(2, strides=1),
        NTKConv2D(4, 3, weight_std=1.3, bias_std=0.1), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), NTKDense(1, 1.0, 0.2)])
    inputs = {"fcn": np.random.default_rng(1).normal(size=(3, 6)),
              "cnn_gap": np.random.default_rng(0).normal(size=(3, 6, 6, 2))}
    for name, model in (("fcn", fcn), ("cnn_gap", cnn)):
        kernels = keras_ntk.infinite_kernels(model, inputs[name])
        nngp, ntk = _NEURAL_TANGENTS[name]
        np.testing.assert_allclose(kernels.nngp, nngp, rtol=1e-12)
        np.testing.assert_allclose(kernels.ntk, ntk, rtol=1e-8)


def test_float32_close_to_float64():
    x = np.random.normal(size=(4, 5, 5, 2))
    k64 = keras_ntk.infinite_kernels(_model("cnn_gap"), x)
    k32 = keras_ntk.infinite_kernels(_model("cnn_gap"), x, dtype="float32")
    assert k32.ntk.dtype == np.float32
    # float32's arccos(1 − ε) on the diagonal costs ~1e-4 there (ε ≈ 6e-8).
    assert _relative_error(k32.ntk, k64.ntk) < 1e-4
    assert _relative_error(k32.nngp, k64.nngp) < 1e-5


def test_deep_diagonal_reaches_q_star():
    # Depth 12 Erf network with σw² = σb² = 0.5 (the variance map contracts by
    # about 0.3 per layer): the NNGP diagonal reaches the fixed point q*.
    layers = [keras.Input((3,))]
    for _ in range(12):
        layers += [NTKDense(4, math.sqrt(0.5), math.sqrt(0.5)), Erf()]
    layers.append(NTKDense(1, math.sqrt(0.5), math.sqrt(0.5)))
    kernels = keras_ntk.infinite_kernels(keras.Sequential(layers), np.random.normal(size=(3, 3)))
    np.testing.assert_allclose(np.diag(kernels.nngp), mean_field.q_star("erf", 0.5, 0.5),
                               rtol=1e-6)


# ------------------------------------------------------------ errors


@pytest.mark.parametrize("layer,name", [
    (lambda: keras.layers.Dense(4, kernel_initializer="orthogonal", name="ortho"), "ortho"),
    (lambda: keras.layers.Dense(4, bias_initializer="ones", name="ones_bias"), "ones_bias"),
    (lambda: keras.layers.Activation("softmax", name="softmax_act"), "softmax_act"),
    (lambda: keras.layers.PReLU(name="prelu"), "prelu"),
    (lambda: keras.layers.LayerNormalization(name="ln"), "ln"),
])
def test_unsupported_layer_is_named(layer, name):
    model = keras.Sequential([keras.Input((3,)), NTKDense(4), layer(), NTKDense(1)])
    with pytest.raises(ValueError, match=name) as error:
        keras_ntk.infinite_kernels(model, np.ones((2, 3)))
    assert "NTKDense" in str(error.value) and "GlobalAveragePooling1D/2D" in str(error.value)


def test_non_chain_and_spatial_output_are_refused():
    inputs = keras.Input((3,))
    h = NTKDense(3)(inputs)
    outputs = keras.layers.Add()([h, keras.layers.ReLU()(h)])
    with pytest.raises(ValueError, match="correlated"):
        keras_ntk.infinite_kernels(keras.Model(inputs, outputs), np.ones((2, 3)))
    model = keras.Sequential([keras.Input((4, 4, 1)), NTKConv2D(2, 3)])
    with pytest.raises(ValueError, match="Flatten or global average pooling"):
        keras_ntk.infinite_kernels(model, np.ones((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="Received:"):
        keras_ntk.infinite_kernels(_model("fcn"), np.ones((2, 6)), batch_size=0)


# ------------------------------------------------------------ tfp kernel


def test_psd_kernel_gaussian_process_matches_gp_inference():
    import tensorflow_probability as tfp

    model = _model("cnn_gap")
    x_train = np.random.normal(size=(6, 5, 5, 2))
    x_test = np.random.normal(size=(3, 5, 5, 2))
    y_train = np.random.normal(size=(6,))
    for kind in ("nngp", "ntk"):
        kernel = infinite.NTKPsdKernel(model, kind=kind)
        index = 0 if kind == "nngp" else 1
        k_train = keras_ntk.infinite_kernels(model, x_train)[index]
        k_test_train = keras_ntk.infinite_kernels(model, x_test, x_train)[index]
        k_test = keras_ntk.infinite_kernels(model, x_test)[index]
        # rtol 1e-7: the diagonal's arccos(1 − ε) rounding, see test_matches_naive_recursion.
        np.testing.assert_allclose(kernel.matrix(x_test, x_train).numpy(), k_test_train,
                                   rtol=1e-7)
        # Pairwise application (the GP's marginal variances use it).
        np.testing.assert_allclose(kernel.apply(x_test, x_test).numpy(), np.diag(k_test),
                                   rtol=1e-7)
        prior = tfp.distributions.GaussianProcess(kernel, index_points=x_train, jitter=0.0)
        np.testing.assert_allclose(prior.covariance().numpy(), k_train, rtol=1e-7)
        posterior = tfp.distributions.GaussianProcessRegressionModel(
            kernel, index_points=x_test, observation_index_points=x_train,
            observations=y_train, observation_noise_variance=0.05,
            predictive_noise_variance=0.0, jitter=0.0)
        mean, covariance = keras_ntk.predict.gp_inference(
            k_train, k_test_train, k_test, y_train, 0.05)
        np.testing.assert_allclose(posterior.mean().numpy(), mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(posterior.covariance().numpy(), covariance,
                                   rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------ Monte Carlo


def _mc_model(name, width):
    if name == "fcn":
        return keras.Sequential([
            keras.Input((6,)), NTKDense(width, 1.4, 0.3, activation="relu"),
            NTKDense(width, 1.4, 0.3), Erf(), NTKDense(1, 1.2, 0.2)])
    if name == "cnn_flatten":
        return keras.Sequential([
            keras.Input((5, 5, 1)), NTKConv2D(width, 3, weight_std=1.4, bias_std=0.3),
            keras.layers.ReLU(), NTKConv2D(width, 3, strides=2, weight_std=1.4, bias_std=0.3),
            keras.layers.ReLU(), keras.layers.Flatten(), NTKDense(1, 1.2, 0.2)])
    return keras.Sequential([
        keras.Input((5, 5, 1)), NTKConv2D(width, 3, weight_std=1.4, bias_std=0.3),
        keras.layers.ReLU(), NTKConv2D(width, 3, weight_std=1.4, bias_std=0.3),
        keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), NTKDense(1, 1.2, 0.2)])


def _empirical_kernels(model, x):
    """NNGP from penultimate features; eNTK from a naive float64 Jacobian."""
    x = tf.constant(x, tf.float64)
    features = keras.Model(model.inputs, model.layers[-2].output)(x)
    head = model.layers[-1]
    features = tf.reshape(features, [x.shape[0], -1]).numpy()
    nngp = head.weight_std ** 2 * features @ features.T / features.shape[1] + head.bias_std ** 2
    with tf.GradientTape() as tape:
        out = model(x)
    jacobians = tape.jacobian(out, model.trainable_variables)
    j = np.concatenate([tf.reshape(g, [x.shape[0], -1]).numpy() for g in jacobians], axis=1)
    return nngp, j @ j.T


def _monte_carlo_errors(name, widths, seeds, x):
    """Relative errors per width: (NNGP, NTK) of the seed-mean kernels, and
    (NNGP, NTK) averaged over seeds of each network's own error."""
    reference = keras_ntk.infinite_kernels(_mc_model(name, 1), x)
    of_mean, per_seed = {}, {}
    for width in widths:
        nngps, ntks = [], []
        for seed in range(seeds):
            keras.utils.set_random_seed(seed)
            nngp, ntk = _empirical_kernels(_mc_model(name, width), x)
            nngps.append(nngp)
            ntks.append(ntk)
        of_mean[width] = (_relative_error(np.mean(nngps, 0), reference.nngp),
                          _relative_error(np.mean(ntks, 0), reference.ntk))
        per_seed[width] = (np.mean([_relative_error(k, reference.nngp) for k in nngps]),
                           np.mean([_relative_error(k, reference.ntk) for k in ntks]))
    return of_mean, per_seed


_MC_INPUTS = {"fcn": (6,), "cnn_flatten": (5, 5, 1), "cnn_gap": (5, 5, 1)}


@pytest.mark.parametrize("name", sorted(_MC_INPUTS))
def test_monte_carlo_error_falls_with_width(name, float64_keras):
    # Each network's kernels deviate from the limit by O(1/sqrt(width)): a 32×
    # wider network should be about 5.7× closer (error averaged over 3 seeds).
    x = np.random.default_rng(1).normal(size=(3, *_MC_INPUTS[name]))
    small, large = (16, 512) if name != "fcn" else (32, 1024)
    _, errors = _monte_carlo_errors(name, (small, large), 3, x)
    for kind in (0, 1):  # NNGP, NTK
        assert errors[large][kind] < 0.5 * errors[small][kind], errors
        assert errors[large][kind] < 0.1, errors


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_MC_INPUTS))
def test_monte_carlo_width_2048(name, float64_keras):
    # The seed-mean kernels of width-2048 networks are within 3% of the limit
    # (measured 0.3% for the NNGP of width-1024 CNNs over 30 seeds).
    x = np.random.default_rng(2).normal(size=(5, *_MC_INPUTS[name]))
    of_mean, per_seed = _monte_carlo_errors(name, (128, 2048), 4, x)
    for kind in (0, 1):
        assert per_seed[2048][kind] < 0.5 * per_seed[128][kind], per_seed
        assert of_mean[2048][kind] < 0.03, of_mean


@pytest.mark.parametrize(
    "jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)]  # XLA: ~3 min to compile
)
def test_diagonal_is_exact_deep_in_the_chaotic_phase(jit_compile):
    """Θ(x, x) of a depth-100 Erf FCN at σw² = 4 (χ1 > 1) against the float64 q-map.

    c = 1 is unstable there: computed as a pair (c = k12/√(k11 k22) rounded), the
    diagonal came out 1e5 times too small (found by study C).
    """
    depth, w2, b2 = 100, 4.0, 0.05
    layers = [keras.Input((5,))]
    for _ in range(depth):
        layers += [keras_ntk.NTKDense(4, weight_std=np.sqrt(w2), bias_std=np.sqrt(b2)),
                   keras_ntk.Erf()]
    layers.append(keras_ntk.NTKDense(1, weight_std=np.sqrt(w2), bias_std=np.sqrt(b2)))
    x = np.random.default_rng(0).normal(size=(7, 5))
    kernels = keras_ntk.infinite_kernels(keras.Sequential(layers), x, jit_compile=jit_compile)
    q, theta = np.sum(x * x, axis=1) / 5, None
    for _ in range(depth):
        q = w2 * q + b2
        theta = q if theta is None else q + w2 * theta
        # Erf at c = 1: arcsine kernel and its derivative kernel.
        q, theta = (2 / np.pi) * np.arcsin(2 * q / (1 + 2 * q)), theta * (4 / np.pi) / np.sqrt(1 + 4 * q)
    q = w2 * q + b2
    theta = q + w2 * theta
    np.testing.assert_allclose(np.diag(kernels.nngp), q, rtol=1e-12)
    np.testing.assert_allclose(np.diag(kernels.ntk), theta, rtol=1e-10)
    # Off the diagonal the chaotic phase decorrelates: entries far below the diagonal.
    off = kernels.ntk[~np.eye(7, dtype=bool)]
    assert np.all(np.abs(off) < 1e-3 * theta.min())


# ------------------------------------------------------------ all depths, compile cache


def _fcn(depth, w2, b2, activation="erf", inputs=5):
    layers = [keras.Input((inputs,))]
    for _ in range(depth):
        layers += [NTKDense(4, math.sqrt(w2), math.sqrt(b2)),
                   Erf() if activation == "erf" else keras.layers.ReLU()]
    layers.append(NTKDense(1, math.sqrt(w2), math.sqrt(b2)))
    return keras.Sequential(layers)


@pytest.mark.parametrize("activation,w2,b2,deepest", [("erf", 3.0, 0.05, 12),
                                                      ("relu", 1.5, 0.1, 5)])
def test_all_depths_equal_per_depth_calls(activation, w2, b2, deepest):
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(9, 5)), rng.normal(size=(4, 5))
    model = _fcn(deepest, w2, b2, activation)
    every = keras_ntk.infinite_kernels(model, x1, all_depths=True, batch_size=4)
    cross = keras_ntk.infinite_kernels(model, x1, x2, all_depths=True, batch_size=3)
    assert every.ntk.shape == (deepest + 1, 9, 9) and cross.nngp.shape == (deepest + 1, 9, 4)
    # Per-depth references at a few depths (each is its own compiled architecture).
    for depth in sorted({0, 1, 2, deepest // 2, deepest}):
        single = keras_ntk.infinite_kernels(_fcn(depth, w2, b2, activation), x1)
        single_cross = keras_ntk.infinite_kernels(_fcn(depth, w2, b2, activation), x1, x2)
        for got, expected in ((every.nngp[depth], single.nngp), (every.ntk[depth], single.ntk),
                              (cross.nngp[depth], single_cross.nngp),
                              (cross.ntk[depth], single_cross.ntk)):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=0)
    # The last index is the model's own kernel.
    np.testing.assert_allclose(every.ntk[-1], keras_ntk.infinite_kernels(model, x1).ntk,
                               rtol=1e-10)


def test_all_depths_needs_a_dense_layer_on_flat_inputs():
    model = keras.Sequential([keras.Input((4, 4, 1)), NTKConv2D(2, 3), keras.layers.ReLU(),
                              keras.layers.GlobalAveragePooling2D()])
    with pytest.raises(ValueError, match="Received: model="):
        keras_ntk.infinite_kernels(model, np.ones((2, 4, 4, 1)), all_depths=True)
    with pytest.raises(TypeError, match="Received: all_depths="):
        keras_ntk.infinite_kernels(_fcn(1, 1.0, 0.1), np.ones((2, 5)), all_depths="yes")


def test_variances_are_arguments_of_one_compiled_recursion(monkeypatch):
    # A sweep over σw² (a phase-diagram row) compiles the architecture once;
    # every σ still gets its own kernel (checked against the naive recursion).
    monkeypatch.setattr(infinite, "_EAGER_MAX_ENTRIES", 0)  # Small calls run eagerly.
    _kernel_recursion._COMPILED.clear()
    x = np.random.default_rng(6).normal(size=(6, 5))
    for w2 in (0.5, 1.0, 2.0, 3.0):
        kernels = keras_ntk.infinite_kernels(_fcn(3, w2, 0.1), x)
        k = x @ x.T / 5
        t = np.zeros_like(k)
        for _ in range(3):
            k, t = w2 * k + 0.1, w2 * k + 0.1 + w2 * t
            d = np.sqrt(np.outer(1 + 2 * np.diag(k), 1 + 2 * np.diag(k)))
            k, t = (2 / np.pi * np.arcsin(np.clip(2 * k / d, -1, 1)),
                    t * 4 / np.pi / np.sqrt(np.maximum(d ** 2 - 4 * k ** 2, 0) + np.eye(6) * 0))
        k, t = w2 * k + 0.1, w2 * k + 0.1 + w2 * t
        off = ~np.eye(6, dtype=bool)
        np.testing.assert_allclose(kernels.nngp, k, rtol=1e-12)
        np.testing.assert_allclose(kernels.ntk[off], t[off], rtol=1e-10)
    assert len(_kernel_recursion._COMPILED) == 1
    compiled = next(iter(_kernel_recursion._COMPILED.values()))
    assert compiled.cross.experimental_get_tracing_count() == 1


def test_compile_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_kernel_recursion, "_COMPILED_LIMIT", 3)
    _kernel_recursion._COMPILED.clear()
    x = np.ones((2, 5))
    for depth in range(6):
        keras_ntk.infinite_kernels(_fcn(depth, 1.0, 0.1), x)
    assert len(_kernel_recursion._COMPILED) == 3
    # The most recently used structures are kept.
    assert [_kernel_recursion._structure(_kernel_plan._architecture(_fcn(d, 1.0, 0.1), (5,)))
            for d in (3, 4, 5)] == list(_kernel_recursion._COMPILED)
