"""Study B (1 of 2): test error against training-set size n, and its exponent.

Reproduces the data-scaling comparison of Vyas, Nakkiran and Bansal (2022),
"Limitations of the NTK for understanding generalization in deep learning":
for training-set sizes n on a geometric grid and several seeds, the test
error of

* `network`: the network trained to convergence from θ0 (recipe below; MSE
  on one-hot targets or softmax cross-entropy, `network_loss`);
* `entk_init`: kernel regression with the empirical NTK Θ(θ0) at init;
* `after_kernel_n0=<n0>`: kernel regression with the "after kernel", the
  eNTK of the same network after training from θ0 on n0 OTHER examples
  (with the network recipe);
* `infinite_ntk`: kernel regression with the infinite-width NTK of the
  NTK-parameterized version of the architecture
  (`experiments.models.ntk_parameterized`; Dense/Conv2D/ReLU/Flatten/average
  pooling only: max pooling, e.g. LeNet, is not supported and is skipped).

A gin switch (`methods`) chooses which run. The error is fitted as
error ∝ n^−α; α and a bootstrap interval over seeds go to results.json,
for the test error and for the test loss.

Data (`_partition`): the training split is cut once (permutation with
`split_seed`) into a validation set (`num_validation`, used only to choose
the ridge), a pool of max(n0) examples the after-kernels are trained on, and
the candidates the n regression/training examples are drawn from (per seed:
a permutation of the candidates, the first n; nested in n). The three parts
and the test split are disjoint, so on digits (1437 training images) n is at
most 1437 − num_validation − max(n0).

Kernel regression (`regression_path`): float64, one-hot targets Y,
f* = Θ*(Θ + λ I)⁻¹ Y with λ = r · mean(diag Θ) and r chosen on the
validation set (smallest validation error, ties by validation MSE) from
`ridge_factors`. f0 is NOT subtracted (`subtract_f0` records it): the kernel
predictor alone, not the linearized network f0 + Θ*(Θ+λ)⁻¹(Y − f0). The eNTK
of a network with C logits is the logit-averaged kernel (`trace_axes=(-1,)`),
used as Θ ⊗ I_C: an approximation of the full C×C-block kernel (exact for
the infinite NTK, whose logit blocks are diagonal).

Each eNTK is computed ONCE per (model, θ) on candidates + validation + test
and sliced for every n (`kernel_indices`).

Test loss: the mean over test examples and classes of (f − y)² with one-hot
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


def _fit_line(log_n, log_v):
    slope, intercept = np.polyfit(log_n, log_v, 1)
    return -float(slope), float(intercept)


def _row_means(values):
    """Mean of each row over its finite entries (NaN for a row with none)."""
    counts = np.sum(np.isfinite(values), axis=1)
    sums = np.sum(np.where(np.isfinite(values), values, 0.0), axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def fit_exponent(n, values, *, floor=0.0, num_bootstrap=2000, confidence=0.95, seed=0):
    """Fits value ∝ n^−α to per-seed values, with a bootstrap interval over seeds.

    The point estimate is the least-squares slope of log(mean over seeds) on
    log n. The interval: `num_bootstrap` times, resample the seeds with
    replacement independently at every n, refit; the central `confidence`
    percentile interval of the refitted α. Means at or below `floor` (e.g.
    zero test errors, which break a log fit) are replaced by `floor` when it
    is positive, and left out of the fit otherwise; fewer than two usable
    sizes give α = None.

    Args:
        n: the sizes, shape (K,).
        values: shape (K, S): values per size and seed (NaN: missing).
        floor: the smallest value a mean may take (0: drop non-positive means).
        num_bootstrap: bootstrap resamples.
        confidence: the interval's coverage.
        seed: seed of the resampling.

    Returns:
        dict(alpha, alpha_interval [lo, hi], intercept, sizes_used).
    """
    n = np.asarray(n, np.float64)
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[0] != n.shape[0]:
        raise ValueError(
            "Expected values of shape (len(n), seeds). "
            f"Received: values.shape={values.shape}, len(n)={n.shape[0]}"
        )

    def usable(means):
        if floor > 0:
            means = np.maximum(means, floor)
        keep = np.isfinite(means) & (means > 0)
        return keep, means

    keep, means = usable(_row_means(values))
    if keep.sum() < 2:
        return dict(alpha=None, alpha_interval=[None, None], intercept=None,
                    sizes_used=[int(v) for v in n[keep]])
    alpha, intercept = _fit_line(np.log(n[keep]), np.log(means[keep]))
    rng = np.random.RandomState(seed)
    alphas = []
    for _ in range(num_bootstrap):
        resampled = np.empty(len(n))
        for i, row in enumerate(values):
            row = row[np.isfinite(row)]
            resampled[i] = np.mean(rng.choice(row, size=len(row))) if len(row) else np.nan
        ok, boot = usable(resampled)
        ok &= keep
        if ok.sum() >= 2:
            alphas.append(_fit_line(np.log(n[ok]), np.log(boot[ok]))[0])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(alphas, [tail, 100 - tail])
    return dict(alpha=alpha, alpha_interval=[float(low), float(high)], intercept=intercept,
                sizes_used=[int(v) for v in n[keep]])


def paired_exponent_difference(n, values_a, values_b, *, floor=0.0, num_bootstrap=2000,
                               confidence=0.95, seed=0):
    """α_a − α_b of two methods measured on the same seeds, with a paired bootstrap.

    Seeds pair the methods (same θ0 and the same training subsets), so each
    resample draws one set of seed indices per size and uses it for both.
    Means are floored or dropped as in `fit_exponent`; a size is used only
    where both methods have a usable mean.

    Args:
        n: the sizes, shape (K,).
        values_a, values_b: shape (K, S), the same seeds in the same columns.
        floor, num_bootstrap, confidence, seed: as in `fit_exponent`.

    Returns:
        dict(difference, interval [lo, hi]); None entries when fewer than two
        sizes are usable.
    """
    n = np.asarray(n, np.float64)
    a, b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != n.shape[0]:
        raise ValueError(
            "Expected values_a and values_b of the same shape (len(n), seeds). "
            f"Received: values_a.shape={a.shape}, values_b.shape={b.shape}, len(n)={len(n)}"
        )

    def difference(columns):
        means = []
        for values in (a, b):
            mean = _row_means(np.take_along_axis(values, columns, axis=1))
            means.append(np.maximum(mean, floor) if floor > 0 else mean)
        keep = np.all([np.isfinite(m) & (m > 0) for m in means], axis=0)
        if keep.sum() < 2:
            return None
        return (_fit_line(np.log(n[keep]), np.log(means[0][keep]))[0]
                - _fit_line(np.log(n[keep]), np.log(means[1][keep]))[0])

    all_columns = np.tile(np.arange(a.shape[1]), (len(n), 1))
    point = difference(all_columns)
    if point is None:
        return dict(difference=None, interval=[None, None])
    rng = np.random.RandomState(seed)
    draws = [difference(rng.randint(0, a.shape[1], size=all_columns.shape))
             for _ in range(num_bootstrap)]
    draws = [d for d in draws if d is not None]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return dict(difference=float(point), interval=[float(low), float(high)])


def regression_path(k_train, k_eval_train, y_train, ridges):
    """Kernel ridge regression predictions for several ridges, in float64.

    f*(λ) = Θ*(Θ + λ I)⁻¹ Y for every λ in `ridges`, from one
    eigendecomposition Θ = V diag(s) Vᵀ (negative rounding-error eigenvalues
    clipped to 0): f*(λ) = (Θ* V) diag(1/(s + λ)) Vᵀ Y.

    Args:
        k_train: (n, n) kernel on the training inputs.
        k_eval_train: (m, n) kernel between evaluation and training inputs.
        y_train: (n, C) targets.
        ridges: positive ridges λ (absolute).

    Returns:
        (len(ridges), m, C) float64 predictions.
    """
    k_train = np.asarray(k_train, np.float64)
    k_train = 0.5 * (k_train + k_train.T)
    values, vectors = np.linalg.eigh(k_train)
    values = np.maximum(values, 0.0)
    projected = np.asarray(k_eval_train, np.float64) @ vectors
    coefficients = vectors.T @ np.asarray(y_train, np.float64)
    return np.stack([projected @ (coefficients / (values + r)[:, None]) for r in ridges])


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


def kernel_indices(layout, seed, n):
    """Rows of the union kernel (candidates, validation, test) for one (seed, n).

    Returns:
        (train rows: the first n of the seed's permutation of the candidates,
        validation rows, test rows).
    """
    order = np.random.RandomState(seed).permutation(layout["num_candidates"])
    start = layout["num_candidates"]
    validation = np.arange(start, start + layout["num_validation"])
    start += layout["num_validation"]
    test = np.arange(start, start + layout["num_test"])
    return order[:n], validation, test


def kernel_method_errors(kernel, layout, labels_union, num_classes, seed, sizes, ridge_factors):
    """Test error/loss of kernel regression at every n, one kernel sliced for all.

    Args:
        kernel: (N, N) kernel on candidates + validation + test (in that order).
        layout: dict with num_candidates, num_validation, num_test.
        labels_union: (N,) integer labels in the same order.
        num_classes: C.
        seed: the seed choosing the training subsets (`kernel_indices`).
        sizes: the n grid.
        ridge_factors: λ / mean(diag Θ_train) candidates.

    Returns:
        dict of lists over n: test_error, test_loss, ridge_factor,
        validation_error.
    """
    one_hot = np.eye(num_classes)[labels_union]
    out = {"test_error": [], "test_loss": [], "ridge_factor": [], "validation_error": []}
    for n in sizes:
        train, validation, test = kernel_indices(layout, seed, n)
        k_train = kernel[np.ix_(train, train)]
        scale = float(np.mean(np.diag(k_train)))
        evaluation = np.concatenate([validation, test])
        predictions = regression_path(k_train, kernel[np.ix_(evaluation, train)],
                                      one_hot[train], [r * scale for r in ridge_factors])
        nv = len(validation)
        scores = [(error_rate(p[:nv], labels_union[validation]), mse(p[:nv], one_hot[validation]))
                  for p in predictions]
        best = min(range(len(ridge_factors)), key=lambda i: scores[i])
        test_predictions = predictions[best][nv:]
        out["test_error"].append(error_rate(test_predictions, labels_union[test]))
        out["test_loss"].append(mse(test_predictions, one_hot[test]))
        out["ridge_factor"].append(float(ridge_factors[best]))
        out["validation_error"].append(scores[best][0])
    return out


# ---------------------------------------------------------------- the study


def _partition(num_train, num_validation, n0_max, split_seed):
    """Fixed disjoint index sets of the training split: validation, n0 pool, candidates."""
    order = np.random.RandomState(split_seed).permutation(num_train)
    validation = order[:num_validation]
    pool = order[num_validation:num_validation + n0_max]
    candidates = order[num_validation + n0_max:]
    return validation, pool, candidates


def _validate(dataset, model, methods, model_builders, n0s, network_loss):
    from experiments import data as data_lib

    if dataset not in data_lib.KNOWN_DATASETS:
        raise ValueError(
            f"Unknown dataset. Known datasets: {', '.join(data_lib.KNOWN_DATASETS)}. "
            f"Received: dataset={dataset!r}"
        )
    if model not in model_builders:
        raise ValueError(
            f"Unknown model. Known models: {', '.join(sorted(model_builders))}. "
            f"Received: model={model!r}"
        )
    known = {"network", "entk_init", "infinite_ntk", "after_kernel"}
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise ValueError(
            f"Unknown method(s) {bad}. Known methods: {', '.join(sorted(known))} "
            "(after_kernel runs one method per n0 in `n0s`). "
            f"Received: methods={list(methods)!r}"
        )
    if "after_kernel" in methods and (not n0s or any(int(v) < 1 for v in n0s)):
        raise ValueError(f"Expected positive n0s for after_kernel. Received: n0s={list(n0s)!r}")
    if network_loss not in NETWORK_LOSSES:
        raise ValueError(
            f"Expected network_loss in {NETWORK_LOSSES}. Received: network_loss={network_loss!r}"
        )


def _predict(model, x, batch_size=1024):
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)]).astype(np.float64)


def _stop_when_converged(model, threshold):
    """A callback that stops fit once an epoch's mean training loss is below `threshold`."""
    import keras

    def check(epoch, logs):
        if logs and logs.get("loss", np.inf) < threshold:
            model.stop_training = True

    return keras.callbacks.LambdaCallback(on_epoch_end=check)


def train_network(model, x, labels, num_classes, *, loss, train_steps, batch_size,
                  learning_rate, momentum, convergence_loss, seed, jit_compile, strategy,
                  tensorboard_dir=None, chunk_steps=50, crash_after_epochs=None):
    """Trains `model` to convergence: SGD (constant rate, momentum), MSE or cross-entropy.

    Runs at most `train_steps` steps in chunks of `chunk_steps` (a Keras
    "epoch" here) and stops after the first chunk whose mean training loss is
    below `convergence_loss`.

    Returns:
        dict(steps, train_loss).
    """
    import keras

    from experiments import data as data_lib
    from experiments import train as train_lib

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
    callbacks = [_stop_when_converged(model, convergence_loss)]
    if crash_after_epochs is not None:  # Tests of resuming: killed after this many chunks.
        callbacks.append(train_lib.CrashAfterEpochs(crash_after_epochs))
    if tensorboard_dir:
        callbacks.append(keras.callbacks.TensorBoard(tensorboard_dir, write_graph=False,
                                                     profile_batch=0))
    chunk = min(chunk_steps, train_steps)
    history = model.fit(dataset, epochs=max(1, train_steps // chunk), steps_per_epoch=chunk,
                        callbacks=callbacks, verbose=0)
    losses = history.history["loss"]
    return {"steps": len(losses) * chunk, "train_loss": float(losses[-1])}


def _method_names(methods, n0s):
    names = []
    for m in methods:
        names += [f"{_AFTER}{int(v)}" for v in n0s] if m == "after_kernel" else [m]
    return names


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
    split_seed=0,
    num_validation=150,
    num_train=None,
    num_test=None,
    ridge_factors=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    network_loss="mse",
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
    num_bootstrap=2000,
    subtract_f0=False,
    max_new_cells=None,
    write_figures=True,
    overwrite=False,
    simulate_crash_after_epochs=None,
):
    """Runs the data-scaling study and writes results.json and figures into `output_dir`.

    Cells (network: one per (seed, n); kernel methods: one per seed, all n
    from one sliced kernel) finished in an earlier run are skipped; θ0 per
    seed and the n0-trained weights are saved under `output_dir/init/`.

    Args:
        output_dir: the run's directory (local or gs://).
        strategy: the `tf.distribute.Strategy` models are built in.
        model_builders: name → builder(input_shape, num_outputs) (gin-configured).
        data_dir: tfds data directory.
        dataset: "digits", "mnist" or "cifar10".
        model: the architecture (a name in `model_builders`), C logits.
        methods: among "network", "entk_init", "after_kernel", "infinite_ntk".
        n0s: pre-training sizes of the after-kernels.
        sizes: the n grid; None: `num_sizes` geometric sizes from `smallest_n`
            to all candidates.
        smallest_n, num_sizes: the default grid.
        seeds: seeds (θ0 and the training subsets); ≥ 5 for intervals.
        split_seed: seed of the validation / n0 pool / candidates partition.
        num_validation: validation examples (ridge choice only).
        num_train, num_test: use the first examples of each split (None: all).
        ridge_factors: λ / mean(diag Θ_train) candidates.
        network_loss: "mse" (one-hot targets) or "cross_entropy".
        train_steps, batch_size, learning_rate, momentum, convergence_loss:
            the network recipe (SGD, constant rate; stop once the training
            loss is below `convergence_loss`).
        jit_compile: passed to `model.compile`.
        infinite_sigma_w2, infinite_sigma_b2: σw², σb² of the NTK-parameterized
            twin (1, 0 match LeCun-normal weights and zero biases at init).
        ntk_batch_size, ntk_implementation: `keras_ntk.empirical_ntk` options.
        num_bootstrap: bootstrap resamples of the exponent intervals.
        subtract_f0: must be False (recorded in results.json); the kernel
            predictor without the network's initial outputs.
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
    _validate(dataset, model, methods, model_builders, n0s, network_loss)
    if subtract_f0:
        raise ValueError("subtract_f0=True is not implemented. Received: subtract_f0=True")
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
            f"set and the n0 pool). Received: sizes={sizes}"
        )
    layout = {"num_candidates": len(candidates), "num_validation": len(validation),
              "num_test": len(data.test.y)}
    x_union = np.concatenate([data.train.x[candidates], data.train.x[validation], data.test.x])
    y_union = np.concatenate([data.train.y[candidates], data.train.y[validation], data.test.y])
    names = _method_names(methods, n0s)

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
                          convergence_loss=convergence_loss)

    def cell_settings(name, seed, n):
        if name == "network":
            return dict(common, method=name, seed=seed, n=n, **network_recipe)
        kernel = dict(common, method=name, seed=seed, sizes=sizes,
                      ridge_factors=list(ridge_factors))
        if name == "infinite_ntk":
            return dict(kernel, infinite_sigma_w2=infinite_sigma_w2,
                        infinite_sigma_b2=infinite_sigma_b2)
        if name == "entk_init":
            return dict(kernel, ntk_implementation=ntk_implementation)
        return dict(kernel, ntk_implementation=ntk_implementation, **network_recipe)

    def init_weights(seed):
        key = f"init-seed{seed}"
        store.get(key, dict(common, seed=seed))  # Refuses a θ0 of other settings.
        weights_path = os.path.join(store.cell_dir(key), "theta0.weights.h5")
        if not cell_store.load_weights_or_discard(build(), weights_path):
            keras.utils.set_random_seed(seed)
            cell_store.save_weights_atomic(build(), weights_path)
        return weights_path

    recipe = dict(network_recipe, jit_compile=jit_compile, strategy=strategy)

    def entk(network):
        kernel = keras_ntk.empirical_ntk(network, x_union, batch_size=ntk_batch_size,
                                         implementation=ntk_implementation)
        return np.asarray(kernel, np.float64)

    infinite_kernel = None
    work = [(name, seed, n) for name in names for seed in seeds
            for n in (sizes if name == "network" else [None])]

    def cell_key(name, seed, n):
        return f"{name}-seed{seed}" + (f"-n{n}" if n is not None else "")

    # Every stored cell is checked before any work: other settings are refused here.
    cells = {}
    for name, seed, n in work:
        record = store.get(cell_key(name, seed, n), cell_settings(name, seed, n))
        if record is not None:
            cells[cell_key(name, seed, n)] = record
    progress = cell_store.Progress(len(work), "cell")
    new_cells = 0
    for name, seed, n in work:
        cell_id = cell_key(name, seed, n)
        if cell_id in cells:
            progress.skip(cell_id)
            continue
        if max_new_cells is not None and new_cells >= max_new_cells:
            logging.info("Stopping after %d new cell(s) (max_new_cells).", new_cells)
            break
        progress.begin(cell_id)
        if name == "network":
            train_rows = kernel_indices(layout, seed, n)[0]
            network = build(init_weights(seed))
            fit = train_network(network, x_union[train_rows], y_union[train_rows], num_classes,
                                seed=seed, tensorboard_dir=path("tensorboard", cell_id),
                                crash_after_epochs=simulate_crash_after_epochs, **recipe)
            logits = _predict(network, data.test.x)
            one_hot = np.eye(num_classes)[data.test.y]
            cell = dict(fit, test_error=error_rate(logits, data.test.y),
                        test_loss=(mse(logits, one_hot) if network_loss == "mse"
                                   else cross_entropy(logits, data.test.y)))
        elif name == "infinite_ntk":
            if infinite_kernel is None and infinite_skipped is None:
                try:
                    twin = models_lib.ntk_parameterized(build(), sigma_w2=infinite_sigma_w2,
                                                        sigma_b2=infinite_sigma_b2)
                    infinite_kernel = np.asarray(
                        keras_ntk.infinite_kernels(twin, x_union).ntk, np.float64)
                except ValueError as error:
                    infinite_skipped = str(error)
                    logging.warning("infinite_ntk skipped: %s", error)
            if infinite_kernel is None:
                progress.skip(cell_id, "no infinite NTK for this architecture")
                continue
            cell = kernel_method_errors(infinite_kernel, layout, y_union, num_classes, seed,
                                        sizes, ridge_factors)
        else:
            if name == "entk_init":
                network = build(init_weights(seed))
            else:
                n0 = int(name[len(_AFTER):])
                after_path = os.path.join(store.cell_dir(cell_id), "after.weights.h5")
                network = build()
                if cell_store.load_weights_or_discard(network, after_path):
                    fit = None
                else:
                    network = build(init_weights(seed))
                    rows = pool[np.random.RandomState(1000 + seed).permutation(len(pool))[:n0]]
                    fit = train_network(network, data.train.x[rows], data.train.y[rows],
                                        num_classes, seed=seed,
                                        tensorboard_dir=path("tensorboard", cell_id),
                                        crash_after_epochs=simulate_crash_after_epochs,
                                        **recipe)
                    cell_store.save_weights_atomic(network, after_path)
                    logging.info("%s: trained on n0=%d pool examples: %s", cell_id, n0, fit)
            started = time.time()
            kernel = entk(network)
            logging.info("%s: eNTK on %d inputs in %.1f s", cell_id, len(x_union),
                         time.time() - started)
            cell = kernel_method_errors(kernel, layout, y_union, num_classes, seed, sizes,
                                        ridge_factors)
        store.put(cell_id, cell_settings(name, seed, n), cell, discard_cell_dir=True)
        cells[cell_id] = cell
        results = _assemble(dataset, sizes, list(seeds), names, cells, layout, n0s,
                            data.test.y, network_loss, num_bootstrap, infinite_skipped,
                            dict(recipe, strategy=None, model=model,
                                 ridge_factors=list(ridge_factors), split_seed=split_seed,
                                 infinite_sigma_w2=infinite_sigma_w2,
                                 infinite_sigma_b2=infinite_sigma_b2), finished=False)
        cell_store.write_json_atomic(results_path, results)
        new_cells += 1
        progress.finish(cell_id)
    results = _assemble(dataset, sizes, list(seeds), names, cells, layout, n0s, data.test.y,
                        network_loss, num_bootstrap, infinite_skipped,
                        dict(recipe, strategy=None, model=model, ridge_factors=list(ridge_factors),
                             split_seed=split_seed, infinite_sigma_w2=infinite_sigma_w2,
                             infinite_sigma_b2=infinite_sigma_b2),
                        finished=progress.done == progress.total)
    cell_store.write_json_atomic(results_path, results)
    _write_summaries(output_dir, results)
    if write_figures:
        draw_figures(results, os.path.join(output_dir, "figures"))
    return results


def _assemble(dataset, sizes, seeds, names, cells, layout, n0s, test_labels, network_loss,
              num_bootstrap, infinite_skipped, settings, finished):
    """The results.json dictionary from the finished cells (missing values: null)."""
    num_test = layout["num_test"]
    # Half a test error: the floor of a mean error before taking logs.
    floor = 0.5 / num_test
    methods, arrays = {}, {}
    for name in names:
        table = {"test_error": [], "test_loss": [], "ridge_factor": []}
        for index, n in enumerate(sizes):
            for key in table:
                table[key].append([])
            for seed in seeds:
                if name == "network":
                    cell = cells.get(f"network-seed{seed}-n{n}")
                    values = {} if cell is None else {"test_error": cell["test_error"],
                                                      "test_loss": cell["test_loss"]}
                else:
                    cell = cells.get(f"{name}-seed{seed}")
                    values = {} if cell is None else {k: cell[k][index] for k in table}
                for key in table:
                    table[key][-1].append(values.get(key))
        if all(v is None for row in table["test_error"] for v in row):
            continue

        def as_array(rows):
            return np.array([[np.nan if v is None else v for v in row] for row in rows])

        error_fit = fit_exponent(sizes, as_array(table["test_error"]), floor=floor,
                                 num_bootstrap=num_bootstrap)
        loss_fit = fit_exponent(sizes, as_array(table["test_loss"]), num_bootstrap=num_bootstrap)
        entry = {
            "test_error": table["test_error"],
            "alpha": error_fit["alpha"],
            "alpha_interval": error_fit["alpha_interval"],
            "test_loss": table["test_loss"],
            "alpha_loss": loss_fit["alpha"],
            "alpha_loss_interval": loss_fit["alpha_interval"],
            "loss_name": ("cross_entropy" if name == "network" and network_loss != "mse"
                          else "mse"),
            "fit_sizes_error": error_fit["sizes_used"],
            "intercept": error_fit["intercept"],
            "intercept_loss": loss_fit["intercept"],
        }
        if name != "network":
            entry["ridge_factor"] = table["ridge_factor"]
        if name == "network":
            entry["train_steps"] = [[cells.get(f"network-seed{s}-n{n}", {}).get("steps")
                                     for s in seeds] for n in sizes]
            entry["train_loss"] = [[cells.get(f"network-seed{s}-n{n}", {}).get("train_loss")
                                    for s in seeds] for n in sizes]
        methods[name] = entry
        arrays[name] = {key: as_array(table[key]) for key in ("test_error", "test_loss")}
    comparisons = {}
    if "network" in arrays:
        for name in arrays:
            if name == "network":
                continue
            comparisons[f"network_minus_{name}"] = {
                "alpha": paired_exponent_difference(
                    sizes, arrays["network"]["test_error"], arrays[name]["test_error"],
                    floor=floor, num_bootstrap=num_bootstrap),
                "alpha_loss": paired_exponent_difference(
                    sizes, arrays["network"]["test_loss"], arrays[name]["test_loss"],
                    num_bootstrap=num_bootstrap),
            }
    return {
        "study": "data_scaling",
        "dataset": dataset,
        "n": [int(v) for v in sizes],
        "methods": methods,
        # Paired bootstrap over seeds of α_network − α_method (error and loss).
        "exponent_differences": comparisons,
        "seeds": [int(s) for s in seeds],
        "n0": n0s,
        "num_test": num_test,
        "num_validation": layout["num_validation"],
        "num_candidates": layout["num_candidates"],
        "finished": bool(finished),
        "error_floor": floor,
        "subtract_f0": False,
        "kernel_notes": (
            "Kernel regression f* = Θ*(Θ+λI)⁻¹Y in float64 on one-hot Y, f0 not subtracted; "
            "λ = r·mean(diag Θ_train), r chosen on the validation set. The eNTK is the "
            "logit-averaged kernel (trace_axes=(-1,)) used as Θ⊗I: an approximation of the "
            "full per-logit kernel. Exponents: error ∝ n^−α fitted to the mean over seeds "
            "(means below half a test error floored there); intervals: bootstrap over seeds."
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
    """test_error_vs_n.png and test_loss_vs_n.png: log-log, one line per method.

    Markers: mean over seeds (error floored at half a test error); bands:
    min to max over seeds; dashed: the fitted power law.
    """
    import tensorflow as tf

    from experiments import report

    plt = report.pyplot()
    tf.io.gfile.makedirs(directory)
    n = np.asarray(results["n"], np.float64)
    for key, alpha_key, intercept_key, label in (
        ("test_error", "alpha", "intercept", "test error"),
        ("test_loss", "alpha_loss", "intercept_loss", "test loss (MSE; CE for a CE network)"),
    ):
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
        for index, (name, entry) in enumerate(results["methods"].items()):
            values = np.array([[np.nan if v is None else v for v in row]
                               for row in entry[key]], np.float64)
            if key == "test_error":
                values = np.maximum(values, results["error_floor"])
            ok = np.isfinite(values).any(axis=1)
            if not ok.any():
                continue
            mean = np.nanmean(values[ok], axis=1)
            color = f"C{index % 10}"
            alpha = entry[alpha_key]
            ax.plot(n[ok], mean, "o-", color=color,
                    label=f"{name} (α={alpha:.2f})" if alpha is not None else name)
            ax.fill_between(n[ok], np.nanmin(values[ok], axis=1), np.nanmax(values[ok], axis=1),
                            color=color, alpha=0.08)
            if alpha is not None:
                ax.plot(n, np.exp(entry[intercept_key]) * n ** (-alpha), "--", color=color, lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training-set size n")
        ax.set_ylabel(label)
        model = results.get("settings", {}).get("model", "")
        ax.set_title(f"{results['dataset']}, {model}: {label} vs n", fontsize=10)
        ax.legend(fontsize=7)
        report.save_figure(fig, os.path.join(directory, f"{key}_vs_n.png"))


def main(argv):
    launcher.main(argv, "data_scaling", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
