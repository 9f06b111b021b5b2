"""Tests of keras_ntk.predict against direct solves and explicit gradient descent."""
import numpy as np
import pytest
import scipy.linalg

from keras_ntk import predict


def _problem(n=12, m=5, features=30, outputs=2, seed=0):
    """A linear model f(x) = φ(x)·w with explicit features: Θ = Φ Φᵀ."""
    rng = np.random.default_rng(seed)
    phi_train = rng.normal(size=(n, features))
    phi_test = rng.normal(size=(m, features))
    y = rng.normal(size=(n, outputs))
    return phi_train, phi_test, y


def test_kernel_regression_matches_direct_solve():
    phi, phi_test, y = _problem()
    k, k_test = phi @ phi.T, phi_test @ phi.T
    expected = k_test @ np.linalg.inv(k + 0.3 * np.eye(len(k))) @ y
    np.testing.assert_allclose(predict.kernel_regression(k, k_test, y, ridge=0.3), expected,
                               rtol=1e-10)
    # Vector targets, ridge 0, and an offset f0: f0* + Θ*Θ⁻¹(y − f0).
    f0, f0_test = np.full(12, 0.5), np.full(5, -0.2)
    expected = f0_test + k_test @ np.linalg.solve(k, y[:, 0] - f0)
    got = predict.kernel_regression(k, k_test, y[:, 0], fx_train_0=f0, fx_test_0=f0_test)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_gradient_flow_matches_matrix_exponential():
    phi, phi_test, y = _problem()
    k, k_test = phi @ phi.T / 30, phi_test @ phi.T / 30
    lr, t = 0.7, 9.0
    f0 = np.random.default_rng(3).normal(size=y.shape)
    f_train, f_test = predict.gradient_descent_mse(k, y, lr, t, k_test, fx_train_0=f0)
    propagator = scipy.linalg.expm(-lr * t * k / y.size)
    np.testing.assert_allclose(f_train, y + propagator @ (f0 - y), rtol=1e-9)
    expected_test = k_test @ np.linalg.solve(k, (np.eye(12) - propagator) @ (y - f0))
    np.testing.assert_allclose(f_test, expected_test, rtol=1e-8)
    # An array of times gives a leading axis.
    both = predict.gradient_descent_mse(k, y, lr, np.array([0.0, t]), fx_train_0=f0)
    np.testing.assert_allclose(both[0], f0, rtol=1e-12)
    np.testing.assert_allclose(both[1], f_train, rtol=1e-12)


def test_discrete_gd_matches_iterated_steps_on_linear_model():
    # The weights of f(x) = φ(x)·w follow w ← w − η ∇L with L = ‖Φw − y‖²/(2nO);
    # the closed form with discrete=True must give the same outputs after t steps.
    phi, phi_test, y = _problem()
    k, k_test = phi @ phi.T, phi_test @ phi.T
    lr = 0.5 * predict.max_learning_rate(k, y.size)
    w = np.random.default_rng(4).normal(size=(30, 2))
    f0, f0_test = phi @ w, phi_test @ w
    for _ in range(37):
        w = w - lr * phi.T @ (phi @ w - y) / y.size
    f_train, f_test = predict.gradient_descent_mse(
        k, y, lr, 37, k_test, fx_train_0=f0, fx_test_0=f0_test, discrete=True)
    np.testing.assert_allclose(f_train, phi @ w, rtol=1e-9)
    np.testing.assert_allclose(f_test, phi_test @ w, rtol=1e-9)
    # Gradient flow is the small-step limit: 4000 steps of η/100 ≈ 40 of η.
    w = np.zeros((30, 2))
    for _ in range(4000):
        w = w - lr / 100 * phi.T @ (phi @ w - y) / y.size
    _, f_test = predict.gradient_descent_mse(k, y, lr, 40.0, k_test)
    np.testing.assert_allclose(f_test, phi_test @ w, rtol=2e-2, atol=2e-2)


def test_infinite_time_is_kernel_regression():
    phi, phi_test, y = _problem()
    k, k_test = phi @ phi.T, phi_test @ phi.T
    f0, f0_test = np.ones_like(y), np.zeros((5, 2))
    for discrete in (False, True):
        f_train, f_test = predict.gradient_descent_mse(
            k, y, 0.9 * predict.max_learning_rate(k, y.size), np.inf, k_test,
            fx_train_0=f0, fx_test_0=f0_test, discrete=discrete)
        np.testing.assert_allclose(f_train, y, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(
            f_test, predict.kernel_regression(k, k_test, y, fx_train_0=f0, fx_test_0=f0_test),
            rtol=1e-8)


def test_rank_deficient_kernel_keeps_null_space():
    # n > features: Θ has a null space, where the residual never moves.
    phi, phi_test, y = _problem(n=12, features=5)
    k, k_test = phi @ phi.T, phi_test @ phi.T
    f_train, f_test = predict.gradient_descent_mse(k, y, 1.0, np.inf, k_test)
    projection = phi @ np.linalg.pinv(phi)
    np.testing.assert_allclose(f_train, projection @ y, atol=1e-8)
    np.testing.assert_allclose(f_test, phi_test @ np.linalg.lstsq(phi, y, rcond=None)[0],
                               rtol=1e-6, atol=1e-8)


def test_gp_inference_matches_formula():
    phi, phi_test, y = _problem()
    k, k_test_train, k_test = phi @ phi.T, phi_test @ phi.T, phi_test @ phi_test.T
    inverse = np.linalg.inv(k + 0.1 * np.eye(12))
    mean, covariance = predict.gp_inference(k, k_test_train, k_test, y, noise=0.1)
    np.testing.assert_allclose(mean, k_test_train @ inverse @ y, rtol=1e-9)
    np.testing.assert_allclose(covariance, k_test - k_test_train @ inverse @ k_test_train.T,
                               rtol=1e-8, atol=1e-10)
    _, variances = predict.gp_inference(k, k_test_train, np.diag(k_test), y[:, 0], noise=0.1)
    np.testing.assert_allclose(variances, np.diag(covariance), rtol=1e-8)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_max_learning_rate_is_the_stability_edge(momentum):
    phi, _, y = _problem(outputs=3)
    k = phi @ phi.T
    lr = predict.max_learning_rate(k, y.size, momentum=momentum)
    largest = np.linalg.eigvalsh(k)[-1]
    np.testing.assert_allclose(lr, 2 * (1 + momentum) * y.size / largest, rtol=1e-10)
    assert predict.max_learning_rate(k) == pytest.approx(2 * 12 / largest)

    def final_residual(rate):
        w = previous = np.zeros((30, 3))
        for _ in range(3000):  # Heavy-ball gradient descent on ‖Φw − y‖²/(2nO).
            w, previous = (w - rate * phi.T @ (phi @ w - y) / y.size
                           + momentum * (w - previous)), w
        return np.linalg.norm(phi @ w - y)

    start = np.linalg.norm(y)
    assert final_residual(0.98 * lr) < start
    assert final_residual(1.02 * lr) > 1e3 * start


@pytest.mark.parametrize("call", [
    lambda: predict.kernel_regression(np.eye(3), np.ones((2, 4)), np.ones(3)),
    lambda: predict.kernel_regression(np.eye(3), np.ones((2, 3)), np.ones(3), ridge=-1.0),
    lambda: predict.gradient_descent_mse(np.eye(3), np.ones(3), 0.0, 1.0),
    lambda: predict.gradient_descent_mse(np.eye(3), np.ones(3), 1.0, -1.0),
    lambda: predict.gp_inference(np.eye(3), np.ones((2, 3)), np.eye(3), np.ones(3), 0.1),
    lambda: predict.max_learning_rate(np.ones((2, 3))),
    lambda: predict.max_learning_rate(np.eye(3), momentum=1.5),
])
def test_invalid_arguments(call):
    with pytest.raises(ValueError, match="Received:"):
        call()
