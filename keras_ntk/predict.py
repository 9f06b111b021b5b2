"""Predictions of kernel machines and of infinitely wide trained networks.

With Θ = k_train (n × n), Θ* = k_test_train (m × n) and targets Y (n × O),
everything here is computed in float64 with numpy/scipy:

* kernel (ridge) regression: f* = Θ* (Θ + λI)⁻¹ Y;
* gradient descent on the MSE loss L = ‖f(X) − Y‖² / (2·n·O) of a network in
  its linear (infinite-width) regime, in closed form at time t through the
  eigendecomposition Θ = V diag(λ) Vᵀ (neural-tangents normalization);
* the mean and covariance over random initializations of infinitely wide
  networks trained that way (NNGP and NTK together), optionally with momentum;
* Gaussian-process posterior with a noise variance;
* the largest stable learning rate of gradient descent, 2·n·O/λmax.

Every kernel matrix K(X, X) is checked before use (neural-tangents users' most
common failure is NaN from a near-singular float32 kernel, its issues #36, #76,
#128, #134): an asymmetric matrix (max|K − Kᵀ| above 1e-3·max|K|) and an
indefinite one (λmin below −1e-2·λmax) are refused with a ValueError. Solves
use a Cholesky factorization when it succeeds and its condition number κ
(LAPACK's estimate) is small enough for the precision ε of the kernel's dtype
(κ·ε ≤ 1e-3); otherwise the pseudo-inverse through `eigh`, which treats
eigenvalues below n·ε·λmax (the rounding level of the entries, as
`numpy.linalg.matrix_rank`) as zero. A kernel given in float32 (or coarser)
with κ·ε > 1e-3 raises a `KernelPrecisionWarning`. `return_info=True` also
returns the `Diagnosis` (method, jitter, condition number, directions dropped);
jitter and eigh fallbacks are logged at INFO level (logger `keras_ntk.predict`).
`solver="cholesky"` instead adds the smallest jitter ε·trace/n·10^k that makes
the Cholesky succeed (reported), as GP libraries do: faster for large n, but
with a singular float32 kernel the directions at rounding level are then fitted
with weight 1/jitter (29% off the pseudo-inverse on a rank-20 kernel of 200
points with generic targets, against 4e-8 for the eigh path; tests/test_predict.py).
"""

import collections
import logging
import warnings

import numpy as np
import scipy.linalg

from keras_ntk import _validation

_LOG = logging.getLogger(__name__)
_EPS64 = float(np.finfo(np.float64).eps)
_EPS32 = float(np.finfo(np.float32).eps)
# A kernel matrix may be asymmetric by rounding only: max|K − Kᵀ| ≤ this × max|K|
# (float32 kernels computed two ways differ by ~2e-4 of the largest entry).
_SYMMETRY_TOLERANCE = 1e-3
# A solve is accurate to about condition·ε (ε of the input's dtype); above this the
# Cholesky solution is replaced by the pseudo-inverse, and low precision is warned of.
_ACCURACY = 1e-3
# Negative eigenvalues down to this fraction of λmax are rounding (treated as 0);
# below it the matrix is not a kernel matrix.
_PSD_TOLERANCE = 1e-2


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
    _validation.check_finite(k, name)
    return k


def _square(k, name):
    k = _matrix(k, name)
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"Expected `{name}` to be square. Received: {name}.shape={k.shape}")
    return k


def _targets(y, n, name):
    """Targets as (n, O) float64, and whether they were given as a vector."""
    try:
        y = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"Expected `{name}` to be a numeric array. Received: {name}={y!r}") from None
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(
            f"Expected `{name}` of shape ({n},) or ({n}, O). Received: {name}.shape={y.shape}"
        )
    _validation.check_finite(y, name)
    return (y[:, None], True) if y.ndim == 1 else (y, False)


def _outputs(f0, shape, name):
    if f0 is None:
        return np.zeros(shape)
    f0 = np.asarray(f0, dtype=np.float64)
    _validation.check_finite(f0, name)
    if f0.ndim == 1 and len(shape) == 2 and shape[1] == 1:
        f0 = f0[:, None]
    try:
        return np.broadcast_to(f0, shape).copy()
    except ValueError:
        raise ValueError(
            f"Expected `{name}` broadcastable to {shape}. Received: {name}.shape={f0.shape}"
        ) from None


def _precision(k):
    """(ε, name) of the dtype a kernel was given in (float64 for anything not floating)."""
    dtype = getattr(k, "dtype", None)
    try:
        dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
        if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
            return float(np.finfo(dtype).eps), dtype.name
    except (TypeError, ValueError):
        pass
    return _EPS64, "float64"


def _kernel(k, name, rows=None):
    """A symmetric kernel matrix as float64 (symmetrized) and (ε, name) of its input dtype.

    Refuses a matrix whose asymmetry max|K − Kᵀ| exceeds `_SYMMETRY_TOLERANCE`
    of max|K|: rounding leaves far less, a wrong argument (a test-train block,
    a transposed or permuted kernel) far more.
    """
    precision = _precision(k)
    k = _matrix(k, name, rows, rows)
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"Expected `{name}` to be square. Received: {name}.shape={k.shape}")
    scale = np.max(np.abs(k)) if k.size else 0.0
    asymmetry = np.max(np.abs(k - k.T)) if k.size else 0.0
    if asymmetry > _SYMMETRY_TOLERANCE * scale:
        i, j = np.unravel_index(np.argmax(np.abs(k - k.T)), k.shape)
        raise ValueError(
            f"Expected `{name}` to be a symmetric kernel matrix K(X, X): max|K − Kᵀ| is "
            f"{asymmetry / scale:.3g} of max|K|, above the {_SYMMETRY_TOLERANCE:g} that rounding "
            f"can explain (a K(X*, X) block or a kernel of two different input sets?). "
            f"Received: {name}[{i}, {j}]={k[i, j]!r}, {name}[{j}, {i}]={k[j, i]!r}")
    return (k + k.T) / 2, precision


Diagnosis = collections.namedtuple("Diagnosis", ["method", "jitter", "condition", "dropped"])
Diagnosis.__doc__ = """How a kernel system was solved (`return_info=True`).

Attributes:
    method: "cholesky" or "eigh" (pseudo-inverse through the eigendecomposition).
    jitter: the value added to the diagonal for the Cholesky to succeed (0.0 if
        none; only `solver="cholesky"` adds one).
    condition: the condition number of the matrix solved (estimated from the
        Cholesky factor, or λmax/λmin; inf if singular).
    dropped: eigen-directions treated as zero (eigenvalues below n·ε·λmax, ε of
        the input's dtype, as `numpy.linalg.matrix_rank`).
"""


class KernelPrecisionWarning(RuntimeWarning):
    """The kernel's dtype is too coarse for its condition number."""


def _cholesky(a, jitter):
    try:
        return scipy.linalg.cho_factor(a + jitter * np.eye(len(a)), lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None


def _cholesky_condition(factor, a):
    """1-norm condition number of a from its Cholesky factor (LAPACK ?pocon estimate)."""
    rcond, info = scipy.linalg.lapack.dpocon(factor[0], np.max(np.sum(np.abs(a), 0)), uplo="L")
    return np.inf if info or rcond <= 0 else 1.0 / rcond


def _spectrum(a, eps, name):
    """Eigenvalues (those below n·ε·λmax set to 0) and eigenvectors of a PSD matrix,
    the condition number and the count of dropped directions; refuses an indefinite a."""
    eigenvalues, vectors = np.linalg.eigh(a)
    largest = max(eigenvalues[-1], 0.0) if len(a) else 0.0
    if len(a) and eigenvalues[0] < -_PSD_TOLERANCE * largest or largest == 0.0 and len(a) and (
            eigenvalues[0] < 0):
        raise ValueError(
            f"Expected `{name}` to be positive semi-definite (a kernel matrix): its smallest "
            f"eigenvalue is {eigenvalues[0]:.3g}, {-eigenvalues[0] / max(largest, 1e-300):.3g} "
            f"of the largest, beyond what rounding explains. "
            f"Received: {name} with eigenvalues from {eigenvalues[0]:.3g} to {eigenvalues[-1]:.3g}")
    # Eigenvalues at the rounding level of the input (as numpy.linalg.matrix_rank) are
    # zeros of the kernel: otherwise the solve would fit directions that the entries'
    # rounding, not the data, defines.
    cutoff = len(a) * eps * largest
    kept = eigenvalues > cutoff
    condition = largest / eigenvalues[0] if len(a) and eigenvalues[0] > 0 else np.inf
    return np.where(kept, eigenvalues, 0.0), vectors, condition, int(len(a) - np.sum(kept))


def _diagnose(info, precision, name):
    """Logs a jitter or an eigh fallback; warns when a float32 kernel is too coarse."""
    eps, dtype = precision
    if info.jitter or info.method == "eigh":
        _LOG.info("%s: %s solve, jitter %.3g, condition number %.3g, %d directions dropped",
                  name, info.method, info.jitter, info.condition, info.dropped)
    if eps > _EPS64 and info.condition * eps > _ACCURACY:
        warnings.warn(
            f"`{name}` is given in {dtype} (ε = {eps:.3g}) and its condition number is "
            f"{info.condition:.3g}: "
            f"condition·ε = {info.condition * eps:.3g} > {_ACCURACY:g}, so its smallest "
            f"eigenvalues are set by rounding ({info.dropped} directions below n·ε·λmax "
            f"treated as zero, jitter {info.jitter:.3g}). Compute the kernel in float64 "
            f"(e.g. `dtype=\"float64\"`) or add a ridge.", KernelPrecisionWarning, stacklevel=3)


def _solve_psd(a, rhs, precision, name, solver):
    """a⁻¹ rhs for a symmetric PSD a whose entries are known to relative precision ε.

    solver="auto": Cholesky when it succeeds and the matrix is accurate at the
    input's precision (condition·ε ≤ `_ACCURACY`); otherwise the pseudo-inverse
    through eigh, dropping eigenvalues below n·ε·λmax, whose directions the
    rounding of the entries defines. solver="cholesky": Cholesky with the
    smallest jitter ε·trace/n·10^k (k = 0, 1, ...) with which it succeeds
    (neural-tangents' and GP libraries' remedy; faster than eigh for large n,
    but directions at the rounding level are then fitted with weight 1/jitter).
    Returns (solution, Diagnosis).
    """
    eps, n = precision[0], len(a)
    trace = float(np.trace(a))
    if solver == "cholesky":
        jitters = [0.0] + ([eps * trace / n * 10.0 ** k for k in range(
            int(np.ceil(np.log10(n / eps))) + 1)] if trace > 0 else [])
    else:
        jitters = [0.0]
    for jitter in jitters:
        factor = _cholesky(a, jitter)
        if factor is None:
            continue
        condition = _cholesky_condition(factor, a + jitter * np.eye(n))
        if solver == "cholesky" or condition * eps <= _ACCURACY:
            info = Diagnosis("cholesky", jitter, condition, 0)
            _diagnose(info, precision, name)
            return scipy.linalg.cho_solve(factor, rhs, check_finite=False), info
        break
    eigenvalues, vectors, condition, dropped = _spectrum(a, eps, name)
    inverse = np.divide(1.0, eigenvalues, out=np.zeros_like(eigenvalues), where=eigenvalues > 0)
    info = Diagnosis("eigh", 0.0, condition, dropped)
    _diagnose(info, precision, name)
    return vectors @ (inverse[:, None] * (vectors.T @ rhs)), info


def _check_solver(solver):
    if solver not in ("auto", "cholesky"):
        raise ValueError(f"Expected `solver` 'auto' or 'cholesky'. Received: solver={solver!r}")


def kernel_regression(k_train, k_test_train, y_train, ridge=0.0, *, fx_train_0=None,
                      fx_test_0=None, solver="auto", return_info=False):
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
        solver: "auto" (Cholesky if accurate at the kernel's precision, else the
            eigh pseudo-inverse) or "cholesky" (smallest jitter that lets the
            Cholesky succeed); see the module docstring.
        return_info: also return the `Diagnosis` of the solve.

    Returns:
        Test predictions, shape (m,) or (m, O) like y_train, float64 (with
        `return_info`: the pair (predictions, Diagnosis)).

    Example:

    ```python
    f_test = keras_ntk.predict.kernel_regression(k_train, k_test_train, y_train, 1e-6)
    ```
    """
    k_train, precision = _kernel(k_train, "k_train")
    n = k_train.shape[0]
    k_test_train = _matrix(k_test_train, "k_test_train", cols=n)
    y, vector = _targets(y_train, n, "y_train")
    _validation.check_number(ridge, "ridge", 0.0)
    _check_solver(solver)
    _validation.check_bool(return_info, "return_info")
    f0 = _outputs(fx_train_0, y.shape, "fx_train_0")
    f0_test = _outputs(fx_test_0, (k_test_train.shape[0], y.shape[1]), "fx_test_0")
    alpha, info = _solve_psd(k_train + ridge * np.eye(n), y - f0, precision, "k_train", solver)
    out = f0_test + k_test_train @ alpha
    out = out[:, 0] if vector else out
    return (out, info) if return_info else out


def _check_schedule(learning_rate, t, discrete, momentum):
    """Validates the training schedule; returns the times as a float64 array."""
    _validation.check_number(learning_rate, "learning_rate", 0.0, strict_minimum=True)
    times = np.asarray(t, dtype=np.float64)
    if np.any(np.isnan(times)) or np.any(times < 0):
        raise ValueError(f"Expected `t` ≥ 0 (np.inf allowed). Received: t={t}")
    numeric = (int, float, np.floating, np.integer)
    if isinstance(momentum, bool) or not isinstance(momentum, numeric) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"Expected `momentum` in [0, 1). Received: momentum={momentum!r}")
    if momentum and not discrete:
        raise ValueError(
            "Expected `discrete=True` with `momentum`: the closed form is that of t discrete "
            "heavy-ball steps (for small steps it approaches gradient flow with learning rate "
            f"η/(1 − momentum)). Received: momentum={momentum}, discrete={discrete}"
        )
    finite = times[np.isfinite(times)]
    if momentum and np.any(finite != np.round(finite)):
        raise ValueError(f"Expected whole numbers of steps `t` with `momentum`. Received: t={t}")
    return times


def _eigenmodes(k_train, precision, name):
    """Eigenvalues (rounding-level ones, below n·ε·λmax, set to 0), eigenvectors and the
    Diagnosis of a symmetric PSD Θ (refused if indefinite beyond rounding)."""
    # Eigenvalues at rounding level are zeros of Θ (as in a pseudo-inverse):
    # otherwise t = inf would fit directions that Θ cannot reach.
    eigenvalues, vectors, condition, dropped = _spectrum(k_train, precision[0], name)
    info = Diagnosis("eigh", 0.0, condition, dropped)
    _diagnose(info, precision, name)
    return eigenvalues, vectors, info


def _momentum_decay(rate, momentum, steps):
    """Residual factor after `steps` heavy-ball steps, per eigenmode.

    Along an eigenvector with a = η λ/(n·O) the residual r and the velocity u
    follow u ← m u − a r, r ← r + u (u₀ = 0), i.e. r_{k+1} = (1 + m − a) r_k −
    m r_{k−1} with r_{−1} = r₀. So (r_t, r_{t−1}) = Tᵗ (1, 1)·r₀ with
    T = [[1 + m − a, −m], [1, 0]]; Tᵗ by repeated squaring (exact for whole t,
    also where the two roots of T coincide or are complex).
    """
    ones, zeros = np.ones_like(rate), np.zeros_like(rate)
    base = [[1.0 + momentum - rate, -momentum * ones], [ones, zeros]]
    power = [[ones, zeros], [zeros, ones]]

    def product(x, y):
        return [[x[i][0] * y[0][j] + x[i][1] * y[1][j] for j in range(2)] for i in range(2)]

    steps = int(steps)
    while steps:
        if steps & 1:
            power = product(power, base)
        steps >>= 1
        if steps:
            base = product(base, base)
    return power[0][0] + power[0][1]


def _decay(eigenvalues, learning_rate, size, time, discrete, momentum):
    """Per-eigenvalue factor multiplying the residual f − Y after `time` steps."""
    rate = learning_rate * eigenvalues / size
    if np.isinf(time):
        return np.where(rate > 0, 0.0, 1.0)
    if momentum:
        return _momentum_decay(rate, momentum, time)
    if discrete:
        return np.power(1.0 - rate, time)
    return np.exp(-rate * time)


def _growth(eigenvalues, learning_rate, size, time, discrete, momentum):
    """(1 − decay)/λ, with its limit at λ = 0 (finite t): η/(n·O) times
    t (gradient descent or flow), Σ_{k=1..t} (1 − mᵏ)/(1 − m) (momentum m)."""
    safe = np.where(eigenvalues > 0, eigenvalues, 1.0)
    if np.isinf(time):
        limit = 0.0
    elif momentum:
        limit = learning_rate / size * (
            time - momentum * (1.0 - momentum ** time) / (1.0 - momentum)) / (1.0 - momentum)
    else:
        limit = learning_rate * time / size
    decay = _decay(eigenvalues, learning_rate, size, time, discrete, momentum)
    return np.where(eigenvalues > 0, (1.0 - decay) / safe, limit)


def _over_times(times, at):
    """Evaluates at(time) -> tuple of arrays for a scalar or an array of times."""
    if times.ndim == 0:
        return at(float(times))
    results = [at(float(time)) for time in times.ravel()]
    return tuple(
        None if results[0][i] is None else
        np.stack([r[i] for r in results]).reshape(times.shape + results[0][i].shape)
        for i in range(len(results[0])))


def gradient_descent_mse(k_train, y_train, learning_rate, t, k_test_train=None,
                         fx_train_0=None, fx_test_0=None, *, discrete=False, momentum=0.0,
                         return_info=False):
    """Outputs of an infinitely wide network trained by gradient descent on MSE.

    For the loss L = ‖f(X) − Y‖² / (2·n·O) (n examples, O outputs, as
    neural-tangents) the network in its linear regime follows gradient flow
    df/dt = −η/(n·O) · Θ (f − Y), so with Θ = V diag(λ) Vᵀ:

        f(t)  = Y + V diag(e^{−η t λ/(n·O)}) Vᵀ (f0 − Y),
        f*(t) = f0* + Θ* V diag((1 − e^{−η t λ/(n·O)})/λ) Vᵀ (Y − f0).

    `t` counts steps of size η (time η·t). With `discrete=True` the exact
    outputs after t steps of discrete gradient descent are returned instead:
    e^{−η t λ/(n·O)} becomes (1 − η λ/(n·O))^t (unstable above
    `max_learning_rate`). With `momentum=m` (needs `discrete=True`) the steps
    are heavy-ball steps as in `keras.optimizers.SGD(momentum=m)`: v ← m v −
    η ∇L, θ ← θ + v (v = 0 at the start); the factor is then, per eigenmode
    with a = η λ/(n·O), r_t/r_0 for the recurrence r_{k+1} = (1 + m − a) r_k −
    m r_{k−1}, r_1 = (1 − a) r_0 (exact for whole t; stable below
    `max_learning_rate(..., momentum=m)` = 2(1 + m)·n·O/λmax). At t = inf all
    give kernel regression (`kernel_regression` with ridge 0; eigenvalues
    below n·ε·λmax are treated as 0, like a pseudo-inverse: those directions
    never move).

    f0 and f0* are the outputs of the network at initialization (the
    linearization point). Left at 0 they give the mean over random
    initializations of an infinitely wide network; for that mean together
    with the covariance, see `gradient_descent_mse_ensemble`.

    Args:
        k_train: Θ(X, X), shape (n, n).
        y_train: targets, shape (n,) or (n, O).
        learning_rate: η > 0.
        t: number of steps (float ≥ 0, or `np.inf`), or an array of them.
        k_test_train: optional Θ(X*, X), shape (m, n).
        fx_train_0: initial outputs on X (default 0), broadcastable to y_train.
        fx_test_0: initial outputs on X* (default 0).
        discrete: False (gradient flow) or True (discrete steps; t integer).
        momentum: heavy-ball momentum m in [0, 1) (default 0); m > 0 needs
            `discrete=True` and whole numbers of steps.
        return_info: also return the `Diagnosis` of Θ's eigendecomposition
            (method "eigh"; eigenvalues below n·ε·λmax of the kernel's dtype
            count as 0).

    Returns:
        fx_train at t, shaped like y_train (with a leading axis over t when t
        is an array), or the pair (fx_train, fx_test) when k_test_train is
        given; with `return_info`, (that result, Diagnosis).

    Example:

    ```python
    lr = keras_ntk.predict.max_learning_rate(k_train) / 2
    f_train, f_test = keras_ntk.predict.gradient_descent_mse(
        k_train, y_train, lr, np.inf, k_test_train)
    ```
    """
    k_train, precision = _kernel(k_train, "k_train")
    n = k_train.shape[0]
    y, vector = _targets(y_train, n, "y_train")
    times = _check_schedule(learning_rate, t, discrete, momentum)
    _validation.check_bool(return_info, "return_info")
    f0 = _outputs(fx_train_0, y.shape, "fx_train_0")
    if k_test_train is not None:
        k_test_train = _matrix(k_test_train, "k_test_train", cols=n)
        f0_test = _outputs(fx_test_0, (k_test_train.shape[0], y.shape[1]), "fx_test_0")
    eigenvalues, vectors, info = _eigenmodes(k_train, precision, "k_train")
    projected = vectors.T @ (f0 - y)  # Residual in the eigenbasis.
    schedule = (learning_rate, y.size)
    if k_test_train is not None:
        k_test_v = k_test_train @ vectors

    def at(time):
        decay = _decay(eigenvalues, *schedule, time, discrete, momentum)
        fx_train = y + vectors @ (decay[:, None] * projected)
        fx_train = fx_train[:, 0] if vector else fx_train
        if k_test_train is None:
            return fx_train, None
        growth = _growth(eigenvalues, *schedule, time, discrete, momentum)
        fx_test = f0_test - k_test_v @ (growth[:, None] * projected)
        return fx_train, (fx_test[:, 0] if vector else fx_test)

    fx_train, fx_test = _over_times(times, at)
    result = fx_train if k_test_train is None else (fx_train, fx_test)
    return (result, info) if return_info else result


Gaussian = collections.namedtuple("Gaussian", ["mean", "covariance"])
Gaussian.__doc__ = """Mean and covariance of the outputs of an ensemble of networks.

Attributes:
    mean: numpy array shaped like the targets (a leading axis per axis of t).
    covariance: numpy array (points, points) shared by every output unit
        (kernel ⊗ I), or (points,) variances; None when not computed.
"""


def gradient_descent_mse_ensemble(ntk_train, nngp_train, y_train, learning_rate, t,
                                  ntk_test_train=None, nngp_test_train=None, nngp_test=None,
                                  *, compute_cov=True, discrete=False, momentum=0.0,
                                  return_info=False):
    """Mean and covariance over initializations of infinitely wide networks trained on MSE.

    At initialization the outputs of an infinitely wide network are a
    centred Gaussian process with the NNGP kernel K; training by gradient
    descent on MSE is then linear in the initial outputs f0 (see
    `gradient_descent_mse`), so the trained outputs are Gaussian too
    (Lee et al. 2019, neural-tangents `gradient_descent_mse_ensemble`). With
    the NTK Θ = V diag(λ) Vᵀ, g(λ) the residual factor after t steps
    (e^{−η t λ/(n·O)} for gradient flow, (1 − η λ/(n·O))^t for discrete
    steps, the heavy-ball recurrence with momentum) and

        E = V diag(g) Vᵀ,    A = Θ* V diag((1 − g)/λ) Vᵀ,

    training outputs are f(t) = (I − E) Y + E f0 and test outputs
    f*(t) = A Y + f0* − A f0, so

        train: mean = (I − E) Y,   cov = E K Eᵀ,
        test:  mean = A Y,         cov = K** − A K*ᵀ − K* Aᵀ + A K Aᵀ.

    At t = inf, A = Θ* Θ⁻¹: with Θ = K (a network whose last layer alone
    is trained: pass the NNGP as both kernels) the test Gaussian is the GP
    posterior K** − K* K⁻¹ K*ᵀ of `gp_inference` with zero noise. The
    covariance is the same for every output unit (the kernels are ⊗ I).
    Eigenvalues of Θ below n·ε·λmax count as 0 (pseudo-inverse).

    Args:
        ntk_train: Θ(X, X), shape (n, n).
        nngp_train: K(X, X), shape (n, n) (needed for the covariance only:
            may be None with `compute_cov=False`).
        y_train: targets, shape (n,) or (n, O).
        learning_rate: η > 0 (for the loss ‖f − Y‖²/(2·n·O)).
        t: number of steps (≥ 0, `np.inf` allowed), or an array of them.
        ntk_test_train: Θ(X*, X), shape (m, n); None for predictions on X.
        nngp_test_train: K(X*, X), shape (m, n) (for the test covariance).
        nngp_test: K(X*, X*), shape (m, m), or its diagonal (m,) for
            variances only (for the test covariance).
        compute_cov: also return the covariance (default True).
        discrete: as in `gradient_descent_mse`.
        momentum: as in `gradient_descent_mse` (needs `discrete=True`).
        return_info: also return the `Diagnosis` of Θ's eigendecomposition.

    Returns:
        `Gaussian(mean, covariance)`: mean shaped like y_train ((m, ...) for
        test points), covariance (n, n) / (m, m) or (m,) variances (None
        without `compute_cov`), both with leading axes of t when t is an array;
        with `return_info`, (Gaussian, Diagnosis).

    Example:

    ```python
    kernels = keras_ntk.infinite_kernels(model, np.concatenate([x_train, x_test]))
    n = len(x_train)
    ensemble = keras_ntk.predict.gradient_descent_mse_ensemble(
        kernels.ntk[:n, :n], kernels.nngp[:n, :n], y_train, 1.0, np.inf,
        kernels.ntk[n:, :n], kernels.nngp[n:, :n], kernels.nngp[n:, n:])
    ensemble.mean, ensemble.covariance
    ```
    """
    ntk_train, precision = _kernel(ntk_train, "ntk_train")
    n = ntk_train.shape[0]
    y, vector = _targets(y_train, n, "y_train")
    times = _check_schedule(learning_rate, t, discrete, momentum)
    _validation.check_bool(return_info, "return_info")
    test = ntk_test_train is not None
    if test:
        ntk_test_train = _matrix(ntk_test_train, "ntk_test_train", cols=n)
        m = ntk_test_train.shape[0]
    if compute_cov:
        if nngp_train is None:
            raise ValueError(
                "Expected `nngp_train` (n, n) with compute_cov=True. Received: nngp_train=None")
        nngp_train = _kernel(nngp_train, "nngp_train", rows=n)[0]
        if test:
            if nngp_test_train is None or nngp_test is None:
                raise ValueError(
                    "Expected `nngp_test_train` and `nngp_test` with test points and "
                    f"compute_cov=True. Received: nngp_test_train={_shape_of(nngp_test_train)}, "
                    f"nngp_test={_shape_of(nngp_test)}"
                )
            nngp_test_train = _matrix(nngp_test_train, "nngp_test_train", rows=m, cols=n)
            nngp_test = np.asarray(nngp_test, dtype=np.float64)
            if nngp_test.shape not in ((m, m), (m,)):
                raise ValueError(
                    f"Expected `nngp_test` of shape ({m}, {m}) or ({m},). "
                    f"Received: nngp_test.shape={nngp_test.shape}"
                )
            _validation.check_finite(nngp_test, "nngp_test")
    eigenvalues, vectors, info = _eigenmodes(ntk_train, precision, "ntk_train")
    schedule = (learning_rate, y.size)
    projected_y = vectors.T @ y
    if test:
        k_test_v = ntk_test_train @ vectors

    def at(time):
        if not test:
            decay = _decay(eigenvalues, *schedule, time, discrete, momentum)
            mean = y - vectors @ (decay[:, None] * projected_y)
            covariance = None
            if compute_cov:
                propagator = (vectors * decay) @ vectors.T  # E
                covariance = propagator @ nngp_train @ propagator.T
        else:
            growth = _growth(eigenvalues, *schedule, time, discrete, momentum)
            operator = (k_test_v * growth) @ vectors.T  # A
            mean = operator @ y
            covariance = None
            if compute_cov:
                cross = operator @ nngp_test_train.T  # A K*ᵀ
                spread = operator @ nngp_train  # A K
                if nngp_test.ndim == 1:
                    covariance = (nngp_test - 2 * np.einsum("ij,ij->i", operator, nngp_test_train)
                                  + np.einsum("ij,ij->i", spread, operator))
                else:
                    covariance = nngp_test - cross - cross.T + spread @ operator.T
                    covariance = (covariance + covariance.T) / 2
        return (mean[:, 0] if vector else mean), covariance

    mean, covariance = _over_times(times, at)
    return (Gaussian(mean, covariance), info) if return_info else Gaussian(mean, covariance)


def _shape_of(value):
    return None if value is None else np.shape(value)


def gp_inference(k_train, k_test_train, k_test, y, noise, *, solver="auto", return_info=False):
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
        solver: "auto" (Cholesky if accurate at the kernel's precision, else the
            eigh pseudo-inverse) or "cholesky" (smallest jitter that lets the
            Cholesky succeed); see the module docstring.
        return_info: also return the `Diagnosis` of the solve.

    Returns:
        (mean, covariance): mean shaped (m,) or (m, O) like y; covariance
        (m, m), or (m,) variances when `k_test` is a diagonal (the same for
        every output); with `return_info`, (mean, covariance, Diagnosis).

    Example:

    ```python
    mean, cov = keras_ntk.predict.gp_inference(k_train, k_test_train, k_test, y, 1e-2)
    ```
    """
    k_train, precision = _kernel(k_train, "k_train")
    n = k_train.shape[0]
    k_test_train = _matrix(k_test_train, "k_test_train", cols=n)
    m = k_test_train.shape[0]
    targets, vector = _targets(y, n, "y")
    _validation.check_number(noise, "noise", 0.0)
    _check_solver(solver)
    _validation.check_bool(return_info, "return_info")
    k_test = np.asarray(k_test, dtype=np.float64)
    if k_test.shape not in ((m, m), (m,)):
        raise ValueError(
            f"Expected `k_test` of shape ({m}, {m}) or ({m},). Received: k_test.shape={k_test.shape}"
        )
    _validation.check_finite(k_test, "k_test")
    solved, info = _solve_psd(k_train + noise * np.eye(n), np.concatenate(
        [targets, k_test_train.T], axis=1), precision, "k_train", solver)
    mean = k_test_train @ solved[:, :targets.shape[1]]
    reduction = k_test_train @ solved[:, targets.shape[1]:]
    if k_test.ndim == 1:
        covariance = k_test - np.diag(reduction)
    else:
        covariance = k_test - (reduction + reduction.T) / 2
    mean = mean[:, 0] if vector else mean
    return (mean, covariance, info) if return_info else (mean, covariance)


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
    _validation.check_number(momentum, "momentum", 0.0, 1.0, strict_maximum=True)
    largest = scipy.linalg.eigvalsh((k_train + k_train.T) / 2, subset_by_index=[n - 1, n - 1])[0]
    if largest <= 0:
        raise ValueError(
            "Expected `k_train` with a positive largest eigenvalue. "
            f"Received: largest eigenvalue={largest}"
        )
    return float(2.0 * (1.0 + momentum) * size / largest)
