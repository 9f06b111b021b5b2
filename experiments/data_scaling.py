"""Study B (1 of 2): test error against training-set size n, and its exponent.

Reproduces the data-scaling comparison of Vyas, Nakkiran and Bansal (2022),
"Limitations of the NTK for understanding generalization in deep learning":
for training-set sizes n on a geometric grid and several seeds, the test
error of

* `network`: the network trained from θ0 to a stated criterion
  (`stop_criterion`: zero training error, or training loss below
  `convergence_loss`) with a step cap (`train_steps`); cells that stop at the
  cap are counted (`cap_hits`) and marked in the figures;
* `entk_init`: the linearized network's predictor at θ0,
  f0(x) + Θ(x,X)(Θ + λI)⁻¹(Y − f0(X)) (the network carries f0, so this is
  the fair init-kernel baseline; as λ → 0 it is the t → ∞ limit of gradient
  descent on MSE of the linearized network, Lee et al. 2019);
* `entk_init_centred`: the kernel-only predictor Θ(x,X)(Θ + λI)⁻¹Y at θ0;
* `after_kernel_n0=<n0>`: kernel regression with the "after kernel", the
  eNTK of the same network after training from θ0 on n0 OTHER examples
  (with the network recipe); kernel-only by default (f at the pre-trained
  weights already carries the n0 labels), with f0 when `after_kernel_f0`.
  Run and fitted only at n ≥ n0;
* `infinite_ntk`: kernel regression with the infinite-width NTK of the
  NTK-parameterized version of the architecture
  (`experiments.models.ntk_parameterized`; Dense/Conv2D/ReLU/Flatten/average
  pooling only: max pooling, e.g. LeNet, is not supported and is skipped).

Exponents (`experiments.stats`): mean ∝ n^−α by least squares on log–log
over a stated window (`fit_window`; after-kernels from max(low, n0)), with
95% intervals from a bootstrap over seeds AND test examples (per-example
results are stored in `examples/`); local exponents over the
`local_points` largest sizes; paired differences α_network − α_method with
the same draws for both. Loss exponents are compared only when the network
is trained with the MSE (never a cross-entropy against the kernels' MSE).

Data (`_partition`): the training split is cut once (permutation with
`split_seed`) into a validation set (`num_validation`, used only to choose
the ridge), a pool of max(n0) examples the after-kernels are trained on, and
the candidates the n regression/training examples are drawn from (per seed:
a permutation of the candidates, the first n; nested in n). The three parts
and the test split are disjoint. Sizes ≥ `large_n` may run on the first
`seeds_large_n` seeds only.

Kernel regression (`linearized_predictions`, `regression_path`): float64,
one-hot targets, λ = r · mean(diag Θ_train) with r chosen on the validation
set (smallest validation error, ties by validation MSE) from
`ridge_factors`; one eigendecomposition for all ridges up to
`CHOLESKY_ABOVE` training examples, one in-place Cholesky per ridge above.
The eNTK of a network with C logits is the logit-averaged kernel
(`trace_axes=(-1,)`), used as Θ ⊗ I_C: an approximation of the full
C×C-block kernel (exact for the infinite NTK, whose logit blocks are
diagonal).

Each kernel is computed ONCE per (method, seed) on that seed's union (its
first max(n) candidates, the validation and the test inputs), stored as a
float32 .npy and read back as a memmap, so each n loads only its blocks
(`kernel_indices`); the file is deleted when the cell is done.

Test loss: per test example the mean over classes of (f − y)² with one-hot
y (Keras' MSE) for the kernels and the MSE network; the softmax
cross-entropy for a cross-entropy network (`loss_name` says which).

Run: `python -m experiments.data_scaling --gin_file=data_scaling/digits_mlp.gin
--output_dir=runs/b_scaling`.
"""

import os
import time

import numpy as np
from absl import logging

from experiments import launcher

NETWORK_LOSSES = ("mse", "cross_entropy")
_AFTER = "after_kernel_n0="


# ---------------------------------------------------------------- pure maths


def geometric_sizes(smallest, largest, num):
    """`num` integers from `smallest` to `largest` on a geometric grid (distinct, sorted)."""
    if not 1 <= smallest <= largest or num < 1:
        raise ValueError(
            "Expected 1 <= smallest <= largest and num >= 1. "
            f"Received: smallest={smallest}, largest={largest}, num={num}"
        )
    return sorted({int(round(v)) for v in np.geomspace(smallest, largest, num)})


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


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy of integer labels."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-np.mean(log_probabilities[np.arange(len(labels)), labels]))


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


# ---------------------------------------------------------------- the study


def _partition(num_train, num_validation, n0_max, split_seed):
    """Fixed disjoint index sets of the training split: validation, n0 pool, candidates."""
    order = np.random.RandomState(split_seed).permutation(num_train)
    validation = order[:num_validation]
    pool = order[num_validation:num_validation + n0_max]
    candidates = order[num_validation + n0_max:]
    return validation, pool, candidates


def _validate(dataset, model, methods, model_builders, n0s, network_loss, stop_criterion,
              sizes, seeds, large_n, seeds_large_n, fit_window):
    """Refuses impossible settings before any work, naming the gin binding."""
    from experiments import data as data_lib

    if dataset.split("/")[0] not in data_lib.KNOWN_DATASETS:
        raise ValueError(
            f"Unknown dataset. Known datasets: {', '.join(data_lib.KNOWN_DATASETS)}. "
            f"Received: data_scaling.run.dataset={dataset!r}"
        )
    if model not in model_builders:
        raise ValueError(
            f"Unknown model. Known models: {', '.join(sorted(model_builders))}. "
            f"Received: data_scaling.run.model={model!r}"
        )
    known = {"network", "entk_init", "entk_init_centred", "infinite_ntk", "after_kernel"}
    bad = [m for m in methods if m not in known]
    if bad or not methods or len(set(methods)) != len(methods):
        raise ValueError(
            f"Unknown or repeated method(s) {bad}. Known methods: {', '.join(sorted(known))} "
            "(after_kernel runs one method per n0 in `n0s`). "
            f"Received: data_scaling.run.methods={list(methods)!r}"
        )
    if "after_kernel" in methods and (not n0s or any(int(v) < 1 for v in n0s)):
        raise ValueError(
            f"Expected positive n0s for after_kernel. Received: data_scaling.run.n0s={list(n0s)!r}")
    if network_loss not in NETWORK_LOSSES:
        raise ValueError(f"Expected network_loss in {NETWORK_LOSSES}. "
                         f"Received: data_scaling.run.network_loss={network_loss!r}")
    if stop_criterion not in STOP_CRITERIA:
        raise ValueError(f"Expected stop_criterion in {STOP_CRITERIA}. "
                         f"Received: data_scaling.run.stop_criterion={stop_criterion!r}")
    if sizes is not None and (not sizes or any(int(n) < 1 for n in sizes)
                              or sorted(set(int(n) for n in sizes)) != [int(n) for n in sizes]):
        raise ValueError("Expected positive sizes in increasing order without repeats. "
                         f"Received: data_scaling.run.sizes={list(sizes)!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"Expected distinct seeds. Received: data_scaling.run.seeds={list(seeds)!r}")
    if (large_n is None) != (seeds_large_n is None) or (
            seeds_large_n is not None and not 1 <= seeds_large_n <= len(seeds)):
        raise ValueError(
            "Expected large_n and seeds_large_n both set (1 <= seeds_large_n <= len(seeds)) or "
            f"both None. Received: data_scaling.run.large_n={large_n}, "
            f"data_scaling.run.seeds_large_n={seeds_large_n}")
    if fit_window is not None and (len(fit_window) != 2 or (
            None not in fit_window and fit_window[0] > fit_window[1])):
        raise ValueError("Expected fit_window (low, high) with low <= high (None: open). "
                         f"Received: data_scaling.run.fit_window={fit_window!r}")


def _predict(model, x, batch_size=1024):
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)]).astype(np.float64)


STOP_CRITERIA = ("train_error", "train_loss")


def _stop_at_criterion(model, x, labels, criterion, threshold, state):
    """A callback that stops fit at the end of the first chunk meeting the criterion.

    "train_error": no training example misclassified (arg-max over the
    logits, on the whole training set in inference mode); "train_loss": the
    chunk's mean training loss below `threshold`. `state["reached"]` records
    whether it was met; `state["train_error"]` the last measured error.
    """
    import keras

    def check(epoch, logs):
        if criterion == "train_error":
            state["train_error"] = error_rate(_predict(model, x), labels)
            reached = state["train_error"] == 0.0
        else:
            reached = bool(logs) and logs.get("loss", np.inf) < threshold
        if reached:
            state["reached"] = True
            model.stop_training = True

    return keras.callbacks.LambdaCallback(on_epoch_end=check)


def train_network(model, x, labels, num_classes, *, loss, train_steps, batch_size,
                  learning_rate, momentum, convergence_loss, seed, jit_compile, strategy,
                  stop_criterion="train_loss", tensorboard_dir=None, chunk_steps=50,
                  crash_after_epochs=None):
    """Trains `model` to a stated criterion: SGD (constant rate, momentum), MSE or cross-entropy.

    Runs at most `train_steps` steps (the cap) in chunks of `chunk_steps` (a
    Keras "epoch" here) and stops after the first chunk that meets
    `stop_criterion`: "train_error" (zero training error) or "train_loss"
    (mean training loss of the chunk below `convergence_loss`).

    Returns:
        dict(steps, train_loss, train_error, reached, hit_cap): `hit_cap` is
        True when the cap stopped training before the criterion was met.
    """
    import keras

    from experiments import data as data_lib
    from experiments import train as train_lib

    if stop_criterion not in STOP_CRITERIA:
        raise ValueError(
            f"Expected stop_criterion in {STOP_CRITERIA}. "
            f"Received: stop_criterion={stop_criterion!r}"
        )
    keras.utils.set_random_seed(seed)
    batch_size = min(batch_size, len(x))
    if loss == "mse":
        targets = np.eye(num_classes, dtype=np.float32)[labels]
        loss_object = keras.losses.MeanSquaredError()
    else:
        targets = np.asarray(labels, np.int32)
        loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with strategy.scope():
        model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                      loss=loss_object, jit_compile=jit_compile)
    # Epoch e of the examples in the order data.epoch_order(len(x), seed, e), forever.
    dataset = data_lib.training_dataset(x, targets, batch_size=batch_size, seed=seed)
    state = {"reached": False, "train_error": None}
    callbacks = [_stop_at_criterion(model, x, labels, stop_criterion, convergence_loss, state)]
    if crash_after_epochs is not None:  # Tests of resuming: killed after this many chunks.
        callbacks.append(train_lib.CrashAfterEpochs(crash_after_epochs))
    if tensorboard_dir:
        callbacks.append(keras.callbacks.TensorBoard(tensorboard_dir, write_graph=False,
                                                     profile_batch=0))
    chunk = min(chunk_steps, train_steps)
    history = model.fit(dataset, epochs=max(1, train_steps // chunk), steps_per_epoch=chunk,
                        callbacks=callbacks, verbose=0)
    losses = history.history["loss"]
    if state["train_error"] is None:
        state["train_error"] = error_rate(_predict(model, x), labels)
    return {"steps": len(losses) * chunk, "train_loss": float(losses[-1]),
            "train_error": float(state["train_error"]), "reached": bool(state["reached"]),
            "hit_cap": not state["reached"], "stop_criterion": stop_criterion}


def _method_names(methods, n0s):
    names = []
    for m in methods:
        names += [f"{_AFTER}{int(v)}" for v in n0s] if m == "after_kernel" else [m]
    return names


def seed_sizes(sizes, seeds, large_n=None, seeds_large_n=None):
    """The sizes each seed runs: sizes ≥ `large_n` only on the first `seeds_large_n` seeds."""
    out = {}
    for index, seed in enumerate(seeds):
        limited = large_n is not None and seeds_large_n is not None and index >= seeds_large_n
        out[seed] = [n for n in sizes if not (limited and n >= large_n)]
    return out


def _examples_path(output_dir, key):
    """Per-test-example results of cell `key`, kept in its cell-store directory."""
    return os.path.join(output_dir, "cells", key, "examples.npz")


def _save_examples(path, **arrays):
    from experiments import cells as cells_lib

    cells_lib.save_npz_atomic(path, **{k: np.asarray(v) for k, v in arrays.items()})


def run(
    *,
    output_dir,
    strategy,
    model_builders,
    data_dir=None,
    dataset="digits",
    model="mlp",
    methods=("network", "entk_init", "after_kernel", "infinite_ntk"),
    n0s=(100, 300),
    sizes=None,
    smallest_n=50,
    num_sizes=6,
    seeds=(0, 1, 2, 3, 4),
    large_n=None,
    seeds_large_n=None,
    split_seed=0,
    num_validation=150,
    num_train=None,
    num_test=None,
    ridge_factors=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    network_loss="mse",
    stop_criterion="train_loss",
    train_steps=2000,
    batch_size=64,
    learning_rate=0.05,
    momentum=0.9,
    convergence_loss=1e-3,
    jit_compile="auto",
    infinite_sigma_w2=1.0,
    infinite_sigma_b2=0.0,
    ntk_batch_size=None,
    ntk_implementation="auto",
    after_kernel_f0=False,
    fit_window=None,
    local_points=3,
    num_bootstrap=2000,
    max_new_cells=None,
    write_figures=True,
    overwrite=False,
    simulate_crash_after_epochs=None,
):
    """Runs the data-scaling study and writes results.json and figures into `output_dir`.

    Cells (network: one per (seed, n); kernel methods: one per seed, all n
    from one sliced kernel) live in the cell store (`experiments.cells`,
    `output_dir/cells/`) with their operative settings; finished ones are
    skipped, ones of other settings refused (or recomputed with
    `overwrite`). Each cell's directory holds its per-test-example
    correctness and losses (`examples.npz`), the after-kernel's pre-trained
    weights, and, while the cell runs, its kernel (float32 .npy read back as
    a memmap: blocks per n).

    Args:
        output_dir: the run's directory (local).
        strategy: the `tf.distribute.Strategy` models are built in.
        model_builders: name → builder(input_shape, num_outputs) (gin-configured).
        data_dir: tfds data directory.
        dataset: "digits", "mnist1d" (or a config such as "mnist1d/8000"),
            "mnist" or "cifar10".
        model: the architecture (a name in `model_builders`), C logits.
        methods: among "network", "entk_init" (the linearized network's
            predictor f0 + Θ(Θ+λ)⁻¹(Y − f0) at θ0), "entk_init_centred" (the
            kernel-only predictor at θ0), "after_kernel", "infinite_ntk".
        n0s: pre-training sizes of the after-kernels (fitted on n ≥ n0 only).
        sizes: the n grid; None: `num_sizes` geometric sizes from `smallest_n`
            to all candidates.
        smallest_n, num_sizes: the default grid.
        seeds: seeds (θ0 and the training subsets).
        large_n, seeds_large_n: sizes ≥ `large_n` run only on the first
            `seeds_large_n` seeds (None: every seed at every size).
        split_seed: seed of the validation / n0 pool / candidates partition.
        num_validation: validation examples (ridge choice only).
        num_train, num_test: use the first examples of each split (None: all).
        ridge_factors: λ / mean(diag Θ_train) candidates.
        network_loss: "mse" (one-hot targets) or "cross_entropy".
        stop_criterion: "train_error" (train until no training error) or
            "train_loss" (until the training loss < `convergence_loss`).
        train_steps: the step cap; cells that hit it are counted in results.json.
        batch_size, learning_rate, momentum, convergence_loss: the network
            recipe (SGD, constant rate).
        jit_compile: passed to `model.compile`.
        infinite_sigma_w2, infinite_sigma_b2: σw², σb² of the NTK-parameterized
            twin (1, 0 match LeCun-normal weights and zero biases at init).
        ntk_batch_size, ntk_implementation: `keras_ntk.empirical_ntk` options.
        after_kernel_f0: after-kernels also add the pre-trained network's
            outputs (f_n0 + Θ(Θ+λ)⁻¹(Y − f_n0)); default kernel-only.
        fit_window: (low, high) sizes of the power-law fits (None ends: open;
            after-kernels start at max(low, n0)).
        local_points: the local exponent is fitted over this many largest sizes.
        num_bootstrap: bootstrap resamples (seeds × test examples).
        max_new_cells: stop after this many newly finished cells (None: all).
        overwrite: discard stored cells computed with other settings instead
            of refusing to run (`--overwrite`).
        simulate_crash_after_epochs: kill the process after this many chunks
            of the first network fit (tests of resuming).
        write_figures: draw the figures at the end.

    Returns:
        The results dictionary (also in results.json).
    """
    import keras

    import keras_ntk
    from experiments import cells as cell_store
    from experiments import data as data_lib
    from experiments import models as models_lib

    methods = list(methods)
    n0s = [int(v) for v in n0s] if "after_kernel" in methods else []
    _validate(dataset, model, methods, model_builders, n0s, network_loss, stop_criterion,
              sizes, seeds, large_n, seeds_large_n, fit_window)
    data = data_lib.load_dataset(dataset, num_train=num_train, num_test=num_test,
                                 data_dir=data_dir)
    num_classes = int(max(data.train.y.max(), data.test.y.max())) + 1
    validation, pool, candidates = _partition(len(data.train.y), num_validation,
                                              max(n0s, default=0), split_seed)
    if len(candidates) < 2:
        raise ValueError(
            "No candidates left for the regression samples after the validation set and the "
            f"n0 pool. Received: num_train={len(data.train.y)}, num_validation={num_validation}, "
            f"n0s={n0s}"
        )
    sizes = ([int(v) for v in sizes] if sizes is not None
             else geometric_sizes(min(smallest_n, len(candidates)), len(candidates), num_sizes))
    if max(sizes) > len(candidates):
        raise ValueError(
            f"Expected sizes at most {len(candidates)} (candidates disjoint from the validation "
            f"set and the n0 pool: {len(data.train.y)} training examples − num_validation="
            f"{num_validation} − max(n0s)={max(n0s, default=0)}). Received: "
            f"data_scaling.run.sizes={sizes}"
        )
    per_seed_sizes = seed_sizes(sizes, list(seeds), large_n, seeds_large_n)
    num_test_used = len(data.test.y)
    names = _method_names(methods, n0s)

    def union(seed):
        """(x, y, layout) of a seed: its first n_max candidates, validation, test."""
        n_max = max(per_seed_sizes[seed])
        chosen = candidates[np.random.RandomState(seed).permutation(len(candidates))[:n_max]]
        x = np.concatenate([data.train.x[chosen], data.train.x[validation], data.test.x])
        y = np.concatenate([data.train.y[chosen], data.train.y[validation], data.test.y])
        return x, y, {"num_candidates": n_max, "num_validation": len(validation),
                      "num_test": num_test_used}

    results_path = os.path.join(output_dir, "results.json")
    store = cell_store.CellStore(output_dir, overwrite=overwrite)
    infinite_skipped = None

    def build(weights_path=None):
        with strategy.scope():
            network = model_builders[model](data.input_shape, num_classes)
            if weights_path is not None:
                network.load_weights(weights_path)
        return network

    def path(*parts):
        return os.path.join(output_dir, *parts)

    # The operative settings of every cell (what only changes speed or memory,
    # jit_compile and ntk_batch_size, is left out).
    common = {"dataset": dataset, "num_train": len(data.train.y), "num_test": len(data.test.y),
              "model": model, "architecture": cell_store.architecture(build()),
              "split_seed": split_seed, "num_validation": num_validation,
              "n0_pool": max(n0s, default=0)}
    network_recipe = dict(loss=network_loss, train_steps=train_steps, batch_size=batch_size,
                          learning_rate=learning_rate, momentum=momentum,
                          convergence_loss=convergence_loss, stop_criterion=stop_criterion)

    def cell_settings(name, seed, n):
        if name == "network":
            return dict(common, method=name, seed=seed, n=n, **network_recipe)
        # The kernel's union (and so its inputs) is fixed by the seed's largest size.
        kernel = dict(common, method=name, seed=seed, sizes=per_seed_sizes[seed],
                      ridge_factors=list(ridge_factors), test_inputs=num_test_used)
        if name == "infinite_ntk":
            return dict(kernel, infinite_sigma_w2=infinite_sigma_w2,
                        infinite_sigma_b2=infinite_sigma_b2)
        if name in ("entk_init", "entk_init_centred"):
            return dict(kernel, ntk_implementation=ntk_implementation)
        return dict(kernel, ntk_implementation=ntk_implementation,
                    after_kernel_f0=bool(after_kernel_f0), **network_recipe)

    def init_weights(seed):
        key = f"init-seed{seed}"
        store.get(key, dict(common, seed=seed))  # Refuses a θ0 of other settings.
        weights_path = os.path.join(store.cell_dir(key), "theta0.weights.h5")
        if not cell_store.load_weights_or_discard(build(), weights_path):
            keras.utils.set_random_seed(seed)
            cell_store.save_weights_atomic(build(), weights_path)
        return weights_path

    recipe = dict(network_recipe, jit_compile=jit_compile, strategy=strategy)
    settings = dict(network_recipe, model=model, ridge_factors=list(ridge_factors),
                    split_seed=split_seed, infinite_sigma_w2=infinite_sigma_w2,
                    infinite_sigma_b2=infinite_sigma_b2, after_kernel_f0=bool(after_kernel_f0),
                    large_n=large_n, seeds_large_n=seeds_large_n,
                    fit_window=None if fit_window is None else list(fit_window),
                    local_points=local_points)

    def kernel_on_disk(kernel_fn, key):
        """Computes a kernel, stores it as float32 .npy in the cell's directory; a memmap."""
        kernel_path = os.path.join(store.cell_dir(key), "kernel.npy")
        kernel = np.asarray(kernel_fn(), np.float32)
        np.save(kernel_path, kernel)
        del kernel
        return kernel_path, np.load(kernel_path, mmap_mode="r")

    # Kernel cells grouped by their kernel: (source, seed) → method names.
    work = []
    for seed in seeds if "network" in names else ():
        work += [("network", seed, n) for n in per_seed_sizes[seed]]
    kernel_groups = []
    for seed in seeds:
        init_names = [m for m in names if m in ("entk_init", "entk_init_centred")]
        if init_names:
            kernel_groups.append(("init", seed, init_names))
        kernel_groups += [(name, seed, [name]) for name in names if name.startswith(_AFTER)]
        if "infinite_ntk" in names:
            kernel_groups.append(("infinite_ntk", seed, ["infinite_ntk"]))
    # Cheap cells first: networks in increasing n (all seeds); a seed's kernel cells right
    # after the networks of its largest n.
    work = sorted(work + kernel_groups, key=lambda item: (
        (item[2], 0) if item[0] == "network" else (max(per_seed_sizes[item[1]]), 1)))

    def keys_of(source, seed, n_or_names):
        if source == "network":
            return [(f"network-seed{seed}-n{n_or_names}", "network", n_or_names)]
        return [(f"{name}-seed{seed}", name, None) for name in n_or_names]

    # Every stored cell is checked before any work: other settings are refused here. A
    # record whose per-example file is missing is computed again.
    cells = {}
    for item in work:
        for key, name, n in keys_of(*item):
            record = store.get(key, cell_settings(name, item[1], n))
            if record is not None and os.path.exists(_examples_path(output_dir, key)):
                cells[key] = record
    progress = cell_store.Progress(len(work), "cell")
    new_cells = 0
    one_hot_test = np.eye(num_classes)[data.test.y]
    for source, seed, n_or_names in work:
        keys = keys_of(source, seed, n_or_names)
        label = ",".join(key for key, _, _ in keys)
        if all(key in cells for key, _, _ in keys):
            progress.skip(label)
            continue
        if max_new_cells is not None and new_cells >= max_new_cells:
            logging.info("Stopping after %d new cell(s) (max_new_cells).", new_cells)
            break
        progress.begin(label)
        x_union, y_union, layout = union(seed)
        new = {}
        if source == "network":
            n = n_or_names
            key = keys[0][0]
            network = build(init_weights(seed))
            fit = train_network(network, x_union[:n], y_union[:n], num_classes, seed=seed,
                                tensorboard_dir=path("tensorboard", key),
                                crash_after_epochs=simulate_crash_after_epochs, **recipe)
            logits = _predict(network, data.test.x)
            correct = np.argmax(logits, -1) == data.test.y
            if network_loss == "mse":
                example_loss = per_example_losses(logits, one_hot_test)
            else:
                shifted = logits - logits.max(-1, keepdims=True)
                example_loss = (np.log(np.exp(shifted).sum(-1))
                                - shifted[np.arange(len(logits)), data.test.y])
            _save_examples(_examples_path(output_dir, key), correct=correct,
                           example_loss=example_loss)
            new[key] = dict(fit, test_error=float(1 - correct.mean()),
                            test_loss=float(example_loss.mean()))
        else:
            offsets, min_n, pretraining = None, None, None
            kernel_key = keys[0][0]
            if source == "infinite_ntk":
                kernel_path = None
                try:
                    twin = models_lib.ntk_parameterized(build(), sigma_w2=infinite_sigma_w2,
                                                        sigma_b2=infinite_sigma_b2)
                    kernel_path, kernel = kernel_on_disk(
                        lambda: keras_ntk.infinite_kernels(twin, x_union).ntk, kernel_key)
                except ValueError as error:
                    infinite_skipped = str(error)
                    logging.warning("infinite_ntk skipped: %s", error)
                if kernel_path is None:
                    progress.skip(label, "no infinite NTK for this architecture")
                    continue
            else:
                if source == "init":
                    network = build(init_weights(seed))
                else:
                    min_n = int(source[len(_AFTER):])
                    after_path = os.path.join(store.cell_dir(kernel_key), "after.weights.h5")
                    fit_path = os.path.join(store.cell_dir(kernel_key), "pretraining.json")
                    network = build()
                    if (os.path.exists(fit_path)
                            and cell_store.load_weights_or_discard(network, after_path)):
                        pretraining = cell_store.load_json(fit_path)
                    else:
                        network = build(init_weights(seed))
                        rows = pool[np.random.RandomState(1000 + seed).permutation(
                            len(pool))[:min_n]]
                        pretraining = train_network(
                            network, data.train.x[rows], data.train.y[rows], num_classes,
                            seed=seed, tensorboard_dir=path("tensorboard", kernel_key),
                            crash_after_epochs=simulate_crash_after_epochs, **recipe)
                        cell_store.save_weights_atomic(network, after_path)
                        cell_store.write_json_atomic(fit_path, pretraining)
                        logging.info("%s: trained on n0=%d pool examples: %s", label, min_n,
                                     pretraining)
                kernel_started = time.time()
                kernel_path, kernel = kernel_on_disk(
                    lambda: keras_ntk.empirical_ntk(network, x_union, batch_size=ntk_batch_size,
                                                    implementation=ntk_implementation),
                    kernel_key)
                logging.info("%s: eNTK on %d inputs in %.1f s", label, len(x_union),
                             time.time() - kernel_started)
                if source == "init" or after_kernel_f0:
                    offsets = _predict(network, x_union)
            for key, name, _ in keys:
                use_f0 = name == "entk_init" or (name.startswith(_AFTER) and after_kernel_f0)
                scores = kernel_method_errors(
                    kernel, layout, y_union, num_classes, per_seed_sizes[seed], ridge_factors,
                    offsets=offsets if use_f0 else None, min_n=min_n)
                correct, example_loss = scores.pop("correct"), scores.pop("example_loss")
                # Rows for every size of the grid (NaN: not run for this seed).
                full_correct = np.full((len(sizes), num_test_used), np.nan)
                full_loss = np.full((len(sizes), num_test_used), np.nan)
                rows = [sizes.index(n) for n in per_seed_sizes[seed]]
                full_correct[rows], full_loss[rows] = correct, example_loss
                _save_examples(_examples_path(output_dir, key), correct=full_correct,
                               example_loss=full_loss)
                cell = {name_: [None] * len(sizes) for name_ in scores}
                for score, values in scores.items():
                    for row, value in zip(rows, values):
                        cell[score][row] = value
                cell["with_f0"] = bool(use_f0)
                if pretraining is not None:
                    cell["pretraining"] = pretraining
                new[key] = cell
            del kernel
            os.remove(kernel_path)
        for key, name, n in keys:
            store.put(key, cell_settings(name, seed, n), new[key])
        cells.update(new)
        results = _assemble(dataset, sizes, list(seeds), names, cells, num_test_used, n0s,
                            network_loss, num_bootstrap, infinite_skipped, settings,
                            output_dir, fit_window, local_points, finished=False)
        cell_store.write_json_atomic(results_path, results)
        new_cells += 1
        progress.finish(label)
    results = _assemble(dataset, sizes, list(seeds), names, cells, num_test_used, n0s,
                        network_loss, num_bootstrap, infinite_skipped, settings, output_dir,
                        fit_window, local_points, finished=progress.done == progress.total)
    cell_store.write_json_atomic(results_path, results)
    _write_summaries(output_dir, results)
    if write_figures:
        draw_figures(results, os.path.join(output_dir, "figures"))
    return results


def _examples_array(output_dir, names_and_rows, sizes, seeds, num_test, key):
    """(K, S, T) per-example values of one method from its cells' .npz files (NaN: missing)."""
    out = np.full((len(sizes), len(seeds), num_test), np.nan)
    for (cell_id, row), column in names_and_rows:
        file = _examples_path(output_dir, cell_id)
        if not os.path.exists(file):
            continue
        from experiments import cells as cells_lib

        values = cells_lib.load_npz(file)[key]
        if row is None:
            out[:, column] = values
        else:
            out[row, column] = values
    return out


def _assemble(dataset, sizes, seeds, names, cells, num_test, n0s, network_loss, num_bootstrap,
              infinite_skipped, settings, output_dir, fit_window, local_points, finished):
    """The results.json dictionary from the finished cells (missing values: null)."""
    from experiments import stats

    # Half a test error: the floor of a mean error before taking logs.
    floor = 0.5 / num_test
    low, high = (None, None) if fit_window is None else fit_window
    methods, arrays = {}, {}
    for name in names:
        if name == "network":
            sources = [((f"network-seed{s}-n{n}", k), j) for k, n in enumerate(sizes)
                       for j, s in enumerate(seeds) if f"network-seed{s}-n{n}" in cells]
        else:
            sources = [((f"{name}-seed{s}", None), j) for j, s in enumerate(seeds)
                       if f"{name}-seed{s}" in cells]
        if not sources:
            continue
        correct = _examples_array(output_dir, sources, sizes, seeds, num_test, "correct")
        losses = _examples_array(output_dir, sources, sizes, seeds, num_test, "example_loss")
        errors = 1.0 - correct
        n0 = int(name[len(_AFTER):]) if name.startswith(_AFTER) else None
        window = (low if n0 is None else max(low or 0, n0), high)
        fits = {
            "error": stats.fit_exponent(sizes, errors, window=window, floor=floor,
                                        num_bootstrap=num_bootstrap),
            "loss": stats.fit_exponent(sizes, losses, window=window, num_bootstrap=num_bootstrap),
            "error_local": stats.local_exponent(sizes, errors, num_largest=local_points,
                                                floor=floor, num_bootstrap=num_bootstrap),
            "loss_local": stats.local_exponent(sizes, losses, num_largest=local_points,
                                               num_bootstrap=num_bootstrap),
        }

        def table(values):
            means = np.where(np.all(np.isfinite(values), axis=2), values.mean(axis=2), np.nan)
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in means]

        entry = {
            "test_error": table(errors),
            "alpha": fits["error"]["alpha"],
            "alpha_interval": fits["error"]["alpha_interval"],
            "test_loss": table(losses),
            "alpha_loss": fits["loss"]["alpha"],
            "alpha_loss_interval": fits["loss"]["alpha_interval"],
            "loss_name": ("cross_entropy" if name == "network" and network_loss != "mse"
                          else "mse"),
            "fit_window": [window[0], window[1]],
            "fit_sizes_error": fits["error"]["sizes_used"],
            "fit_sizes_loss": fits["loss"]["sizes_used"],
            "intercept": fits["error"]["intercept"],
            "intercept_loss": fits["loss"]["intercept"],
            "local_alpha": fits["error_local"]["alpha"],
            "local_alpha_interval": fits["error_local"]["alpha_interval"],
            "local_alpha_sizes": fits["error_local"]["sizes_used"],
            "local_alpha_loss": fits["loss_local"]["alpha"],
            "local_alpha_loss_interval": fits["loss_local"]["alpha_interval"],
        }
        if name != "network":
            entry["ridge_factor"] = [[cells.get(f"{name}-seed{s}", {}).get(
                "ridge_factor", [None] * len(sizes))[k] for s in seeds]
                for k in range(len(sizes))]
            entry["with_f0"] = any(cells.get(f"{name}-seed{s}", {}).get("with_f0", False)
                                   for s in seeds)
            pre = [cells[f"{name}-seed{s}"]["pretraining"] for s in seeds
                   if "pretraining" in cells.get(f"{name}-seed{s}", {})]
            if pre:
                entry["pretraining_cap_hits"] = int(sum(bool(p.get("hit_cap")) for p in pre))
                entry["pretraining_steps"] = [p.get("steps") for p in pre]
        else:
            def per_cell(key):
                return [[cells.get(f"network-seed{s}-n{n}", {}).get(key) for s in seeds]
                        for n in sizes]

            entry["train_steps"] = per_cell("steps")
            entry["train_loss"] = per_cell("train_loss")
            entry["train_error"] = per_cell("train_error")
            entry["hit_cap"] = per_cell("hit_cap")
            entry["cap_hits"] = int(sum(bool(v) for row in entry["hit_cap"] for v in row))
            entry["runs"] = int(sum(v is not None for row in entry["hit_cap"] for v in row))
        methods[name] = entry
        arrays[name] = {"test_error": errors, "test_loss": losses, "window": window}
    comparisons = {}
    if "network" in arrays:
        for name in arrays:
            if name == "network":
                continue
            window = arrays[name]["window"]
            comparison = {"alpha": stats.paired_exponent_difference(
                sizes, arrays["network"]["test_error"], arrays[name]["test_error"],
                window=window, floor=floor, num_bootstrap=num_bootstrap)}
            # Exponents of different losses are never compared.
            if network_loss == "mse":
                comparison["alpha_loss"] = stats.paired_exponent_difference(
                    sizes, arrays["network"]["test_loss"], arrays[name]["test_loss"],
                    window=window, num_bootstrap=num_bootstrap)
            comparisons[f"network_minus_{name}"] = comparison
    return {
        "study": "data_scaling",
        "dataset": dataset,
        "n": [int(v) for v in sizes],
        "methods": methods,
        # Paired bootstrap (seeds × test examples) of α_network − α_method.
        "exponent_differences": comparisons,
        "seeds": [int(s) for s in seeds],
        "n0": n0s,
        "num_test": num_test,
        "finished": bool(finished),
        "error_floor": floor,
        "kernel_notes": (
            "entk_init: the linearized network's predictor f0 + Θ*(Θ+λI)⁻¹(Y − f0) at θ0; "
            "entk_init_centred and (by default) the after-kernels and infinite_ntk: the kernel "
            "predictor Θ*(Θ+λI)⁻¹Y. Float64, one-hot Y, λ = r·mean(diag Θ_train), r chosen on "
            "the validation set. With C > 1 logits the eNTK is the logit-averaged kernel "
            "(trace_axes=(-1,)) used as Θ⊗I: an approximation of the full per-logit kernel. "
            "Exponents: mean ∝ n^−α fitted over fit_window (after-kernels: n ≥ n0) to the mean "
            "over seeds of per-seed test means (errors floored at half a test error); "
            "intervals: bootstrap over seeds and test examples together. Loss exponents are "
            "compared only when the network's loss is the MSE."
        ),
        "infinite_ntk_skipped": infinite_skipped,
        "settings": settings,
        "cells": cells,
    }


def _write_summaries(output_dir, results):
    """TensorBoard scalars: mean test error and loss of each method against n (as the step)."""
    import tensorflow as tf

    from experiments import cells

    with cells.summary_writer(os.path.join(output_dir, "tensorboard", "summary")) as writer, \
            writer.as_default():
        for name, entry in results["methods"].items():
            for n, errors, losses in zip(results["n"], entry["test_error"], entry["test_loss"]):
                errors = [e for e in errors if e is not None]
                losses = [v for v in losses if v is not None]
                if errors:
                    tf.summary.scalar(f"{name}/test_error", float(np.mean(errors)), step=n)
                    tf.summary.scalar(f"{name}/test_loss", float(np.mean(losses)), step=n)


def draw_figures(results, directory):
    """test_error_vs_n.png and test_loss_vs_n.png (`experiments.figures.study_b`)."""
    from experiments.figures import study_b

    study_b.data_scaling_figures(results, directory)


def main(argv):
    launcher.main(argv, "data_scaling", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
