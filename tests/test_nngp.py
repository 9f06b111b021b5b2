"""Tests of `keras_ntk.empirical_nngp` (keras_ntk/nngp.py) against explicit numpy features."""

import numpy as np
import pytest

import keras_ntk
from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    Residual, conv_map, inputs_for, mlp, plain_graphs)

pytestmark = pytest.mark.usefixtures("plain_graphs")


def test_empirical_nngp_of_penultimate_and_named_layers_matches_explicit_features():
    model = mlp()
    x1, x2 = inputs_for("mlp", 6), inputs_for("mlp", 4, seed=1)
    model(x1)
    first, second = model.layers[0], model.layers[1]

    def explicit(x):  # the two hidden layers written out in numpy (float64)
        w1, b1 = (np.asarray(v, np.float64) for v in first.weights)
        w2, b2 = (np.asarray(v, np.float64) for v in second.weights)
        h1 = np.tanh(x.astype(np.float64) @ w1 + b1)
        return h1, np.maximum(h1 @ w2 + b2, 0)

    (h1_a, h2_a), (h1_b, h2_b) = explicit(x1), explicit(x2)
    # Penultimate features (width 10): averaged over the feature axis.
    np.testing.assert_allclose(keras_ntk.empirical_nngp(model, x1, x2, batch_size=4),
                               h2_a @ h2_b.T / 10, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras_ntk.empirical_nngp(model, x1),
                               h2_a @ h2_a.T / 10, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras_ntk.empirical_nngp(model, x1, layer=first.name),
                               h1_a @ h1_a.T / 12, rtol=1e-5, atol=1e-7)
    # A callable (how a subclassed model names its features), trace_axes=().
    got = keras_ntk.empirical_nngp(model, x1, x2, layer=lambda x: first(x), trace_axes=())
    np.testing.assert_allclose(got, np.einsum("ni,mj->nmij", h1_a, h1_b), rtol=1e-5, atol=1e-6)


def test_empirical_nngp_of_a_feature_map_conventions():
    model = conv_map()
    x = inputs_for("conv_map", 3)
    phi = np.asarray(model.layers[0](x), np.float64)  # (3, 4, 4, 3)
    got = keras_ntk.empirical_nngp(model, x)
    assert got.shape == (3, 3, 4, 4, 4, 4)
    np.testing.assert_allclose(got, np.einsum("nhwc,mHWc->nmhHwW", phi, phi) / 3,
                               rtol=1e-5, atol=1e-7)
    got = keras_ntk.empirical_nngp(model, x, trace_axes=(1, 2, 3))
    np.testing.assert_allclose(got, np.einsum("nhwc,mhwc->nm", phi, phi) / 48,
                               rtol=1e-5, atol=1e-7)


def test_empirical_nngp_errors():
    model = Residual()
    x = inputs_for("residual", 3)
    model(x)
    with pytest.raises(ValueError, match="callable.*Received"):
        keras_ntk.empirical_nngp(model, x)
    with pytest.raises(ValueError, match="Received: layer='nope'"):
        keras_ntk.empirical_nngp(mlp(), inputs_for("mlp", 3), layer="nope")
