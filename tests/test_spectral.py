"""Tests of `keras_ntk.ntk_eigsh` and `keras_ntk.nystrom_ntk`.

References: the kernel from whole-batch `tf.GradientTape.jacobian` Jacobians
contracted in float64, its `numpy.linalg.eigh` spectrum and dense numpy solves.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import keras_ntk
from keras_ntk import _batching


@pytest.fixture(autouse=True)
def _plain_graphs(monkeypatch):
    monkeypatch.setattr(_batching, "_JIT", "0")


def naive_kernel(model, x1, x2=None, weights=None, trace=True):
    """float64 J(x1) J(x2)ᵀ: (N1, N2) averaged over logits, or (N1, O, N2, O)."""
    weights = model.trainable_weights if weights is None else weights

    def jacobian(x):
        with tf.GradientTape() as tape:
            y = model(x, training=False)
        jac = tape.jacobian(y, weights)
        jac = [np.zeros((*y.shape, *w.shape)) if j is None else j for j, w in zip(jac, weights)]
        return np.concatenate(
            [np.reshape(np.asarray(j, np.float64), (*y.shape, -1)) for j in jac], -1)

    j1 = jacobian(x1)
    j2 = j1 if x2 is None else jacobian(x2)
    if trace:
        return np.einsum("noz,moz->nm", j1, j2) / j1.shape[1]
    return np.einsum("noz,mpz->nomp", j1, j2)


def digits(n, offset=0):
    data = load_digits().data[offset:offset + n] / 16.0
    return data.astype("float32")


def digits_mlp():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


def small_cnn():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


# ----------------------------------------------------------------- ntk_eigsh


def test_eigsh_top_20_eigenpairs_on_digits_match_numpy_eigh():
    model = digits_mlp()
    x = digits(200)
    kernel = naive_kernel(model, x)
    expected_values, expected_vectors = np.linalg.eigh(kernel)
    expected_values, expected_vectors = expected_values[::-1], expected_vectors[:, ::-1]
    values, vectors = keras_ntk.ntk_eigsh(model, x, 20, batch_size=64)
    assert values.shape == (20,) and vectors.shape == (200, 20)
    np.testing.assert_allclose(values, expected_values[:20], rtol=1e-4)
    # Eigenvectors: unit norm, and eigenvectors of the reference kernel.
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, rtol=1e-6)
    residual = np.linalg.norm(kernel @ vectors - vectors * values, axis=0)
    assert np.all(residual < 1e-4 * values[0]), residual
    # The first (well separated) eigenvector itself, up to sign.
    assert abs(vectors[:, 0] @ expected_vectors[:, 0]) > 1 - 1e-6


@pytest.mark.parametrize("implementation", ["ntvp", "structured"])
def test_eigsh_untraced_logits_and_variables_subset(implementation):
    model = small_cnn()
    x = digits(30).reshape(-1, 8, 8, 1)
    # trace_axes=(): Θ is (N·O) × (N·O), index n·O + o.
    kernel = naive_kernel(model, x, trace=False).reshape(90, 90)
    expected = np.linalg.eigvalsh(kernel)[::-1][:6]
    values, vectors = keras_ntk.ntk_eigsh(model, x, 6, trace_axes=(),
                                          implementation=implementation)
    np.testing.assert_allclose(values, expected, rtol=1e-4)
    assert vectors.shape == (30, 3, 6)
    # Kernel of the head alone (a linear probe).
    head = model.layers[-1]
    kernel = naive_kernel(model, x, weights=head.trainable_weights)
    expected = np.linalg.eigvalsh(kernel)[::-1][:4]
    values = keras_ntk.ntk_eigsh(model, x, 4, variables=[head], return_eigenvectors=False,
                                 implementation=implementation)
    np.testing.assert_allclose(values, expected, rtol=1e-4)


def test_eigsh_progress_and_errors(capsys):
    model = digits_mlp()
    x = digits(40)
    keras_ntk.ntk_eigsh(model, x, 3, verbose=1, return_eigenvectors=False)
    assert "products in" in capsys.readouterr().out
    with pytest.raises(ValueError, match="0 < k < 40.*Received: k=40"):
        keras_ntk.ntk_eigsh(model, x, 40)
    inputs = keras.Input((64,))
    two = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(3)(inputs)])
    with pytest.raises(ValueError, match="single output.*Received: model with 2 outputs"):
        keras_ntk.ntk_eigsh(two, x, 3)


# ----------------------------------------------------------------- nystrom_ntk


def test_nystrom_error_estimates_against_the_exact_kernel():
    model = digits_mlp()
    x = digits(200)
    kernel = naive_kernel(model, x)
    approx = keras_ntk.nystrom_ntk(model, x, 40, error_columns=60, seed=1)
    assert approx.factor.shape == (200, approx.rank) and approx.rank == 40
    assert approx.landmarks.shape == (40,)
    residual = kernel - approx.matrix()
    # Landmark columns are reproduced exactly.
    assert np.abs(residual[:, approx.landmarks]).max() < 1e-4 * np.abs(kernel).max()
    # The trace of the PSD residual: exact, and a bound on its norms.
    np.testing.assert_allclose(approx.trace, np.trace(kernel), rtol=1e-5)
    np.testing.assert_allclose(approx.trace_error, np.trace(residual), rtol=1e-3)
    assert approx.trace_error >= np.linalg.norm(residual) >= np.linalg.norm(residual, 2)
    np.testing.assert_allclose(approx.relative_trace_error,
                               np.trace(residual) / np.trace(kernel), rtol=1e-3)
    # The sampled relative Frobenius error estimates the actual one.
    actual = np.linalg.norm(residual) / np.linalg.norm(kernel)
    assert 0.5 * actual < approx.sampled_error < 2.0 * actual, (approx.sampled_error, actual)
    # More landmarks: smaller error.
    finer = keras_ntk.nystrom_ntk(model, x, 120, error_columns=0, seed=1)
    assert finer.trace_error < approx.trace_error and finer.sampled_error is None


def test_nystrom_kernel_regression_low_rank_solve():
    model = digits_mlp()
    x_train, x_test = digits(60), digits(25, offset=100)
    y = np.random.default_rng(0).normal(size=(60, 2))
    ridge = 1e-2
    # All points as landmarks: Θ̂ = Θ, the prediction of exact kernel regression.
    exact = keras_ntk.nystrom_ntk(model, x_train, np.arange(60))
    k_train = naive_kernel(model, x_train)
    k_test = naive_kernel(model, x_test, x_train)
    expected = k_test @ np.linalg.solve(k_train + ridge * np.eye(60), y)
    got = exact.kernel_regression(y, ridge, x_test=x_test)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    # Fewer landmarks: equals the dense solve with Θ̂ = L Lᵀ and Θ̂* = L* Lᵀ.
    approx = keras_ntk.nystrom_ntk(model, x_train, 20)
    factor, test_factor = approx.factor, approx.features(x_test)
    dense = test_factor @ factor.T @ np.linalg.solve(factor @ factor.T + ridge * np.eye(60), y)
    np.testing.assert_allclose(approx.kernel_regression(y, ridge, x_test=x_test), dense,
                               rtol=1e-6, atol=1e-8)
    # Training predictions, vector targets and initial outputs.
    f0 = np.full(60, 0.5)
    train = approx.kernel_regression(y[:, 0], ridge, fx_train_0=f0, fx_test_0=f0)
    dense = factor @ factor.T @ np.linalg.solve(factor @ factor.T + ridge * np.eye(60),
                                                 y[:, 0] - f0) + f0
    assert train.shape == (60,)
    np.testing.assert_allclose(train, dense, rtol=1e-6, atol=1e-8)


def test_nystrom_errors():
    model = digits_mlp()
    x = digits(20)
    with pytest.raises(ValueError, match="between 1 and N=20. Received: landmarks=0"):
        keras_ntk.nystrom_ntk(model, x, 0)
    with pytest.raises(ValueError, match="distinct indices.*Received"):
        keras_ntk.nystrom_ntk(model, x, np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="N×N kernel.*Received: trace_axes=\\(\\)"):
        keras_ntk.nystrom_ntk(model, x, 5, trace_axes=())
    approx = keras_ntk.nystrom_ntk(model, x, 5, error_columns=0)
    with pytest.raises(ValueError, match="Received: ridge=-1"):
        approx.kernel_regression(np.zeros(20), -1)
