"""Infinite-width kernels of graphs (Add, Concatenate, nested models), plain Keras layers in
the standard parameterization, and the added layers, against neural-tangents 0.6.5 values
recorded by benchmarks/infinite_nt_reference.py (tests/data/infinite_nt_reference.npz), and
against Monte-Carlo estimates and sampled initializers."""
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from keras_ntk import NTKConv2D, NTKDense, _kernel_layers, _kernel_plan
from keras_ntk.layers import Erf

REFERENCE = np.load(os.path.join(os.path.dirname(__file__), "data", "infinite_nt_reference.npz"))
L = keras.layers


def _res_block(h):
    main = keras.Sequential([L.ReLU(), NTKDense(8, 1.3, 0.2), Erf(), NTKDense(8, 1.1, 0.1)])
    return L.Add()([main(h), h])


def resnet_fcn():
    inputs = keras.Input((5,))
    h = NTKDense(8, 1.5, 0.1)(inputs)
    h = _res_block(_res_block(h))
    return keras.Model(inputs, NTKDense(1, 1.2, 0.1)(L.ReLU()(h)))


def _wrn_block(h, channels, strides, mismatch):
    main = L.ReLU()(h)
    main = NTKConv2D(channels, 3, strides, "same", weight_std=1.4, bias_std=0.1)(main)
    main = L.ReLU()(main)
    main = NTKConv2D(channels, 3, 1, "same", weight_std=1.3, bias_std=0.05)(main)
    shortcut = (NTKConv2D(channels, 3, strides, "same", weight_std=1.2, bias_std=0.1)(h)
                if mismatch else h)
    return L.Add()([main, shortcut])


def wrn_cnn():
    inputs = keras.Input((6, 6, 2))
    h = NTKConv2D(4, 3, weight_std=1.4, bias_std=0.1)(inputs)
    h = _wrn_block(_wrn_block(h, 4, 1, False), 6, 2, True)
    h = L.AveragePooling2D(2, strides=1)(L.ReLU()(h))
    outputs = NTKDense(1, 1.1, 0.05)(L.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs)


def concat_cnn():
    inputs = keras.Input((5, 5, 2))
    h = L.ReLU()(NTKConv2D(3, 3, weight_std=1.3, bias_std=0.1)(inputs))
    a = NTKConv2D(2, 3, weight_std=1.2, bias_std=0.1)(h)
    b = Erf()(NTKConv2D(5, 1, weight_std=1.5, bias_std=0.0)(h))
    h = L.Flatten()(L.Concatenate()([a, b]))
    return keras.Model(inputs, NTKDense(1, 1.1, 0.05)(h))


def standard_fcn():
    return keras.Sequential([
        keras.Input((5,)), L.Dense(16, activation="relu"),
        L.Dense(12, activation="tanh", kernel_initializer="he_normal",
                bias_initializer=keras.initializers.RandomNormal(stddev=0.2)),
        L.Dense(3, kernel_initializer=keras.initializers.VarianceScaling(1.5, "fan_out", "uniform"),
                use_bias=False)])


def standard_cnn():
    return keras.Sequential([
        keras.Input((5, 5, 2)),
        L.Conv2D(4, 3, padding="same", kernel_initializer="he_uniform",
                 bias_initializer=keras.initializers.TruncatedNormal(stddev=0.3)),
        L.ReLU(), L.Conv2D(6, 3, strides=2, kernel_initializer="lecun_normal"),
        L.Activation("gelu"), L.Flatten(),
        L.Dense(2, kernel_initializer=keras.initializers.RandomNormal(stddev=0.1))])


def layers_fcn():
    return keras.Sequential([
        keras.Input((5,)), L.Dense(10), L.LayerNormalization(center=False, scale=False),
        L.LeakyReLU(0.1), L.Dropout(0.3), NTKDense(8, 1.4, 0.1), L.Activation(keras.ops.sin),
        NTKDense(8, 1.2, 0.1), L.Activation(tf.math.sign), NTKDense(8, 1.1, 0.2),
        L.Activation("sigmoid"), L.Identity(), NTKDense(8, 1.3, 0.1),
        L.Activation(keras.ops.cos), NTKDense(1, 1.0, 0.0)])


def conv1d():
    return keras.Sequential([
        keras.Input((7, 2)), L.Conv1D(4, 3, padding="same"), L.ReLU(), L.AveragePooling1D(2),
        L.Conv1D(3, 2, kernel_initializer="he_normal", activation="elu"),
        L.GlobalAveragePooling1D(), L.Dense(1)])


# Relative tolerance per case: 1e-9 for closed forms (the NTK diagonal carries the
# arccos(1 − ε) rounding); numerical cases agree to the quadrature (both sides use the same
# 25 × 25 Gauss-Hermite rule, except GELU where neural-tangents has a closed form).
CASES = {"resnet_fcn": (resnet_fcn, 1e-8), "wrn_cnn": (wrn_cnn, 1e-8),
         "concat_cnn": (concat_cnn, 1e-8), "standard_fcn": (standard_fcn, 1e-8),
         "standard_cnn": (standard_cnn, 1e-4), "layers_fcn": (layers_fcn, 1e-8),
         "conv1d": (conv1d, 1e-8)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_recorded_neural_tangents(name):
    build, rtol = CASES[name]
    x = REFERENCE[f"{name}_x"]
    kernels = keras_ntk.infinite_kernels(build(), x)
    for kind in ("nngp", "ntk"):
        expected = REFERENCE[f"{name}_{kind}"]
        np.testing.assert_allclose(getattr(kernels, kind), expected, rtol=rtol,
                                   atol=rtol * np.abs(expected).max(), err_msg=f"{name} {kind}")


def test_cross_kernel_and_blocks_of_a_residual_cnn_match_the_square_kernel():
    x = REFERENCE["wrn_cnn_x"]
    model = wrn_cnn()
    full = keras_ntk.infinite_kernels(model, x)
    cross = keras_ntk.infinite_kernels(model, x[:2], x[2:], batch_size=2)
    np.testing.assert_allclose(cross.ntk, full.ntk[:2, 2:], rtol=1e-10)
    np.testing.assert_allclose(cross.nngp, full.nngp[:2, 2:], rtol=1e-10)


def test_average_and_dead_branches():
    """Average = Add / n²; a branch the output does not read changes nothing."""
    x = REFERENCE["resnet_fcn_x"]
    inputs = keras.Input((5,))
    a, b = NTKDense(8, 1.5, 0.1)(inputs), NTKDense(8, 1.2, 0.3)(inputs)
    NTKDense(3)(inputs)  # Dead branch.
    average = keras.Model(inputs, NTKDense(1)(L.ReLU()(L.Average()([a, b]))))
    added = keras.Model(inputs, NTKDense(1)(L.ReLU()(L.Add()([a, b]))))
    k_avg, k_add = (keras_ntk.infinite_kernels(m, x) for m in (average, added))
    # ReLU is positively homogeneous: halving both summands scales the next NNGP by 1/4.
    np.testing.assert_allclose(k_avg.nngp - 0.0, (k_add.nngp - 0.0) / 4, rtol=1e-12)


def test_initializer_variances_match_samples():
    """Var(W) from each initializer's formula against 4·10⁵ draws of Keras' own initializer."""
    shape = (400, 1000)
    layer = L.Dense(1, name="probe")
    for initializer in ("glorot_uniform", "glorot_normal", "he_normal", "he_uniform",
                        "lecun_normal", "lecun_uniform",
                        keras.initializers.VarianceScaling(0.7, "fan_avg", "truncated_normal"),
                        keras.initializers.TruncatedNormal(stddev=0.3),
                        keras.initializers.RandomUniform(-0.2, 0.2),
                        keras.initializers.RandomNormal(stddev=0.05)):
        initializer = keras.initializers.get(initializer)
        expected = _kernel_layers._init_variance(initializer, shape, layer, "kernel")
        sample = np.asarray(initializer(shape, dtype="float64"))
        assert abs(sample.var() / expected - 1) < 0.01, (initializer, sample.var(), expected)


@pytest.mark.parametrize("layer,reason", [
    (lambda: L.Dense(4, kernel_initializer="orthogonal"), "no known iid variance"),
    (lambda: L.Dense(4, kernel_initializer=lambda shape, dtype=None: tf.ones(shape)),
     "no known iid variance"),
    (lambda: L.Dense(4, bias_initializer="ones"), "non-zero constant"),
    (lambda: L.LayerNormalization(), "center=True or scale=True"),
    (lambda: L.Activation("softmax"), "not an elementwise activation"),
    (lambda: L.MaxPooling1D(1), "MaxPooling1D"),
    (lambda: L.ReLU(max_value=6.0), "derivative jumps"),
    (lambda: L.Activation("hard_sigmoid"), "derivative jumps"),
])
def test_refusals_give_the_reason(layer, reason):
    model = keras.Sequential([keras.Input((3, 2)), layer(), L.Flatten(), NTKDense(1)])
    with pytest.raises(ValueError, match=reason):
        keras_ntk.infinite_kernels(model, np.ones((2, 3, 2)))
    assert _kernel_plan.unsupported_layers(model)[0].reason


def test_layer_norm_of_a_non_centred_input_and_shared_layers_are_refused():
    model = keras.Sequential([keras.Input((3,)), NTKDense(4), L.ReLU(),
                              L.LayerNormalization(center=False, scale=False), NTKDense(1)])
    with pytest.raises(ValueError, match="centred"):
        keras_ntk.infinite_kernels(model, np.ones((2, 3)))
    inputs = keras.Input((3,))
    shared = NTKDense(3)
    outputs = NTKDense(1)(shared(L.ReLU()(shared(inputs))))
    with pytest.raises(ValueError, match="more than once"):
        keras_ntk.infinite_kernels(keras.Model(inputs, outputs), np.ones((2, 3)))


def test_numerical_activation_matches_closed_forms():
    """Gauss-Hermite (25 × 25) against the closed forms on 200 random (k11, k22, c), c ≤ 0.99:
    the accuracy stated in docs/infinite.md (smooth: ~1e-6; kinks converge slowly)."""
    from keras_ntk import _kernel_recursion as rec

    rng = np.random.default_rng(1)
    k11, k22 = rng.uniform(0.1, 1.0, 200), rng.uniform(0.1, 1.0, 200)
    k12 = rng.uniform(-0.99, 0.99, 200) * np.sqrt(k11 * k22)
    ones = np.ones(200)
    for fn, closed, nngp_tol, ntk_tol in ((tf.math.erf, rec._erf, 3e-6, 3e-5),
                                          (tf.nn.relu, rec._relu, 3e-2, 0.3),
                                          (tf.math.sin, lambda *a: rec._sin_cos(*a, "sin"), 1e-12, 1e-12)):
        expected = [np.asarray(v) for v in closed(k12, ones, k11, k22)]
        got = [np.asarray(v) for v in rec._numerical(tf.constant(k12), ones, k11, k22, fn, 25)]
        scale = np.abs(expected[0]).max(), np.abs(expected[1]).max()
        assert np.abs(got[0] - expected[0]).max() <= nngp_tol * scale[0], fn
        assert np.abs(got[1] - expected[1]).max() <= ntk_tol * scale[1], fn


def _arccos_kernels(k, t):
    """numpy ReLU step on a full N × N kernel (arc-cosine kernel)."""
    d = np.sqrt(np.diag(k))
    c = np.clip(k / np.outer(d, d), -1, 1)
    theta = np.arccos(c)
    return (np.outer(d, d) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * c),
            t * (np.pi - theta) / (2 * np.pi))


def test_batch_norm_standard_dense_by_hand():
    """Dense(16) → BatchNormalization (fresh, trainable γ, β) → ReLU → Dense(1), Keras defaults,
    against the recursion written out in numpy (Glorot: σw² = 2·fan_in/(fan_in + fan_out))."""
    x = REFERENCE["resnet_fcn_x"]
    model = keras.Sequential([keras.Input((5,)), L.Dense(16), L.BatchNormalization(),
                              L.ReLU(), L.Dense(1)])
    k0 = x @ x.T / 5
    k1, t1 = 2 * 5 / 21 * k0, 5 * k0 + 1
    s = 1 / (1 + 1e-3)  # γ²/(moving variance + ε) at initialization.
    k2, t2 = s * k1, s * k1 + 1 + s * t1  # γ contributes x̂·x̂' = K/(var + ε), β contributes 1.
    k3, t3 = _arccos_kernels(k2, t2)
    expected = (2 * 16 / 17 * k3, 16 * k3 + 1 + 2 * 16 / 17 * t3)
    kernels = keras_ntk.infinite_kernels(model, x)
    # 1e-8: numpy's diagonal carries the arccos(1 − ε) rounding, ours is exact (c = 1).
    np.testing.assert_allclose(kernels.nngp, expected[0], rtol=1e-8)
    np.testing.assert_allclose(kernels.ntk, expected[1], rtol=1e-8)
    frozen = keras.Sequential([keras.Input((5,)), L.Dense(16, trainable=False),
                               L.BatchNormalization(trainable=False), L.ReLU(), L.Dense(1)])
    np.testing.assert_allclose(keras_ntk.infinite_kernels(frozen, x).ntk,
                               16 * k3 + 1, rtol=1e-8)  # Only the readout is trained.


# ------------------------------------------------------------ Monte Carlo of wide finite nets


def _standard_resnet(width):
    """A residual FCN of plain Keras layers: He/Glorot/LeCun initializers, BatchNorm."""
    inputs = keras.Input((6,))
    h = L.Dense(width, kernel_initializer="he_normal",
                bias_initializer=keras.initializers.RandomNormal(stddev=0.1))(inputs)
    a = L.Dense(width, kernel_initializer="lecun_uniform")(L.ReLU()(L.Dense(width)(L.ReLU()(h))))
    h = L.ReLU()(L.BatchNormalization()(L.Add()([a, h])))
    return keras.Model(inputs, L.Dense(1)(h))


def _standard_wrn(width):
    """Conv2D stem and one WideResNet block (standard parameterization), GAP, Dense."""
    inputs = keras.Input((5, 5, 1))
    h = L.Conv2D(width, 3, padding="same", kernel_initializer="he_normal")(inputs)
    a = L.Conv2D(width, 3, padding="same")(L.ReLU()(h))
    a = L.Conv2D(width, 3, padding="same", kernel_initializer="he_uniform")(L.ReLU()(a))
    h = L.GlobalAveragePooling2D()(L.ReLU()(L.Add()([a, h])))
    return keras.Model(inputs, L.Dense(1)(h))


def _empirical(model, x):
    """NNGP from the readout's input features (Glorot readout, zero bias: Var(W) = 2/(n + 1));
    eNTK from a naive float64 Jacobian over the trainable variables."""
    x = tf.constant(x, tf.float64)
    features = keras.Model(model.inputs, model.layers[-1].input)(x, training=False).numpy()
    n = features.shape[1]
    nngp = 2 / (n + 1) * features @ features.T
    with tf.GradientTape() as tape:
        out = model(x, training=False)
    jacobians = tape.jacobian(out, model.trainable_variables)
    j = np.concatenate([tf.reshape(g, [x.shape[0], -1]).numpy() for g in jacobians], axis=1)
    return nngp, j @ j.T


def _relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _standard_errors(build, shape, widths, seeds, x_seed):
    """Per width: mean over seeds of each network's relative (NNGP, NTK) error against
    infinite_kernels of that same model (standard parameterization: Θ grows with width),
    and the error of the seed-mean kernels."""
    x = np.random.default_rng(x_seed).normal(size=(4, *shape))
    per_seed, of_mean = {}, {}
    for width in widths:
        errors, nngps, ntks, limit = [], [], [], None
        for seed in range(seeds):
            keras.utils.set_random_seed(seed)
            model = build(width)
            limit = keras_ntk.infinite_kernels(model, x)
            nngp, ntk = _empirical(model, x)
            nngps.append(nngp)
            ntks.append(ntk)
            errors.append((_relative(nngp, limit.nngp), _relative(ntk, limit.ntk)))
        per_seed[width] = np.mean(errors, 0)
        of_mean[width] = (_relative(np.mean(nngps, 0), limit.nngp),
                          _relative(np.mean(ntks, 0), limit.ntk))
    return per_seed, of_mean


def test_monte_carlo_standard_resnet(float64_keras):
    per_seed, _ = _standard_errors(_standard_resnet, (6,), (32, 1024), 3, 1)
    for kind in (0, 1):  # NNGP, NTK: O(1/√width), 32× wider ≈ 5.7× closer.
        assert per_seed[1024][kind] < 0.5 * per_seed[32][kind], per_seed
        assert per_seed[1024][kind] < 0.15, per_seed


@pytest.mark.slow
@pytest.mark.parametrize("build,shape,widths", [
    (_standard_resnet, (6,), (128, 2048)),
    (_standard_wrn, (5, 5, 1), (32, 512)),  # 512 channels: 4.7M weights per Jacobian row.
])
def test_monte_carlo_standard_residual_wide(build, shape, widths, float64_keras):
    # 16× wider: each network ≈ 4× closer to its limit; the 4-seed mean within 5%.
    per_seed, of_mean = _standard_errors(build, shape, widths, 4, 2)
    small, large = widths
    for kind in (0, 1):
        assert per_seed[large][kind] < 0.5 * per_seed[small][kind], per_seed
        assert of_mean[large][kind] < 0.05, of_mean
