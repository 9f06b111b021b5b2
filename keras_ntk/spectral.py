"""Spectra and low-rank approximations of the empirical NTK, without forming Θ.

A 50k×50k float32 kernel is 10 GB; its top eigenpairs and a Nyström
approximation need only products Θ·v (`ntk_vector_product`) or a few columns
Θ(x, x_landmarks):

* `ntk_eigsh`: the top-k eigenpairs of Θ(x, x) by Lanczos iteration
  (`scipy.sparse.linalg.eigsh` on a `LinearOperator` whose product is
  `ntk_vector_product`); memory O(N·k) on the host plus the product's working
  memory.
* `nystrom_ntk`: Θ ≈ L Lᵀ from m landmark columns, with an exact bound on the
  error (the trace of the PSD residual) and a sampled estimate of the relative
  Frobenius error; `NystromNTK.kernel_regression` solves the ridge regression
  with the low-rank factor in O(N r²).
"""

import time

import keras
import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from keras_ntk import _validation
from keras_ntk._batching import gather_examples, num_examples, slice_examples, to_host
from keras_ntk._output_axes import OutputAxes
from keras_ntk.ntk import empirical_ntk, ntk_vector_product


def _kernel_axes(model, x, trace_axes, name):
    """The per-example kept output shape of a single-output model (for flattening)."""
    x_host = to_host(x, "x")
    n = num_examples(x_host, "x")
    _validation.check_finite(x_host, "x")
    if not getattr(model, "built", True) or not model.trainable_weights:
        model(slice_examples(x_host, 0, 1), training=False)
    outputs = model(slice_examples(x_host, 0, 1), training=False)
    flat = keras.tree.flatten(outputs)
    if len(flat) != 1:
        raise ValueError(
            f"Expected `model` to have a single output for `{name}` (the kernel of "
            f"several outputs is not one matrix). Received: model with {len(flat)} outputs"
        )
    axes = OutputAxes(tuple(flat[0].shape[1:]), trace_axes, ())
    return x_host, n, axes


class _Progress:
    def __init__(self, verbose, unit):
        self.verbose = verbose
        self.count = 0
        self.start = time.perf_counter()
        self.last = self.start
        self.unit = unit

    def step(self, extra=""):
        self.count += 1
        now = time.perf_counter()
        if self.verbose and (now - self.last > 10 or self.count == 1 or self.verbose > 1):
            self.last = now
            print(f"{self.unit} {self.count}: {now - self.start:.1f} s elapsed{extra}",
                  flush=True)


def ntk_eigsh(model, x, k=6, *, trace_axes=(-1,), implementation="ntvp", batch_size=None,
              memory_budget=None, dtype=None, variables=None, tol=0.0, maxiter=None,
              ncv=None, seed=0, return_eigenvectors=True, verbose=0):
    """Top-k eigenpairs of the empirical NTK Θ(x, x), matrix-free (Lanczos).

    Θ is the kernel `empirical_ntk(model, x, trace_axes=trace_axes)` seen as
    one symmetric PSD matrix of size M = N·(size of the output axes not
    traced): N×N with the default `trace_axes=(-1,)`, NO×NO with
    `trace_axes=()` for O logits (index n·O + o). `scipy.sparse.linalg.eigsh`
    (implicitly restarted Lanczos, ARPACK) finds its k largest eigenvalues
    from products Θ·v by `ntk_vector_product`, so Θ is never held:

    * `implementation="ntvp"` (default): each product is one pass of VJPs
      over x (u = Jᵀv) and one of JVPs (J u), costing about 3·|traced|
      forward passes per example and no N² term; memory: the Lanczos basis
      (M × ncv floats, ncv = max(2k+1, 20)) plus |traced| weight-sized vectors
      and one batch's activations.
    * `"structured"`/`"jacobian"`/`"auto"`: each product recomputes Θ one block
      at a time and multiplies it by v (N² work per product, memory one block).
      Only sensible when a product is cheap; to form Θ instead, use
      `empirical_ntk` and `numpy.linalg.eigh`.

    Lanczos needs from a few dozen to a few hundred products for k = 50;
    `verbose=1` prints the product count and the elapsed time every 10 s.

    Args:
        model: a Keras model with one output (as in `empirical_ntk`).
        x: inputs with N examples.
        k: number of eigenpairs (k < M).
        trace_axes: as in `empirical_ntk` (no diagonal axes: Θ must be one matrix).
        implementation: how products are computed, see above.
        batch_size: examples per pass (None: from `memory_budget`).
        memory_budget, dtype, variables: as in `empirical_ntk`.
        tol: relative accuracy of the eigenvalues (0: machine precision), as in
            `scipy.sparse.linalg.eigsh`.
        maxiter: maximum number of Arnoldi update iterations.
        ncv: number of Lanczos vectors (default max(2k+1, 20), at most M).
        seed: seed of the random starting vector (reproducible results).
        return_eigenvectors: also return the eigenvectors.
        verbose: 1 prints progress; 2 one line per product.

    Returns:
        eigenvalues, float64 array (k,) in descending order; with
        `return_eigenvectors` also eigenvectors (N, *kept output axes, k),
        unit-norm columns in the same order.

    Example:

    ```python
    values, vectors = keras_ntk.ntk_eigsh(model, x_train, k=50, batch_size=256)
    ```
    """
    x_host, n, axes = _kernel_axes(model, x, trace_axes, "ntk_eigsh")
    size = n * int(np.prod(axes.vec_shape, dtype=np.int64))
    if not isinstance(k, (int, np.integer)) or not 0 < k < size:
        raise ValueError(
            f"Expected `k` to be an int with 0 < k < {size} (the size of Θ). Received: k={k}"
        )
    _validation.check_number(tol, "tol", 0.0)
    _validation.check_int(maxiter, "maxiter", 1, allow_none=True)
    _validation.check_int(ncv, "ncv", int(k) + 1, size, allow_none=True)
    _validation.check_int(seed, "seed", 0)
    _validation.check_float_dtype(dtype)
    if ncv is None:
        ncv = min(size, max(2 * int(k) + 1, 20))
    progress = _Progress(verbose, "Θ·v product")
    vec_shape = (n, *axes.vec_shape)

    def matmat(v):
        v = np.asarray(v, np.float64).reshape(size, -1)
        out = ntk_vector_product(
            model, x_host, None, v.reshape(*vec_shape, v.shape[-1]), trace_axes=trace_axes,
            implementation=implementation, batch_size=batch_size,
            memory_budget=memory_budget, dtype=dtype, variables=variables)
        progress.step()
        return np.asarray(out, np.float64).reshape(size, -1)

    operator = scipy.sparse.linalg.LinearOperator(
        (size, size), matvec=lambda v: matmat(v)[:, 0], matmat=matmat, dtype=np.float64)
    v0 = np.random.default_rng(seed).normal(size=size)
    result = scipy.sparse.linalg.eigsh(
        operator, k=int(k), which="LA", v0=v0, ncv=ncv, tol=tol, maxiter=maxiter,
        return_eigenvectors=return_eigenvectors)
    if verbose:
        print(f"ntk_eigsh: {progress.count} products in "
              f"{time.perf_counter() - progress.start:.1f} s", flush=True)
    if not return_eigenvectors:
        return np.sort(result)[::-1]
    values, vectors = result
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order].reshape(*vec_shape, int(k))


class NystromNTK:
    """A Nyström approximation Θ(x, x) ≈ L Lᵀ of the empirical NTK (see `nystrom_ntk`).

    Attributes:
        factor: L, float64 (N, r).
        landmarks: indices into x of the m landmark examples.
        rank: r ≤ m, the number of landmark eigenvalues kept.
        trace: tr Θ (exact).
        trace_error: tr(Θ − L Lᵀ) ≥ ‖Θ − L Lᵀ‖_F ≥ ‖Θ − L Lᵀ‖₂ (exact; Θ − L Lᵀ is
            PSD, so this is a guaranteed bound), and `relative_trace_error`
            = trace_error / tr Θ.
        sampled_error: relative Frobenius error of the sampled exact columns,
            ‖Θ[:, S] − L L[S]ᵀ‖_F / ‖Θ[:, S]‖_F for `error_columns` random
            non-landmark columns S: an estimate of ‖Θ − L Lᵀ‖_F / ‖Θ‖_F, on the
            high side because landmark columns (exact) are never drawn; None
            when no columns were sampled.
    """

    def __init__(self, model, landmarks, landmark_x, projection, factor, trace,
                 residual_trace, sampled_error, options):
        self._model = model
        self.landmarks = landmarks
        self._landmark_x = landmark_x
        self._projection = projection  # U_r Λ_r^{-1/2}, (m, r)
        self.factor = factor
        self.rank = int(factor.shape[1])
        self.trace = float(trace)
        self.trace_error = float(max(residual_trace, 0.0))
        self.relative_trace_error = self.trace_error / self.trace if self.trace > 0 else 0.0
        self.sampled_error = sampled_error
        self._options = options

    def matrix(self):
        """The dense approximation L Lᵀ (N × N): only for small N."""
        return self.factor @ self.factor.T

    def features(self, x_new):
        """Nyström features L* of new inputs: Θ(x_new, x) ≈ L* Lᵀ."""
        k_new = empirical_ntk(self._model, x_new, self._landmark_x, **self._options)
        return np.asarray(k_new, np.float64) @ self._projection

    def kernel_regression(self, y_train, ridge, *, x_test=None, test_features=None,
                          fx_train_0=None, fx_test_0=None):
        """Ridge regression with the low-rank kernel, through r×r solves.

            f* = f0* + Θ̂* (Θ̂ + λI)⁻¹ (Y − f0),  Θ̂ = L Lᵀ, Θ̂* = L* Lᵀ,

        computed as L* (LᵀL + λI)⁻¹ Lᵀ (Y − f0) (push-through identity): O(N r²)
        time and O(N r) memory; the training-set predictions (x_test=None)
        are L (LᵀL + λI)⁻¹ Lᵀ (Y − f0). Equals `predict.kernel_regression` on the
        dense L Lᵀ.

        Args:
            y_train: targets (N,) or (N, O).
            ridge: λ ≥ 0 (λ > 0 recommended: L Lᵀ has rank r < N).
            x_test: test inputs (their landmark kernel is computed), or
            test_features: precomputed `features(x_test)`.
            fx_train_0, fx_test_0: initial outputs to subtract/add (optional).

        Returns:
            Predictions (N_test, O) or (N_test,) like `y_train`.
        """
        y = np.asarray(y_train, np.float64)
        _validation.check_finite(y, "y_train")
        _validation.check_finite(fx_train_0, "fx_train_0")
        _validation.check_finite(fx_test_0, "fx_test_0")
        _validation.check_finite(test_features, "test_features")
        vector = y.ndim == 1
        y = y[:, None] if vector else y
        if y.shape[0] != self.factor.shape[0]:
            raise ValueError(
                f"Expected `y_train` with {self.factor.shape[0]} rows. "
                f"Received: y_train.shape={np.shape(y_train)}"
            )
        _validation.check_number(ridge, "ridge", 0.0)
        if fx_train_0 is not None:
            y = y - np.asarray(fx_train_0, np.float64).reshape(y.shape[0], -1)
        if test_features is None:
            test_features = self.factor if x_test is None else self.features(x_test)
        test_features = np.asarray(test_features, np.float64)
        gram = self.factor.T @ self.factor + ridge * np.eye(self.rank)
        coefficients = scipy.linalg.solve(gram, self.factor.T @ y, assume_a="pos")
        prediction = test_features @ coefficients
        if fx_test_0 is not None:
            prediction = prediction + np.asarray(fx_test_0, np.float64).reshape(
                prediction.shape[0], -1)
        return prediction[:, 0] if vector else prediction


def _diagonal(model, x, n, block, options):
    """Θ(x_i, x_i) for every i, from the diagonal blocks of size `block`."""
    out = np.zeros(n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        k = np.asarray(empirical_ntk(model, slice_examples(x, start, stop), **options))
        out[start:stop] = np.diag(k)
    return out


def nystrom_ntk(model, x, landmarks, *, trace_axes=(-1,), implementation="auto",
                batch_size=None, memory_budget=None, dtype=None, variables=None,
                rcond=1e-10, error_columns=32, seed=0, verbose=0):
    """Nyström approximation of the empirical NTK Θ(x, x) from landmark columns.

    With C = Θ(x, x_L) (N × m) for m landmark examples x_L and W = Θ(x_L, x_L)
    = U Λ Uᵀ,

        Θ ≈ C W⁺ Cᵀ = L Lᵀ,   L = C U_r Λ_r^{-1/2},

    keeping the r eigenvalues of W above `rcond`·λmax. Cost: the N×m kernel
    C (never N×N), the diagonal of Θ in blocks (N·b entries), and
    `error_columns` extra exact columns for the error estimate. The residual
    Θ − L Lᵀ is positive semidefinite (a Schur complement), so its trace,
    computed exactly from the diagonal, bounds its Frobenius and spectral
    norms; the sampled columns estimate the relative Frobenius error.

    Args:
        model: a Keras model with one output (as in `empirical_ntk`).
        x: inputs with N examples.
        landmarks: an int m (m examples drawn uniformly without replacement
            with `seed`) or an array of distinct indices into x.
        trace_axes: as in `empirical_ntk`; the kernel must be N×N (every
            output axis traced, the default for a vector of logits).
        implementation, batch_size, memory_budget, dtype, variables: as in
            `empirical_ntk`.
        rcond: relative cut-off of the landmark kernel's eigenvalues.
        error_columns: number of non-landmark exact columns for
            `sampled_error` (0 skips it).
        seed: seed of the landmark and column draws.
        verbose: passed to `empirical_ntk`.

    Returns:
        A `NystromNTK` (factor L, rank, errors, `kernel_regression`).

    Example:

    ```python
    approx = keras_ntk.nystrom_ntk(model, x_train, landmarks=1000)
    print(approx.rank, approx.relative_trace_error, approx.sampled_error)
    y_pred = approx.kernel_regression(y_train, ridge=1e-3, x_test=x_test)
    ```
    """
    x_host, n, axes = _kernel_axes(model, x, trace_axes, "nystrom_ntk")
    if axes.vec_shape:
        raise ValueError(
            "Expected `trace_axes` to trace every output axis (an N×N kernel) for "
            f"`nystrom_ntk`. Received: trace_axes={trace_axes} for outputs of shape "
            f"{axes.shape}"
        )
    _validation.check_number(rcond, "rcond", 0.0, 1.0, strict_maximum=True)
    _validation.check_int(error_columns, "error_columns", 0)
    _validation.check_int(seed, "seed", 0)
    _validation.check_float_dtype(dtype)
    rng = np.random.default_rng(seed)
    if isinstance(landmarks, bool):
        raise TypeError(f"Expected `landmarks` to be an int or indices. Received: landmarks={landmarks}")
    if isinstance(landmarks, (int, np.integer)):
        if not 0 < landmarks <= n:
            raise ValueError(
                f"Expected `landmarks` between 1 and N={n}. Received: landmarks={landmarks}"
            )
        index = np.sort(rng.choice(n, size=int(landmarks), replace=False))
    else:
        index = np.asarray(landmarks)
        if (index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer)
                or index.min() < 0 or index.max() >= n or np.unique(index).size != index.size):
            raise ValueError(
                f"Expected `landmarks` to be an int or distinct indices into x (0..{n - 1}). "
                f"Received: landmarks={landmarks!r}"
            )
    options = dict(trace_axes=trace_axes, implementation=implementation,
                   batch_size=batch_size, memory_budget=memory_budget, dtype=dtype,
                   variables=variables, verbose=verbose)
    landmark_x = gather_examples(x_host, index)
    columns = np.asarray(empirical_ntk(model, x_host, landmark_x, **options), np.float64)
    w = columns[index]
    w = (w + w.T) / 2
    values, vectors = np.linalg.eigh(w)
    keep = values > rcond * max(values.max(), 0.0)
    if not keep.any():
        raise ValueError(
            "The landmark kernel is zero: no direction to approximate Θ with. "
            f"Received: landmarks={index.tolist()[:10]}"
        )
    projection = vectors[:, keep] / np.sqrt(values[keep])
    factor = columns @ projection
    diag_block = batch_size or min(n, 128)
    diagonal = _diagonal(model, x_host, n, diag_block,
                         {**options, "batch_size": diag_block})
    residual_trace = float(diagonal.sum() - np.einsum("nr,nr->", factor, factor))
    sampled = None
    rest = np.setdiff1d(np.arange(n), index)
    if error_columns and rest.size:
        pick = np.sort(rng.choice(rest, size=min(int(error_columns), rest.size), replace=False))
        exact = np.asarray(empirical_ntk(model, x_host, gather_examples(x_host, pick),
                                              **options), np.float64)
        approx = factor @ factor[pick].T
        norm = np.linalg.norm(exact)
        sampled = float(np.linalg.norm(exact - approx) / norm) if norm > 0 else 0.0
    return NystromNTK(model, index, landmark_x, projection, factor, diagonal.sum(),
                      residual_trace, sampled, dict(options))
