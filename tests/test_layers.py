"""Tests of keras_ntk.layers: the NTK parameterization, against hand computations."""
import inspect
import math

import keras
import numpy as np
import pytest
import scipy.special

import keras_ntk
from keras_ntk.layers import Erf, NTKConv2D, NTKDense


def _naive_conv(x, w, strides, padding):
    """Cross-correlation by explicit loops (channels last), Keras 'same' padding."""
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    if padding == "same":
        outs, pads = [], []
        for size, k, s in ((h, kh, strides[0]), (wd, kw, strides[1])):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            outs.append(out)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    else:
        outs = [(h - kh) // strides[0] + 1, (wd - kw) // strides[1] + 1]
    y = np.zeros((n, outs[0], outs[1], f))
    for i in range(outs[0]):
        for j in range(outs[1]):
            patch = x[:, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw, :]
            y[:, i, j, :] = np.einsum("nabc,abcf->nf", patch, w)
    return y


@pytest.mark.parametrize("activation", [None, "relu", "erf"])
def test_dense_matches_formula(activation):
    layer = NTKDense(7, weight_std=1.7, bias_std=0.3, activation=activation)
    x = np.random.normal(size=(5, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x)).astype(np.float64)
    w = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    b = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
    pre = 1.7 / math.sqrt(4) * x.astype(np.float64) @ w + 0.3 * b
    expected = {None: pre, "relu": np.maximum(pre, 0), "erf": scipy.special.erf(pre)}[activation]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_size,strides,padding",
                         [(3, 1, "same"), ((2, 3), 2, "same"), (3, 2, "valid"), (2, (1, 2), "valid")])
def test_conv_matches_naive_loops(kernel_size, strides, padding):
    layer = NTKConv2D(3, kernel_size, strides=strides, padding=padding, weight_std=1.3,
                      bias_std=0.2)
    x = np.random.normal(size=(2, 7, 6, 2)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x)).astype(np.float64)
    w = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    b = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
    fan_in = w.shape[0] * w.shape[1] * 2
    expected = 1.3 / math.sqrt(fan_in) * _naive_conv(
        x.astype(np.float64), w, layer.strides, padding) + 0.2 * b
    assert y.shape == expected.shape
    assert layer.compute_output_shape(x.shape) == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_weights_are_standard_normal():
    dense = NTKDense(400)
    dense.build((None, 500))
    conv = NTKConv2D(64, 5)
    conv.build((None, 8, 8, 64))
    for variable in (dense.kernel, conv.kernel):
        values = keras.ops.convert_to_numpy(variable).ravel()
        # 200k draws: mean and std within a few standard errors.
        assert abs(values.mean()) < 0.01
        assert abs(values.std() - 1.0) < 0.01
    bias = keras.ops.convert_to_numpy(dense.bias)
    assert abs(bias.std() - 1.0) < 0.15


def test_erf_layer():
    x = np.linspace(-3, 3, 13).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(Erf()(x)), scipy.special.erf(x),
                               rtol=1e-6, atol=1e-6)


def test_keras_round_trip(tmp_path):
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        NTKConv2D(4, (3, 2), strides=(1, 2), padding="valid", weight_std=1.5, bias_std=0.1),
        Erf(),
        keras.layers.Flatten(),
        NTKDense(3, weight_std=1.2, bias_std=0.4, activation="relu"),
    ])
    x = np.random.normal(size=(3, 6, 6, 2)).astype("float32")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)),
                                  keras.ops.convert_to_numpy(loaded(x)))
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    assert loaded.layers[0].get_config()["kernel_size"] == (3, 2)
    assert loaded.layers[-1].get_config()["activation"] == "relu"


@pytest.mark.parametrize("cls,args", [
    (NTKDense, {"units": 3, "weight_std": 2.0, "bias_std": 0.5, "activation": "erf"}),
    (NTKConv2D, {"filters": 2, "kernel_size": (3, 3), "strides": (2, 1), "padding": "valid",
                 "weight_std": 1.1, "bias_std": 0.0}),
])
def test_get_config_is_constructor_arguments(cls, args):
    config = cls(**args).get_config()
    for key, value in args.items():
        assert config[key] == value
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert "output" not in inspect.signature(cls.__init__).parameters


def test_registered_names():
    assert keras.saving.get_registered_name(NTKDense) == "keras_ntk>NTKDense"
    assert keras.saving.get_registered_name(NTKConv2D) == "keras_ntk>NTKConv2D"
    assert keras.saving.get_registered_name(Erf) == "keras_ntk>Erf"
    assert keras_ntk.NTKDense is NTKDense


@pytest.mark.parametrize("make", [
    lambda: NTKDense(3, activation="tanh"),
    lambda: NTKDense(0),
    lambda: NTKDense(3, weight_std=-1.0),
    lambda: NTKConv2D(3, 3, padding="causal"),
    lambda: NTKConv2D(3, (3, 0)),
])
def test_invalid_arguments(make):
    with pytest.raises(ValueError, match="Received:"):
        make()
