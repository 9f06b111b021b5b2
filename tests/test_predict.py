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
    lambda: predict.gradient_descent_mse(np.eye(3), np.ones(3), 1.0, 2, momentum=0.9),
    lambda: predict.gradient_descent_mse(np.eye(3), np.ones(3), 1.0, 2.5, momentum=0.9,
                                         discrete=True),
    lambda: predict.gradient_descent_mse(np.eye(3), np.ones(3), 1.0, 2, momentum=1.0,
                                         discrete=True),
    lambda: predict.gradient_descent_mse_ensemble(np.eye(3), None, np.ones(3), 1.0, 2),
    lambda: predict.gradient_descent_mse_ensemble(np.eye(3), np.eye(3), np.ones(3), 1.0, 2,
                                                  np.ones((2, 3))),
    lambda: predict.gradient_descent_mse_ensemble(np.eye(3), np.eye(3), np.ones(3), 1.0, 2,
                                                  np.ones((2, 3)), np.ones((2, 3)), np.eye(3)),
])
def test_invalid_arguments(call):
    with pytest.raises(ValueError, match="Received:"):
        call()



def _with_nan(shape, index, value=np.nan):
    array = np.ones(shape)
    array[index] = value
    return array


_K = np.eye(4) + 0.5


@pytest.mark.parametrize("call, where", [
    (lambda: predict.kernel_regression(_with_nan((4, 4), (2, 1)), np.ones((2, 4)), np.ones(4)),
     r"k_train\[2, 1\]=nan"),
    (lambda: predict.kernel_regression(_K, _with_nan((2, 4), (1, 3), np.inf), np.ones(4)),
     r"k_test_train\[1, 3\]=inf"),
    (lambda: predict.kernel_regression(_K, np.ones((2, 4)), _with_nan((4,), 3)),
     r"y_train\[3\]=nan"),
    (lambda: predict.kernel_regression(_K, np.ones((2, 4)), np.ones(4),
                                       fx_train_0=_with_nan((4,), 0)),
     r"fx_train_0\[0\]=nan"),
    (lambda: predict.gradient_descent_mse(_K, _with_nan((4, 2), (2, 1), -np.inf), 1.0, 3.0),
     r"y_train\[2, 1\]=-inf"),
    (lambda: predict.gradient_descent_mse(_K, np.ones(4), 1.0, 3.0, _with_nan((2, 4), (0, 2))),
     r"k_test_train\[0, 2\]=nan"),
    (lambda: predict.gradient_descent_mse_ensemble(_K, _with_nan((4, 4), (3, 3)), np.ones(4),
                                                   1.0, 2.0), r"nngp_train\[3, 3\]=nan"),
    (lambda: predict.gradient_descent_mse_ensemble(_K, _K, np.ones(4), 1.0, 2.0, np.ones((2, 4)),
                                                   np.ones((2, 4)), _with_nan((2,), 1)),
     r"nngp_test\[1\]=nan"),
    (lambda: predict.gp_inference(_K, np.ones((2, 4)), _with_nan((2, 2), (1, 0)), np.ones(4), 0.1),
     r"k_test\[1, 0\]=nan"),
    (lambda: predict.max_learning_rate(_with_nan((4, 4), (0, 1), np.inf)),
     r"k_train\[0, 1\]=inf"),
])
def test_non_finite_values_are_refused_before_any_solve(call, where, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("a solver ran before the arguments were checked")

    for name in ("_solve_psd", "_eigenmodes"):
        monkeypatch.setattr(predict, name, no_work)
    monkeypatch.setattr(predict.scipy.linalg, "eigvalsh", no_work)
    with pytest.raises(ValueError, match=where) as raised:
        call()
    assert "non-finite" in str(raised.value)


@pytest.mark.parametrize("call, received", [
    (lambda: predict.kernel_regression(_K, np.ones((2, 4)), np.ones(4), ridge=np.nan),
     "ridge=nan"),
    (lambda: predict.kernel_regression(_K, np.ones((2, 4)), np.ones(4), ridge="big"),
     "ridge='big'"),
    (lambda: predict.gp_inference(_K, np.ones((2, 4)), np.eye(2), np.ones(4), noise=True),
     "noise=True"),
    (lambda: predict.gradient_descent_mse(_K, np.ones(4), "fast", 1.0), "learning_rate='fast'"),
    (lambda: predict.max_learning_rate(_K, momentum=np.inf), "momentum=inf"),
])
def test_numeric_arguments_are_typed_and_ranged(call, received):
    with pytest.raises((TypeError, ValueError), match=f"Received: {received}"):
        call()


# ------------------------------------------------------------ momentum


def _heavy_ball(phi, phi_test, y, w, lr, momentum, steps):
    """Outputs after `steps` of keras-style SGD momentum (v ← m v − η∇L, w ← w + v)."""
    velocity = np.zeros_like(w)
    for _ in range(steps):
        velocity = momentum * velocity - lr * phi.T @ (phi @ w - y) / y.size
        w = w + velocity
    return phi @ w, phi_test @ w


@pytest.mark.parametrize("momentum,fraction", [(0.9, 0.5), (0.9, 0.97), (0.3, 0.2)])
def test_momentum_matches_iterated_heavy_ball_steps(momentum, fraction):
    # fraction of the largest stable rate: 0.97 with m = 0.9 makes complex roots
    # (oscillating modes) for most eigenvalues.
    phi, phi_test, y = _problem()
    k, k_test = phi @ phi.T, phi_test @ phi.T
    lr = fraction * predict.max_learning_rate(k, y.size, momentum=momentum)
    w = np.random.default_rng(5).normal(size=(30, 2))
    f0, f0_test = phi @ w, phi_test @ w
    steps = np.array([0, 1, 2, 37, 200])
    f_train, f_test = predict.gradient_descent_mse(
        k, y, lr, steps, k_test, fx_train_0=f0, fx_test_0=f0_test, discrete=True,
        momentum=momentum)
    assert f_train.shape == (5, 12, 2) and f_test.shape == (5, 5, 2)
    for i, step in enumerate(steps):
        expected_train, expected_test = _heavy_ball(phi, phi_test, y, w, lr, momentum, step)
        np.testing.assert_allclose(f_train[i], expected_train, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(f_test[i], expected_test, rtol=1e-8, atol=1e-10)
    # Far beyond convergence: kernel regression from f0.
    _, f_test = predict.gradient_descent_mse(k, y, lr, np.inf, k_test, fx_train_0=f0,
                                             fx_test_0=f0_test, discrete=True, momentum=momentum)
    np.testing.assert_allclose(
        f_test, predict.kernel_regression(k, k_test, y, fx_train_0=f0, fx_test_0=f0_test),
        rtol=1e-8)


def test_momentum_small_steps_approach_flow_with_rescaled_rate():
    # Heavy-ball with step η and momentum m → gradient flow at rate η/(1 − m).
    phi, phi_test, y = _problem()
    k, k_test = phi @ phi.T / 30, phi_test @ phi.T / 30
    lr, m, steps = 0.02, 0.5, 2000
    _, momentum_test = predict.gradient_descent_mse(k, y, lr, steps, k_test, discrete=True,
                                                    momentum=m)
    _, flow_test = predict.gradient_descent_mse(k, y, lr / (1 - m), steps, k_test)
    np.testing.assert_allclose(momentum_test, flow_test, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------ ensembles


def _joint_kernels(n=7, m=3, seed=0):
    """Joint (train + test) NTK Θ = ΦΦᵀ/p and NNGP K = ΨΨᵀ/q of a linear model
    f(x) = ψ(x)·w0/√q + φ(x)·δ/√p: f0 ~ N(0, K), tangent features φ."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n + m, 20)) / np.sqrt(20)
    psi = rng.normal(size=(n + m, 15)) / np.sqrt(15)
    return phi, psi, rng.normal(size=(n, 2))


def _split(joint, n):
    return joint[:n, :n], joint[n:, :n], joint[n:, n:]


@pytest.mark.parametrize("momentum", [0.0, 0.8])
def test_ensemble_matches_gradient_descent_on_joint_covariance(momentum):
    # Independent reference: f(t) = M f0 + c is affine in the joint initial
    # outputs f0 ~ N(0, K); iterating the (heavy-ball) GD steps on M (starting at
    # the identity) and c gives mean c and covariance M K Mᵀ, with no
    # eigendecomposition.
    phi, psi, y = _joint_kernels()
    n = len(y)
    ntk, nngp = phi @ phi.T, psi @ psi.T
    lr = 0.6 * predict.max_learning_rate(ntk[:n, :n], y.size, momentum=momentum)
    steps = 25
    linear, offset = np.eye(len(ntk)), np.zeros((len(ntk), 2))
    linear_velocity, offset_velocity = np.zeros_like(linear), np.zeros_like(offset)
    for _ in range(steps):
        linear_velocity = momentum * linear_velocity - lr * ntk[:, :n] @ linear[:n] / y.size
        offset_velocity = momentum * offset_velocity - lr * ntk[:, :n] @ (offset[:n] - y) / y.size
        linear, offset = linear + linear_velocity, offset + offset_velocity
    covariance = linear @ nngp @ linear.T
    ntk_train, ntk_test_train, _ = _split(ntk, n)
    nngp_train, nngp_test_train, nngp_test = _split(nngp, n)
    test = predict.gradient_descent_mse_ensemble(
        ntk_train, nngp_train, y, lr, steps, ntk_test_train, nngp_test_train, nngp_test,
        discrete=True, momentum=momentum)
    np.testing.assert_allclose(test.mean, offset[n:], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(test.covariance, covariance[n:, n:], rtol=1e-8, atol=1e-10)
    train = predict.gradient_descent_mse_ensemble(ntk_train, nngp_train, y, lr, steps,
                                                  discrete=True, momentum=momentum)
    np.testing.assert_allclose(train.mean, offset[:n], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(train.covariance, covariance[:n, :n], rtol=1e-8, atol=1e-10)
    # Variances only, vector targets, several times.
    variances = predict.gradient_descent_mse_ensemble(
        ntk_train, nngp_train, y[:, 0], lr * 2, np.array([0, steps // 2]), ntk_test_train,
        nngp_test_train, np.diag(nngp_test), discrete=True, momentum=momentum)
    assert variances.mean.shape == (2, 3) and variances.covariance.shape == (2, 3)
    np.testing.assert_allclose(variances.covariance[0], np.diag(nngp_test), rtol=1e-10)
    np.testing.assert_allclose(variances.mean[0], 0.0, atol=1e-12)


def test_ensemble_mean_is_gradient_descent_from_zero_outputs():
    phi, _, y = _joint_kernels(seed=4)
    n = len(y)
    ntk_train, ntk_test_train, _ = _split(phi @ phi.T, n)
    times = np.array([[1.0, 5.0], [20.0, np.inf]])
    got = predict.gradient_descent_mse_ensemble(ntk_train, None, y, 0.7, times, ntk_test_train,
                                                compute_cov=False)
    assert got.covariance is None and got.mean.shape == (2, 2, 3, 2)
    _, expected = predict.gradient_descent_mse(ntk_train, y, 0.7, times, ntk_test_train)
    np.testing.assert_allclose(got.mean, expected, rtol=1e-12, atol=1e-14)


def test_ensemble_at_infinity_matches_closed_forms():
    phi, psi, y = _joint_kernels(seed=1)
    n = len(y)
    ntk_train, ntk_test_train, _ = _split(phi @ phi.T + 0.1 * psi @ psi.T, n)
    nngp_train, nngp_test_train, nngp_test = _split(psi @ psi.T, n)
    # NTK ensemble (Lee et al. 2019, eq. 16): mean Θ*Θ⁻¹Y, covariance
    # K** − Θ*Θ⁻¹K*ᵀ − K*Θ⁻¹Θ*ᵀ + Θ*Θ⁻¹KΘ⁻¹Θ*ᵀ.
    a = np.linalg.solve(ntk_train, ntk_test_train.T).T
    expected = (nngp_test - a @ nngp_test_train.T - nngp_test_train @ a.T
                + a @ nngp_train @ a.T)
    for discrete in (False, True):
        got = predict.gradient_descent_mse_ensemble(
            ntk_train, nngp_train, y, 1.0, np.inf, ntk_test_train, nngp_test_train, nngp_test,
            discrete=discrete)
        np.testing.assert_allclose(got.mean, a @ y, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got.covariance, expected, rtol=1e-6, atol=1e-9)
    # Θ = K: the noise-free GP posterior, at t = inf and (nearly) at t = 10⁶ steps.
    mean, covariance = predict.gp_inference(nngp_train, nngp_test_train, nngp_test, y, 0.0)
    for t in (np.inf, 1e6):
        got = predict.gradient_descent_mse_ensemble(
            nngp_train, nngp_train, y, 1.0, t, nngp_test_train, nngp_test_train, nngp_test)
        np.testing.assert_allclose(got.mean, mean, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(got.covariance, covariance, rtol=1e-6, atol=1e-8)
    # Training points at t = inf: the mean interpolates, no variance is left.
    train = predict.gradient_descent_mse_ensemble(ntk_train, nngp_train, y, 1.0, np.inf)
    np.testing.assert_allclose(train.mean, y, rtol=1e-8)
    np.testing.assert_allclose(train.covariance, 0.0, atol=1e-10)


def test_ensemble_gradient_flow_matches_matrix_exponential():
    phi, psi, y = _joint_kernels(seed=3)
    n = len(y)
    ntk_train, ntk_test_train, _ = _split(phi @ phi.T, n)
    nngp_train, nngp_test_train, nngp_test = _split(psi @ psi.T, n)
    lr, t = 0.8, 6.0
    propagator = scipy.linalg.expm(-lr * t * ntk_train / y.size)
    # f* = f0* + A (Y − f0) with A = Θ*Θ⁻¹(I − E): joint map of (f0, f0*).
    a = ntk_test_train @ np.linalg.solve(ntk_train, np.eye(n) - propagator)
    joint = np.concatenate([-a, np.eye(len(nngp_test))], axis=1)
    nngp = psi @ psi.T
    got = predict.gradient_descent_mse_ensemble(
        ntk_train, nngp_train, y, lr, t, ntk_test_train, nngp_test_train, nngp_test)
    np.testing.assert_allclose(got.mean, a @ y, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got.covariance, joint @ nngp @ joint.T, rtol=1e-7, atol=1e-9)
    train = predict.gradient_descent_mse_ensemble(ntk_train, nngp_train, y, lr, t)
    np.testing.assert_allclose(train.mean, y - propagator @ y, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(train.covariance, propagator @ nngp_train @ propagator,
                               rtol=1e-8, atol=1e-10)


def test_ensemble_matches_monte_carlo_over_linear_models():
    # Linear models f(x) = ψ(x)·w0 + φ(x)·δ with w0 ~ N(0, I) (so f0 ~ N(0, K)),
    # δ trained by 20 discrete gradient-descent steps; 20000 draws.
    phi, psi, y = _joint_kernels(seed=2)
    y = y[:, :1]
    n = len(y)
    rng = np.random.default_rng(7)
    draws = 20000
    outputs = psi @ rng.normal(size=(psi.shape[1], draws))  # (n + m, draws)
    delta = np.zeros((phi.shape[1], draws))
    ntk, nngp = phi @ phi.T, psi @ psi.T
    lr, steps = 0.5 * predict.max_learning_rate(ntk[:n, :n], y.size), 20
    for _ in range(steps):
        residual = phi[:n] @ delta + outputs[:n] - y
        delta -= lr * phi[:n].T @ residual / y.size
    trained = outputs + phi @ delta
    got = predict.gradient_descent_mse_ensemble(
        ntk[:n, :n], nngp[:n, :n], y, lr, steps, ntk[n:, :n], nngp[n:, :n], nngp[n:, n:],
        discrete=True)
    # Monte-Carlo errors: about 0.7% of the variances for 20000 draws.
    scale = np.diag(nngp[n:, n:]).max()
    np.testing.assert_allclose(got.mean[:, 0], trained[n:].mean(1), atol=0.03 * np.sqrt(scale))
    np.testing.assert_allclose(got.covariance, np.cov(trained[n:]), atol=0.04 * scale)
    # Training moved the covariance well beyond that tolerance (away from the prior).
    assert np.abs(got.covariance - nngp[n:, n:]).max() > 0.3 * scale


# ------------------------------------------------------------ wide networks


@pytest.mark.slow
def test_ensemble_matches_monte_carlo_over_wide_networks():
    # 300 NTK-parameterized ReLU networks of width 1024 (keras_ntk.layers, float64),
    # each trained by 30 full-batch GD steps on ‖f − y‖²/(2n): the mean and the
    # variances of their test outputs against the infinite-width ensemble.
    import keras
    import tensorflow as tf

    import keras_ntk

    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        rng = np.random.default_rng(11)
        x = rng.normal(size=(9, 3))
        y = rng.normal(size=(6, 1))
        n = len(y)

        def network(width):
            return keras.Sequential([
                keras.Input((3,)), keras_ntk.NTKDense(width, 1.5, 0.2, activation="relu"),
                keras_ntk.NTKDense(1, 1.5, 0.2)])

        kernels = keras_ntk.infinite_kernels(network(1), x)
        ntk, nngp = kernels.ntk, kernels.nngp
        lr, steps = 0.5 * predict.max_learning_rate(ntk[:n, :n], y.size), 30
        expected = predict.gradient_descent_mse_ensemble(
            ntk[:n, :n], nngp[:n, :n], y, lr, steps, ntk[n:, :n], nngp[n:, :n],
            np.diag(nngp[n:, n:]), discrete=True)
        model = network(1024)
        x_train, x_test, targets = (tf.constant(a) for a in (x[:n], x[n:], y))

        @tf.function
        def train():
            for _ in tf.range(steps):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum((model(x_train) - targets) ** 2) / (2 * y.size)
                gradients = tape.gradient(loss, model.trainable_variables)
                for variable, gradient in zip(model.trainable_variables, gradients):
                    variable.assign_sub(lr * gradient)
            return model(x_test)

        outputs = []
        for _ in range(300):
            for variable in model.trainable_variables:  # Fresh N(0, 1) initialization.
                variable.assign(rng.normal(size=variable.shape))
            outputs.append(train().numpy()[:, 0])
        outputs = np.array(outputs)
    finally:
        keras.config.set_floatx(previous)
    variances = expected.covariance
    # Monte-Carlo error of the mean: √(var/300) ≈ 0.06σ; of the variances ≈ 8%.
    np.testing.assert_allclose(outputs.mean(0), expected.mean[:, 0],
                               atol=4 * np.sqrt(variances.max() / 300) + 0.03)
    np.testing.assert_allclose(outputs.var(0), variances, rtol=0.3)
    # Training moved the ensemble far from the prior (mean 0, variances K(x*, x*)
    # = 1.1-3.9 here; trained 0.1-0.7, means 0.5-2.0 in size).
    assert np.abs(expected.mean).min() > 0.3
    assert np.all(variances < 0.5 * np.diag(nngp[n:, n:]))


# Predictors that diagnose themselves (neural-tangents issues #36, #76, #128, #134).


def _rank_deficient(n=200, m=40, rank=20, seed=0):
    """K = ΦΦᵀ/r of rank r from r bounded features, its test block, and generic targets."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + m, 20))
    features = np.tanh(x @ rng.normal(size=(20, rank))) + 0.1
    k = features @ features.T / rank
    return k[:n, :n], k[n:, :n], k[n:, n:], rng.normal(size=(n, 3))


def test_rank_deficient_float32_kernel_gives_the_pseudo_inverse_predictions():
    import tensorflow as tf

    k, k_test, k_tt, y = _rank_deficient()
    k32, k_test32, k_tt32 = (a.astype(np.float32) for a in (k, k_test, k_tt))
    # The failure users meet: a float32 Cholesky of the rounded kernel is NaN.
    assert np.isnan(tf.linalg.cholesky(tf.constant(k32)).numpy()).any()
    # Reference: the minimum-norm (pseudo-inverse) predictor from the float64 kernel.
    reference = k_test @ np.linalg.pinv(k, rcond=1e-10, hermitian=True) @ y
    with pytest.warns(predict.KernelPrecisionWarning, match="float32"):
        got, info = predict.kernel_regression(k32, k_test32, y, return_info=True)
    assert info.method == "eigh" and info.dropped == 180 and info.jitter == 0.0
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    with pytest.warns(predict.KernelPrecisionWarning):
        mean, _ = predict.gp_inference(k32, k_test32, k_tt32, y, 0.0)
    np.testing.assert_allclose(mean, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    with pytest.warns(predict.KernelPrecisionWarning):
        _, at_inf = predict.gradient_descent_mse(k32, y, 1.0, np.inf, k_test32)
    np.testing.assert_allclose(at_inf, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    # The smallest jitter that lets the Cholesky succeed (solver="cholesky") is reported,
    # and fits the rounding-level directions with weight 1/jitter: far from the reference.
    with pytest.warns(predict.KernelPrecisionWarning):
        jittered, info = predict.kernel_regression(k32, k_test32, y, solver="cholesky",
                                                   return_info=True)
    eps32 = np.finfo(np.float32).eps
    assert info.method == "cholesky" and info.jitter > 0
    start = eps32 * np.trace(k32.astype(np.float64)) / 200
    assert np.isclose(np.log10(info.jitter / start), np.round(np.log10(info.jitter / start)))
    with pytest.raises(np.linalg.LinAlgError):  # one step (÷10) smaller does not factor
        np.linalg.cholesky(k32.astype(np.float64) + info.jitter / 10 * np.eye(200))
    direct = k_test32.astype(np.float64) @ np.linalg.solve(
        k32.astype(np.float64) + info.jitter * np.eye(200), y)
    np.testing.assert_allclose(jittered, direct, rtol=1e-6)
    assert np.linalg.norm(jittered - reference) > 1e-2 * np.linalg.norm(reference)


def test_asymmetric_kernel_is_refused():
    phi, phi_test, y = _problem(n=6, m=6)
    k_cross = phi_test @ phi.T  # K(X*, X): square, not symmetric
    calls = [
        lambda k: predict.kernel_regression(k, k_cross, y),
        lambda k: predict.gradient_descent_mse(k, y, 1.0, 10.0),
        lambda k: predict.gp_inference(k, k_cross, np.ones(6), y, 0.1),
        lambda k: predict.gradient_descent_mse_ensemble(k, phi @ phi.T, y, 1.0, 10.0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"symmetric kernel matrix.*Received: k_train\[|"
                                             r"symmetric kernel matrix.*Received: ntk_train\["):
            call(k_cross)
    # Rounding-level asymmetry (float32 kernels computed in blocks) is accepted.
    k = phi @ phi.T + 0.5 * np.eye(6)
    noisy = k * (1 + 1e-6 * np.random.default_rng(0).normal(size=k.shape))
    np.testing.assert_allclose(predict.kernel_regression(noisy, k_cross, y),
                               predict.kernel_regression((noisy + noisy.T) / 2, k_cross, y),
                               rtol=1e-12)
    indefinite = k - 2 * np.abs(np.linalg.eigvalsh(k)).max() * np.outer(np.ones(6), np.ones(6)) / 6
    with pytest.raises(ValueError, match="positive semi-definite"):
        predict.gradient_descent_mse(indefinite, y, 1.0, np.inf)


def _with_spectrum(eigenvalues, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return (q * eigenvalues) @ q.T


def test_precision_warning_fires_only_for_an_ill_conditioned_float32_kernel():
    import warnings

    y = np.random.default_rng(1).normal(size=(50, 2))
    well = _with_spectrum(np.logspace(0, -1, 50))          # κ = 10
    ill = _with_spectrum(np.logspace(0, -6, 50))           # κ = 1e6: κ·ε32 = 0.12
    with warnings.catch_warnings():
        warnings.simplefilter("error", predict.KernelPrecisionWarning)
        got, info = predict.kernel_regression(well.astype(np.float32), well, y, return_info=True)
        assert info.method == "cholesky" and info.jitter == 0.0
        assert 10 / 3 < info.condition < 10 * 50  # LAPACK's 1-norm estimate of κ = 10
        np.testing.assert_allclose(got, y, rtol=0, atol=1e-5 * np.abs(y).max())  # κ·ε32 ≈ 1e-6
        predict.kernel_regression(ill, ill, y)             # float64: accurate, no warning
        predict.gradient_descent_mse(well.astype(np.float32), y, 1.0, np.inf)
    with pytest.warns(predict.KernelPrecisionWarning, match=r"condition number .*float64"):
        _, info = predict.kernel_regression(ill.astype(np.float32), ill, y, return_info=True)
    assert info.method == "eigh" and info.condition > 1e5
    with pytest.warns(predict.KernelPrecisionWarning):
        predict.gradient_descent_mse(ill.astype(np.float32), y, 1.0, np.inf)
    with pytest.warns(predict.KernelPrecisionWarning):
        predict.gp_inference(ill.astype(np.float32), ill, np.ones(50), y, 0.0)
