"""Kernel regression as the studies use it: ridge paths, the linearized predictor, scores.

Shared by study B (`experiments.data_scaling`, `experiments.kernel_evolution`)
and any binary that scores a kernel against a trained network:

* `regression_path`: f*(λ) = Θ*(Θ + λI)⁻¹Y for several ridges in float64,
  one eigendecomposition for all ridges or one in-place Cholesky per ridge;
* `linearized_predictions`: the linearized network's predictor
  f0(X*) + Θ*(Θ + λI)⁻¹(Y − f0(X)) (as λ → 0 the t → ∞ limit of gradient
  descent on the MSE of f0 + J(θ − θ0), Lee et al. 2019), or without f0 the
  kernel predictor;
* `kernel_method_errors`: one kernel on candidates + validation + test sliced
  per training-set size n, the ridge chosen on the validation rows, test error
  and per-example scores;
* `kernel_union`: the inputs of such a kernel, in the order it is sliced;
* `on_grid`, `kernel_cells_table`: a kernel method's cells (lists over their
  seed's sizes) read over the grid of sizes, as results.json tables;
* `mse`, `error_rate`, `cross_entropy`, `per_example_losses`,
  `per_example_cross_entropy`: the scores,
  computed as Keras computes them.
"""

import numpy as np


# Above this many training examples, one Cholesky per ridge instead of one
# eigendecomposition for all ridges (measured: eigh of a 4000² kernel 10 s,
# Cholesky 0.5 s).
CHOLESKY_ABOVE = 2000


def regression_path(k_train, k_eval_train, y_train, ridges, *, solver="auto"):
    """Kernel ridge regression predictions for several ridges, in float64.

    f*(λ) = Θ*(Θ + λ I)⁻¹ Y for every λ in `ridges`. Two solvers:

    * "eigh": one eigendecomposition Θ = V diag(s) Vᵀ (negative rounding-error
      eigenvalues clipped to 0), f*(λ) = (Θ* V) diag(1/(s + λ)) Vᵀ Y: cheap
      for many ridges at small n;
    * "cholesky": per ridge, Θ + λI is copied into ONE work buffer (reused)
      and factorized in place (`scipy.linalg.cho_factor(overwrite_a=True)`);
      n³/3 flops per ridge instead of eigh's ~9n³, and 2n² floats of memory.

    Args:
        k_train: (n, n) kernel on the training inputs.
        k_eval_train: (m, n) kernel between evaluation and training inputs.
        y_train: (n, C) targets.
        ridges: positive ridges λ (absolute).
        solver: "eigh", "cholesky" or "auto" (Cholesky above `CHOLESKY_ABOVE`).

    Returns:
        (len(ridges), m, C) float64 predictions.
    """
    import scipy.linalg

    k_train = np.asarray(k_train, np.float64)
    k_eval_train = np.asarray(k_eval_train, np.float64)
    y_train = np.asarray(y_train, np.float64)
    if solver == "auto":
        solver = "cholesky" if len(k_train) > CHOLESKY_ABOVE else "eigh"
    if solver == "eigh":
        k_train = 0.5 * (k_train + k_train.T)
        values, vectors = np.linalg.eigh(k_train)
        values = np.maximum(values, 0.0)
        projected = k_eval_train @ vectors
        coefficients = vectors.T @ y_train
        return np.stack([projected @ (coefficients / (values + r)[:, None]) for r in ridges])
    if solver != "cholesky":
        raise ValueError(
            f"Expected solver 'eigh', 'cholesky' or 'auto'. Received: solver={solver!r}")
    work = np.empty_like(k_train)
    diagonal = np.arange(len(k_train))
    out = []
    for r in ridges:
        np.copyto(work, k_train)
        work[diagonal, diagonal] += r
        factor = scipy.linalg.cho_factor(work, lower=True, overwrite_a=True, check_finite=False)
        out.append(k_eval_train @ scipy.linalg.cho_solve(factor, y_train, check_finite=False))
    return np.stack(out)


def mse(predictions, one_hot):
    """Mean over examples and classes of (f − y)² (Keras' MeanSquaredError)."""
    return float(np.mean(np.square(np.asarray(predictions, np.float64) - one_hot)))


def error_rate(predictions, labels):
    """Fraction of examples whose arg-max prediction is not the label."""
    return float(np.mean(np.argmax(predictions, axis=-1) != np.asarray(labels)))


def per_example_cross_entropy(logits, labels):
    """Per example: the softmax cross-entropy of its integer label, log Σ e^f − f_y."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=-1)) - shifted[np.arange(len(labels)), labels]


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy of integer labels."""
    return float(np.mean(per_example_cross_entropy(logits, labels)))


def kernel_union(train, test, candidates, validation):
    """(x, y, layout) of a kernel's inputs: candidates, validation, then every test input.

    The order `kernel_indices` and `kernel_method_errors` read: `train` and
    `test` are splits (`.x`, `.y`), `candidates` and `validation` rows of `train`.
    """
    x = np.concatenate([train.x[candidates], train.x[validation], test.x])
    y = np.concatenate([train.y[candidates], train.y[validation], test.y])
    return x, y, {"num_candidates": len(candidates), "num_validation": len(validation),
                  "num_test": len(test.y)}


def kernel_indices(layout, n):
    """Rows of a seed's union kernel (its candidates, validation, test) for one n.

    The union of a seed lists that seed's first `num_candidates` candidates
    (in its permutation order, so the training sets are nested in n), then
    the validation and the test inputs.

    Returns:
        (train rows 0..n−1, validation rows, test rows).
    """
    if not 1 <= n <= layout["num_candidates"]:
        raise ValueError(
            f"Expected 1 <= n <= {layout['num_candidates']} (the candidates of the kernel). "
            f"Received: n={n}"
        )
    start = layout["num_candidates"]
    validation = np.arange(start, start + layout["num_validation"])
    start += layout["num_validation"]
    test = np.arange(start, start + layout["num_test"])
    return np.arange(n), validation, test


def linearized_predictions(k_train, k_eval_train, y_train, ridges, *, f0_train=None,
                           f0_eval=None, solver="auto"):
    """The linearized network's predictor f0(X*) + Θ*(Θ + λI)⁻¹(Y − f0(X)), per ridge.

    As λ → 0 this is where gradient descent on the MSE of the linearized
    network f0 + J(θ − θ0), started at θ0, converges (Lee et al. 2019): the
    minimum-norm change of θ that fits Y. Without f0 it is the kernel
    predictor Θ*(Θ + λI)⁻¹Y.

    Args:
        k_train, k_eval_train, y_train, ridges, solver: as `regression_path`.
        f0_train: (n, C) outputs at the kernel's weights on the training
            inputs (None: the kernel predictor).
        f0_eval: (m, C) the same on the evaluation inputs.

    Returns:
        (len(ridges), m, C) float64 predictions.
    """
    if (f0_train is None) != (f0_eval is None):
        raise ValueError("Expected f0_train and f0_eval both given or both None. Received: "
                         f"f0_train is None={f0_train is None}, f0_eval is None={f0_eval is None}")
    if f0_train is None:
        return regression_path(k_train, k_eval_train, y_train, ridges, solver=solver)
    residual = np.asarray(y_train, np.float64) - np.asarray(f0_train, np.float64)
    return (np.asarray(f0_eval, np.float64)
            + regression_path(k_train, k_eval_train, residual, ridges, solver=solver))


def per_example_losses(predictions, one_hot):
    """Per example: the mean over classes of (f − y)² (Keras' MSE before averaging)."""
    return np.mean(np.square(np.asarray(predictions, np.float64) - one_hot), axis=-1)


def kernel_method_errors(kernel, layout, labels_union, num_classes, sizes, ridge_factors, *,
                         offsets=None, min_n=None, solver="auto"):
    """Test error/loss of kernel regression at every n, one kernel sliced for all.

    Without `offsets`, the kernel predictor f* = Θ*(Θ + λI)⁻¹Y. With
    `offsets` f0 (the network's outputs at the kernel's weights), the
    linearized network's predictor f0* + Θ*(Θ + λI)⁻¹(Y − f0): as λ → 0 the
    t → ∞ limit of gradient descent on MSE of f0 + J(θ − θ0) (Lee et al.
    2019). λ = r · mean(diag Θ_train), r chosen on the validation rows
    (smallest error, ties by MSE). Blocks are read from `kernel` per n (a
    `numpy.memmap` keeps the whole kernel on disk) and converted to float64.

    Args:
        kernel: (N, N) kernel on candidates + validation + test (in that order).
        layout: dict with num_candidates, num_validation, num_test.
        labels_union: (N,) integer labels in the same order.
        num_classes: C.
        sizes: the n grid.
        ridge_factors: λ / mean(diag Θ_train) candidates.
        offsets: None, or (N, C) initial outputs f0 in the same order.
        min_n: sizes below it are not run (None entries): after-kernels
            pre-trained on n0 examples are only compared at n ≥ n0.
        solver: `regression_path`'s solver.

    Returns:
        dict of lists over n: test_error, test_loss, ridge_factor,
        validation_error; and arrays `correct` and `example_loss` of shape
        (len(sizes), num_test) (NaN rows for skipped sizes).
    """
    one_hot = np.eye(num_classes)[labels_union]
    offsets = None if offsets is None else np.asarray(offsets, np.float64)
    out = {"test_error": [], "test_loss": [], "ridge_factor": [], "validation_error": []}
    correct = np.full((len(sizes), layout["num_test"]), np.nan)
    example_loss = np.full((len(sizes), layout["num_test"]), np.nan)
    for index, n in enumerate(sizes):
        if min_n is not None and n < min_n:
            for key in out:
                out[key].append(None)
            continue
        train, validation, test = kernel_indices(layout, n)
        evaluation = np.concatenate([validation, test])
        k_train = np.asarray(kernel[:n, :n], np.float64)
        k_eval_train = np.asarray(kernel[evaluation[0]:evaluation[-1] + 1, :n], np.float64)
        scale = float(np.mean(np.diag(k_train)))
        predictions = linearized_predictions(
            k_train, k_eval_train, one_hot[train], [r * scale for r in ridge_factors],
            f0_train=None if offsets is None else offsets[train],
            f0_eval=None if offsets is None else offsets[evaluation], solver=solver)
        del k_train
        nv = len(validation)
        scores = [(error_rate(p[:nv], labels_union[validation]), mse(p[:nv], one_hot[validation]))
                  for p in predictions]
        best = min(range(len(ridge_factors)), key=lambda i: scores[i])
        test_predictions = predictions[best][nv:]
        correct[index] = np.argmax(test_predictions, axis=-1) == labels_union[test]
        example_loss[index] = per_example_losses(test_predictions, one_hot[test])
        out["test_error"].append(float(1.0 - correct[index].mean()))
        out["test_loss"].append(float(example_loss[index].mean()))
        out["ridge_factor"].append(float(ridge_factors[best]))
        out["validation_error"].append(scores[best][0])
    out["correct"], out["example_loss"] = correct, example_loss
    return out


def on_grid(cell, key, sizes):
    """A kernel cell's list `key` over the grid `sizes` (None: size not run for its seed).

    Cells list their values over their seed's sizes `n`; cells written before
    that hold one value per grid size.
    """
    if not cell:
        return [None] * len(sizes)
    if "n" not in cell:
        return list(cell[key])
    values = dict(zip(cell["n"], cell[key]))
    return [values.get(n) for n in sizes]


def kernel_cells_table(seed_cells, sizes):
    """A kernel method's cells (one per seed, {}: missing) as results.json entries.

    ridge_factor per size and seed (None: size not run), with_f0, and for
    after-kernels the pre-training fits' cap hits and steps.
    """
    ridges = [on_grid(cell, "ridge_factor", sizes) for cell in seed_cells]
    entry = {"ridge_factor": [[r[k] for r in ridges] for k in range(len(sizes))],
             "with_f0": any(cell.get("with_f0", False) for cell in seed_cells)}
    pre = [cell["pretraining"] for cell in seed_cells if "pretraining" in cell]
    if pre:
        entry["pretraining_cap_hits"] = int(sum(bool(p.get("hit_cap")) for p in pre))
        entry["pretraining_steps"] = [p.get("steps") for p in pre]
    return entry

