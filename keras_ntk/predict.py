"""Predictions of kernel machines and of infinitely wide trained networks.

With Θ = k_train (n × n), Θ* = k_test_train (m × n) and targets Y (n × O),
everything here is computed in float64 with numpy/scipy:

* kernel (ridge) regression: f* = Θ* (Θ + λI)⁻¹ Y;
* gradient descent on the MSE loss L = ‖f(X) − Y‖² / (2·n·O) of a network in
  its linear (infinite-width) regime, in closed form at time t through the
  eigendecomposition Θ = V diag(λ) Vᵀ (neural-tangents normalization);
* Gaussian-process posterior with a noise variance;
* the largest stable learning rate of gradient descent, 2·n·O/λmax.
"""

import numpy as np
import scipy.linalg


def _matrix(k, name, rows=None, cols=None):
    try:
        k = np.asarray(k, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"Expected `{name}` to be a 2-D array. Received: {name}={k!r}") from None
    if k.ndim != 2 or (rows is not None and k.shape[0] != rows) or (
            cols is not None and k.shape[1] != cols):
        expected = f"({rows if rows is not None else 'm'}, {cols if cols is not None else 'n'})"
        raise ValueError(
            f"Expected `{name}` of shape {expected}. Received: {name}.shape={k.shape}"
        )
    return k


def _square(k, name):
    k = _matrix(k, name)
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"Expected `{name}` to be square. Received: {name}.shape={k.shape}")
    return k


def _targets(y, n, name):
    """Targets as (n, O) float64, and whether they were given as a vector."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(
            f"Expected `{name}` of shape ({n},) or ({n}, O). Received: {name}.shape={y.shape}"
        )
    return (y[:, None], True) if y.ndim == 1 else (y, False)


def _outputs(f0, shape, name):
    if f0 is None:
        return np.zeros(shape)
    f0 = np.asarray(f0, dtype=np.float64)
    if f0.ndim == 1 and len(shape) == 2 and shape[1] == 1:
        f0 = f0[:, None]
    try:
        return np.broadcast_to(f0, shape).copy()
    except ValueError:
        raise ValueError(
            f"Expected `{name}` broadcastable to {shape}. Received: {name}.shape={f0.shape}"
        ) from None


def _solve_psd(k, rhs):
    """(k)⁻¹ rhs for a symmetric k: Cholesky, or least squares when singular."""
    try:
        factor = scipy.linalg.cho_factor(k, lower=True)
        return scipy.linalg.cho_solve(factor, rhs)
    except np.linalg.LinAlgError:
        return scipy.linalg.lstsq(k, rhs)[0]


def kernel_regression(k_train, k_test_train, y_train, ridge=0.0, *, fx_train_0=None,
                      fx_test_0=None):
    """Kernel (ridge) regression predictions on test points.

        f* = f0* + Θ* (Θ + λ I)⁻¹ (Y − f0)

    With the NTK and λ = 0 this is the infinitely wide network trained to
    convergence by gradient descent on MSE (`gradient_descent_mse` at
    t = inf); f0, f0* are the initial outputs (zero by default: the mean
    prediction over initializations).

    Args:
        k_train: Θ(X, X), shape (n, n).
        k_test_train: Θ(X*, X), shape (m, n).
        y_train: targets, shape (n,) or (n, O).
        ridge: λ ≥ 0 added to the diagonal.
        fx_train_0: optional initial outputs on X, broadcastable to y_train.
        fx_test_0: optional initial outputs on X*, broadcastable to (m, O).

    Returns:
        Test predictions, shape (m,) or (m, O) like y_train, float64.

    Example:

    ```python
    f_test = keras_ntk.predict.kernel_regression(k_train, k_test_train, y_train, 1e-6)
    ```
    """
    k_train = _square(k_train, "k_train")
    n = k_train.shape[0]
    k_test_train = _matrix(k_test_train, "k_test_train", cols=n)
    y, vector = _targets(y_train, n, "y_train")
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"Expected `ridge` to be a non-negative float. Received: ridge={ridge}")
    f0 = _outputs(fx_train_0, y.shape, "fx_train_0")
    f0_test = _outputs(fx_test_0, (k_test_train.shape[0], y.shape[1]), "fx_test_0")
    alpha = _solve_psd(k_train + ridge * np.eye(n), y - f0)
    out = f0_test + k_test_train @ alpha
    return out[:, 0] if vector else out


def gradient_descent_mse(k_train, y_train, learning_rate, t, k_test_train=None,
                         fx_train_0=None, fx_test_0=None, *, discrete=False):
    """Outputs of an infinitely wide network trained by gradient descent on MSE.

    For the loss L = ‖f(X) − Y‖² / (2·n·O) (n examples, O outputs, as
    neural-tangents) the network in its linear regime follows gradient flow
    df/dt = −η/(n·O) · Θ (f − Y), so with Θ = V diag(λ) Vᵀ:

        f(t)  = Y + V diag(e^{−η t λ/(n·O)}) Vᵀ (f0 − Y),
        f*(t) = f0* + Θ* V diag((1 − e^{−η t λ/(n·O)})/λ) Vᵀ (Y − f0).

    `t` counts steps of size η (time η·t). With `discrete=True` the exact
    outputs after t steps of discrete gradient descent are returned instead:
    e^{−η t λ/(n·O)} becomes (1 − η λ/(n·O))^t (unstable above
    `max_learning_rate`). At t = inf both give kernel regression
    (`kernel_regression` with ridge 0; eigenvalues below n·ε·λmax are treated
    as 0, like a pseudo-inverse: those directions never move).

    Args:
        k_train: Θ(X, X), shape (n, n).
        y_train: targets, shape (n,) or (n, O).
        learning_rate: η > 0.
        t: number of steps (float ≥ 0, or `np.inf`), or an array of them.
        k_test_train: optional Θ(X*, X), shape (m, n).
        fx_train_0: initial outputs on X (default 0), broadcastable to y_train.
        fx_test_0: initial outputs on X* (default 0).
        discrete: False (gradient flow) or True (discrete steps; t integer).

    Returns:
        fx_train at t, shaped like y_train (with a leading axis over t when t
        is an array), or the pair (fx_train, fx_test) when k_test_train is
        given.

    Example:

    ```python
    lr = keras_ntk.predict.max_learning_rate(k_train) / 2
    f_train, f_test = keras_ntk.predict.gradient_descent_mse(
        k_train, y_train, lr, np.inf, k_test_train)
    ```
    """
    k_train = _square(k_train, "k_train")
    n = k_train.shape[0]
    y, vector = _targets(y_train, n, "y_train")
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(
            f"Expected `learning_rate` to be a positive float. Received: learning_rate={learning_rate}"
        )
    times = np.asarray(t, dtype=np.float64)
    if np.any(np.isnan(times)) or np.any(times < 0):
        raise ValueError(f"Expected `t` ≥ 0 (np.inf allowed). Received: t={t}")
    f0 = _outputs(fx_train_0, y.shape, "fx_train_0")
    eigenvalues, vectors = np.linalg.eigh((k_train + k_train.T) / 2)
    # Eigenvalues at rounding level are zeros of Θ (as in a pseudo-inverse):
    # otherwise t = inf would fit directions that Θ cannot reach.
    cutoff = n * np.finfo(np.float64).eps * max(eigenvalues[-1], 0.0)
    eigenvalues = np.where(eigenvalues > cutoff, eigenvalues, 0.0)
    rate = learning_rate * eigenvalues / y.size
    projected = vectors.T @ (f0 - y)  # Residual in the eigenbasis.

    def decay(time):
        """Per-eigenvalue factor multiplying the residual after `time` steps."""
        if np.isinf(time):
            return np.where(rate > 0, 0.0, 1.0)
        if discrete:
            return np.power(1.0 - rate, time)
        return np.exp(-rate * time)

    def growth(time):
        """(1 − decay)/λ, with its limit η t/(n·O) at λ = 0 (finite t)."""
        safe = np.where(eigenvalues > 0, eigenvalues, 1.0)
        limit = 0.0 if np.isinf(time) else learning_rate * time / y.size
        return np.where(eigenvalues > 0, (1.0 - decay(time)) / safe, limit)

    if k_test_train is not None:
        k_test_train = _matrix(k_test_train, "k_test_train", cols=n)
        f0_test = _outputs(fx_test_0, (k_test_train.shape[0], y.shape[1]), "fx_test_0")
        k_test_v = k_test_train @ vectors

    def at(time):
        fx_train = y + vectors @ (decay(time)[:, None] * projected)
        fx_train = fx_train[:, 0] if vector else fx_train
        if k_test_train is None:
            return fx_train, None
        fx_test = f0_test - k_test_v @ (growth(time)[:, None] * projected)
        return fx_train, (fx_test[:, 0] if vector else fx_test)

    if times.ndim == 0:
        fx_train, fx_test = at(float(times))
    else:
        pairs = [at(float(time)) for time in times.ravel()]
        fx_train = np.stack([p[0] for p in pairs]).reshape(times.shape + pairs[0][0].shape)
        fx_test = None if k_test_train is None else np.stack(
            [p[1] for p in pairs]).reshape(times.shape + pairs[0][1].shape)
    return fx_train if k_test_train is None else (fx_train, fx_test)


def gp_inference(k_train, k_test_train, k_test, y, noise):
    """Gaussian-process posterior on test points.

        mean = Θ* (Θ + σ² I)⁻¹ Y,    cov = Θ** − Θ* (Θ + σ² I)⁻¹ Θ*ᵀ

    With the NNGP kernel this is exact Bayesian inference with the infinite
    network (the prior over functions at initialization).

    Args:
        k_train: K(X, X), shape (n, n).
        k_test_train: K(X*, X), shape (m, n).
        k_test: K(X*, X*), shape (m, m), or its diagonal, shape (m,), which
            then gives only the posterior variances.
        y: observations, shape (n,) or (n, O).
        noise: σ² ≥ 0, the observation noise variance.

    Returns:
        (mean, covariance): mean shaped (m,) or (m, O) like y; covariance
        (m, m), or (m,) variances when `k_test` is a diagonal (the same for
        every output).

    Example:

    ```python
    mean, cov = keras_ntk.predict.gp_inference(k_train, k_test_train, k_test, y, 1e-2)
    ```
    """
    k_train = _square(k_train, "k_train")
    n = k_train.shape[0]
    k_test_train = _matrix(k_test_train, "k_test_train", cols=n)
    m = k_test_train.shape[0]
    targets, vector = _targets(y, n, "y")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"Expected `noise` to be a non-negative float. Received: noise={noise}")
    k_test = np.asarray(k_test, dtype=np.float64)
    if k_test.shape not in ((m, m), (m,)):
        raise ValueError(
            f"Expected `k_test` of shape ({m}, {m}) or ({m},). Received: k_test.shape={k_test.shape}"
        )
    solved = _solve_psd(k_train + noise * np.eye(n), np.concatenate(
        [targets, k_test_train.T], axis=1))
    mean = k_test_train @ solved[:, :targets.shape[1]]
    reduction = k_test_train @ solved[:, targets.shape[1]:]
    if k_test.ndim == 1:
        covariance = k_test - np.diag(reduction)
    else:
        covariance = k_test - (reduction + reduction.T) / 2
    return (mean[:, 0] if vector else mean), covariance


def max_learning_rate(k_train, y_train_size=None, momentum=0.0):
    """Largest stable learning rate of gradient descent on MSE.

    For the loss ‖f(X) − Y‖² / (2·n·O) gradient descent on the linearized
    network multiplies the residual along eigenvector i by 1 − η λ_i/(n·O)
    per step; it converges when η < 2·n·O/λmax, and with heavy-ball momentum
    m when η < 2·(1 + m)·n·O/λmax (neural-tangents `max_learning_rate`).
    Train below this value, not at it.

    Args:
        k_train: Θ(X, X), shape (n, n).
        y_train_size: n·O, the number of target entries; default n (one output).
        momentum: m in [0, 1).

    Returns:
        The learning rate as a float.

    Example:

    ```python
    lr = 0.5 * keras_ntk.predict.max_learning_rate(k_train, y_train.size)
    ```
    """
    k_train = _square(k_train, "k_train")
    n = k_train.shape[0]
    size = n if y_train_size is None else y_train_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(
            f"Expected `y_train_size` to be a positive int. Received: y_train_size={y_train_size}"
        )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Expected `momentum` in [0, 1). Received: momentum={momentum}")
    largest = scipy.linalg.eigvalsh((k_train + k_train.T) / 2, subset_by_index=[n - 1, n - 1])[0]
    if largest <= 0:
        raise ValueError(
            "Expected `k_train` with a positive largest eigenvalue. "
            f"Received: largest eigenvalue={largest}"
        )
    return float(2.0 * (1.0 + momentum) * size / largest)
