"""Study B (1 of 2): test error against training-set size n, and its exponent.

Vyas, Bansal and Nakkiran (2022). For sizes n on a geometric grid and several
seeds: the test error and loss of the network (trained to a stated criterion,
`experiments.network_fit`), of kernel regression with the eNTK at θ0
(`entk_init`, with f0; `entk_init_centred`, without), with after-kernels
(`after_kernel_n0=<n0>`) and with the infinite NTK of the NTK-parameterized
twin (`experiments.kernel_methods`); power-law exponents and their paired
differences (`experiments.stats`). Methods, data split and fits:
docs/study_b.md; flags, outputs and resuming: docs/experiments.md.

Run: `python -m experiments.data_scaling --gin_file=data_scaling/mnist1d_mlp.gin
--output_dir=runs/b_scaling`.
"""

import os
import time

import numpy as np
from absl import logging

from experiments import bindings, kernel_methods, launcher, network_fit, stats

NETWORK_LOSSES = ("mse", "cross_entropy")
_AFTER = "after_kernel_n0="


# ---------------------------------------------------------------- the grid


def geometric_sizes(smallest, largest, num):
    """`num` integers from `smallest` to `largest` on a geometric grid (distinct, sorted)."""
    if not 1 <= smallest <= largest or num < 1:
        raise ValueError(
            "Expected 1 <= smallest <= largest and num >= 1. "
            f"Received: smallest={smallest}, largest={largest}, num={num}"
        )
    return sorted({int(round(v)) for v in np.geomspace(smallest, largest, num)})


def seed_sizes(sizes, seeds, large_n=None, seeds_large_n=None):
    """The sizes each seed runs: sizes ≥ `large_n` only on the first `seeds_large_n` seeds."""
    out = {}
    for index, seed in enumerate(seeds):
        limited = large_n is not None and seeds_large_n is not None and index >= seeds_large_n
        out[seed] = [n for n in sizes if not (limited and n >= large_n)]
    return out


def _partition(num_train, num_validation, n0_max, split_seed):
    """Fixed disjoint index sets of the training split: validation, n0 pool, candidates."""
    order = np.random.RandomState(split_seed).permutation(num_train)
    validation = order[:num_validation]
    pool = order[num_validation:num_validation + n0_max]
    candidates = order[num_validation + n0_max:]
    return validation, pool, candidates


def _method_names(methods, n0s):
    names = []
    for m in methods:
        names += [f"{_AFTER}{int(v)}" for v in n0s] if m == "after_kernel" else [m]
    return names


def _work(names, seeds, per_seed_sizes):
    """The cells in running order: (source, seed, n or method names).

    Networks one per (seed, n); kernel methods grouped by their kernel (the
    init eNTK serves entk_init and entk_init_centred). Cheap cells first:
    networks in increasing n; a seed's kernel groups right after the
    networks of its largest n.
    """
    work = [("network", seed, n) for seed in seeds if "network" in names
            for n in per_seed_sizes[seed]]
    for seed in seeds:
        init_names = [m for m in names if m in ("entk_init", "entk_init_centred")]
        work += [("init", seed, init_names)] if init_names else []
        work += [(name, seed, [name]) for name in names
                 if name.startswith(_AFTER) or name == "infinite_ntk"]
    return sorted(work, key=lambda item: (
        (item[2], 0) if item[0] == "network" else (max(per_seed_sizes[item[1]]), 1)))


def _keys(source, seed, n_or_names):
    """(cell key, method name, n) of the cells one work item computes."""
    if source == "network":
        return [(f"network-seed{seed}-n{n_or_names}", "network", n_or_names)]
    return [(f"{name}-seed{seed}", name, None) for name in n_or_names]


_BINDINGS = bindings.Bindings("data_scaling", qualified=True)
METHODS = ("network", "entk_init", "entk_init_centred", "infinite_ntk", "after_kernel")


def _validate(dataset, model, methods, model_builders, n0s, network_loss, stop_criterion,
              sizes, seeds, large_n, seeds_large_n, fit_window):
    """Refuses impossible settings before any work, naming the gin binding."""
    _BINDINGS.dataset(dataset, configs=True)
    _BINDINGS.models("model", model, model_builders)
    # after_kernel runs one method per n0 in `n0s`.
    _BINDINGS.known("methods", methods, METHODS, "method")
    _BINDINGS.check(methods=(methods, bindings.DISTINCT))
    if "after_kernel" in methods:
        _BINDINGS.check(n0s=(n0s, bindings.NON_EMPTY_POSITIVE_INTS))
    _BINDINGS.known("network_loss", network_loss, NETWORK_LOSSES, "network_loss")
    _BINDINGS.known("stop_criterion", stop_criterion, network_fit.STOP_CRITERIA, "stop_criterion")
    _BINDINGS.check(sizes=(sizes, bindings.OPTIONAL_SIZES),
                    seeds=(list(seeds), bindings.DISTINCT_INTS),
                    fit_window=(fit_window, bindings.OPTIONAL_RANGE))
    if (large_n is None) != (seeds_large_n is None) or (
            seeds_large_n is not None and not 1 <= seeds_large_n <= len(seeds)):
        raise ValueError(
            "Expected large_n and seeds_large_n both set (1 <= seeds_large_n <= len(seeds)) "
            f"or both None. Received: data_scaling.run.seeds_large_n={seeds_large_n}; "
            f"data_scaling.run.large_n={large_n!r}")


# ---------------------------------------------------------------- the cells


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
    from one sliced kernel) live in the cell store (`experiments.cells`)
    with their operative settings; finished ones are skipped, ones of other
    settings refused (or recomputed with `overwrite`).

    Args:
        output_dir: the run's directory (local).
        strategy: the `tf.distribute.Strategy` models are built in.
        model_builders: name → builder(input_shape, num_outputs) (gin-configured).
        data_dir: tfds data directory.
        dataset: "digits", "mnist1d" (or a config such as "mnist1d/8000"),
            "mnist" or "cifar10".
        model: the architecture (a name in `model_builders`), C logits.
        methods: among "network", "entk_init", "entk_init_centred",
            "after_kernel", "infinite_ntk" (docs/study_b.md).
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
        stop_criterion, train_steps, batch_size, learning_rate, momentum,
            convergence_loss, jit_compile: the network recipe
            (`network_fit.train_network`; `train_steps` is the cap).
        infinite_sigma_w2, infinite_sigma_b2: σw², σb² of the NTK-parameterized
            twin (1, 0 match LeCun-normal weights and zero biases at init).
        ntk_batch_size, ntk_implementation: `keras_ntk.empirical_ntk` options.
        after_kernel_f0: after-kernels also add the pre-trained network's
            outputs (f_n0 + Θ(Θ+λ)⁻¹(Y − f_n0)); default kernel-only.
        fit_window: (low, high) sizes of the power-law fits (None ends: open).
        local_points: the local exponent is fitted over this many largest sizes.
        num_bootstrap: bootstrap resamples (seeds × test examples).
        max_new_cells: stop after this many newly finished cells (None: all).
        write_figures: draw the figures at the end.
        overwrite: discard stored cells computed with other settings.
        simulate_crash_after_epochs: kill the process after this many chunks
            of the first network fit (tests of resuming).

    Returns:
        The results dictionary (also in results.json).
    """
    import keras_ntk
    from experiments import cells as cell_store
    from experiments import data as data_lib
    from experiments import grid as grid_lib
    from experiments import models as models_lib
    from experiments import train
    from experiments.figures import study_b

    methods = list(methods)
    n0s = [int(v) for v in n0s] if "after_kernel" in methods else []
    _validate(dataset, model, methods, model_builders, n0s, network_loss, stop_criterion,
              sizes, seeds, large_n, seeds_large_n, fit_window)
    data = data_lib.load_dataset(dataset, num_train=num_train, num_test=num_test,
                                 data_dir=data_dir)
    num_classes = data.num_classes
    validation, pool, candidates = _partition(len(data.train.y), num_validation,
                                              max(n0s, default=0), split_seed)
    if len(candidates) < 2:
        raise ValueError(
            "No candidates left for the regression samples after the validation set and the "
            f"n0 pool. Received: num_train={len(data.train.y)}, num_validation={num_validation}, "
            f"n0s={n0s}")
    sizes = ([int(v) for v in sizes] if sizes is not None
             else geometric_sizes(min(smallest_n, len(candidates)), len(candidates), num_sizes))
    if max(sizes) > len(candidates):
        raise ValueError(
            f"Expected sizes at most {len(candidates)} (candidates disjoint from the validation "
            f"set and the n0 pool: {len(data.train.y)} training examples − num_validation="
            f"{num_validation} − max(n0s)={max(n0s, default=0)}). Received: "
            f"data_scaling.run.sizes={sizes}")
    per_seed_sizes = seed_sizes(sizes, list(seeds), large_n, seeds_large_n)
    num_test_used = len(data.test.y)
    names = _method_names(methods, n0s)
    store = cell_store.CellStore(output_dir, overwrite=overwrite)

    def union(seed):
        """(x, y, layout) of a seed: its first n_max candidates, validation, test."""
        n_max = max(per_seed_sizes[seed])
        chosen = candidates[np.random.RandomState(seed).permutation(len(candidates))[:n_max]]
        return kernel_methods.kernel_union(data.train, data.test, chosen, validation)

    def build(weights_path=None):
        return train.build_model(strategy, model_builders[model], data.input_shape, num_classes,
                                 weights_path=weights_path)

    def infinite_ntk(x):
        """The infinite NTK of the NTK-parameterized twin on `x` (ValueError: none)."""
        twin = models_lib.ntk_parameterized(build(), sigma_w2=infinite_sigma_w2,
                                            sigma_b2=infinite_sigma_b2)
        return keras_ntk.infinite_kernels(twin, x).ntk

    # The operative settings of every cell (what only changes speed or memory,
    # jit_compile and ntk_batch_size, is left out).
    common = {"dataset": dataset, "num_train": len(data.train.y), "num_test": len(data.test.y),
              "model": model, "architecture": cell_store.architecture(build()),
              "split_seed": split_seed, "num_validation": num_validation,
              "n0_pool": max(n0s, default=0)}
    network_recipe = dict(loss=network_loss, train_steps=train_steps, batch_size=batch_size,
                          learning_rate=learning_rate, momentum=momentum,
                          convergence_loss=convergence_loss, stop_criterion=stop_criterion)
    recipe = dict(network_recipe, jit_compile=jit_compile, strategy=strategy,
                  crash_after_epochs=simulate_crash_after_epochs)

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
        """θ0 of `seed`, saved once in the store's `init-seed<seed>` cell (checked by the grid)."""
        return cell_store.initial_weights(build, os.path.join(
            store.cell_dir(f"init-seed{seed}"), "theta0.weights.h5"), seed)

    def examples_path(key):
        return os.path.join(store.cell_dir(key), "examples.npz")

    def network_cell(seed, n, key):
        x_union, y_union, _ = union(seed)
        network = build(init_weights(seed))
        fit = network_fit.train_network(
            network, x_union[:n], y_union[:n], num_classes, seed=seed,
            tensorboard_dir=os.path.join(output_dir, "tensorboard", key), **recipe)
        logits = network_fit.predict(network, data.test.x)
        correct = np.argmax(logits, -1) == data.test.y
        if network_loss == "mse":
            example_loss = kernel_methods.per_example_losses(logits, np.eye(num_classes)[
                data.test.y])
        else:
            example_loss = kernel_methods.per_example_cross_entropy(logits, data.test.y)
        cell_store.save_npz_atomic(examples_path(key), correct=correct,
                                   example_loss=example_loss)
        return {key: dict(fit, test_error=float(1 - correct.mean()),
                          test_loss=float(example_loss.mean()))}

    def pretrained(seed, key, n0):
        """The network after training from θ0 on n0 pool examples (stored), and its fit."""
        after_path = os.path.join(store.cell_dir(key), "after.weights.h5")
        fit_path = os.path.join(store.cell_dir(key), "pretraining.json")
        network = build()
        if os.path.exists(fit_path) and cell_store.load_weights_or_discard(network, after_path):
            return network, cell_store.load_json(fit_path)
        network = build(init_weights(seed))
        rows = pool[np.random.RandomState(1000 + seed).permutation(len(pool))[:n0]]
        fit = network_fit.train_network(
            network, data.train.x[rows], data.train.y[rows], num_classes, seed=seed,
            tensorboard_dir=os.path.join(output_dir, "tensorboard", key), **recipe)
        cell_store.save_weights_atomic(network, after_path)
        cell_store.write_json_atomic(fit_path, fit)
        logging.info("%s: trained on n0=%d pool examples: %s", key, n0, fit)
        return network, fit

    def kernel_cells(source, seed, group):
        """The cells of one kernel (CellSkipped: no infinite NTK for this architecture)."""
        x_union, y_union, layout = union(seed)
        key = f"{group[0]}-seed{seed}"
        offsets, min_n, pretraining = None, None, None
        started = time.time()
        if source == "infinite_ntk":
            try:
                kernel = infinite_ntk(x_union)
            except ValueError as error:
                logging.warning("infinite_ntk skipped: %s", error)
                skip_reasons[:] = [str(error)]
                raise grid_lib.CellSkipped("no infinite NTK for this architecture") from None
        else:
            if source == "init":
                network = build(init_weights(seed))
            else:
                min_n = int(source[len(_AFTER):])
                network, pretraining = pretrained(seed, key, min_n)
            kernel = keras_ntk.empirical_ntk(network, x_union, batch_size=ntk_batch_size,
                                             implementation=ntk_implementation)
            if source == "init" or after_kernel_f0:
                offsets = network_fit.predict(network, x_union)
        kernel_path = os.path.join(store.cell_dir(key), "kernel.npy")
        np.save(kernel_path, np.asarray(kernel, np.float32))
        del kernel
        kernel = np.load(kernel_path, mmap_mode="r")
        logging.info("%s: kernel on %d inputs in %.1f s", key, len(x_union),
                     time.time() - started)
        new, run_sizes = {}, per_seed_sizes[seed]
        for name in group:
            use_f0 = name == "entk_init" or (name.startswith(_AFTER) and after_kernel_f0)
            scores = kernel_methods.kernel_method_errors(
                kernel, layout, y_union, num_classes, run_sizes, ridge_factors,
                offsets=offsets if use_f0 else None, min_n=min_n)
            # Rows of this seed's sizes, named by `n` (other sizes: not run for this seed).
            cell_store.save_npz_atomic(
                examples_path(f"{name}-seed{seed}"), n=np.asarray(run_sizes),
                correct=scores.pop("correct"), example_loss=scores.pop("example_loss"))
            # Lists over this seed's sizes `n` (not the grid: a seed whose sizes did not
            # change keeps its cell when the grid grows).
            cell = dict(scores, n=list(run_sizes), with_f0=bool(use_f0))
            if pretraining is not None:
                cell["pretraining"] = pretraining
            new[f"{name}-seed{seed}"] = cell
        del kernel
        os.remove(kernel_path)
        return new

    settings = dict(network_recipe, model=model, ridge_factors=list(ridge_factors),
                    split_seed=split_seed, infinite_sigma_w2=infinite_sigma_w2,
                    infinite_sigma_b2=infinite_sigma_b2, after_kernel_f0=bool(after_kernel_f0),
                    large_n=large_n, seeds_large_n=seeds_large_n,
                    fit_window=None if fit_window is None else list(fit_window),
                    local_points=local_points)
    work = _work(names, list(seeds), per_seed_sizes)
    keys = [[key for key, _, _ in _keys(*item)] for item in work]
    # Every stored cell and θ0 is checked before any work: other settings are refused here.
    # A record whose per-example file is missing is computed again.
    grid = grid_lib.Grid(
        store, [(key, cell_settings(name, item[1], n)) for item in work
                for key, name, n in _keys(*item)], "cell",
        groups=[(",".join(k), item, k) for item, k in zip(work, keys)],
        shared={f"init-seed{s}": dict(common, seed=s) for s in seeds},
        complete=lambda key, record: os.path.exists(examples_path(key)))
    skip_reasons = []  # Why this architecture has no infinite NTK ([None]: it has one).

    def infinite_skip_reason(key):
        """For a missing infinite_ntk cell of another shard: probed on 2 inputs."""
        if not key.startswith("infinite_ntk"):
            return None
        if not skip_reasons:
            try:
                infinite_ntk(data.train.x[:2])
                skip_reasons.append(None)
            except ValueError as error:
                skip_reasons.append(str(error))
        return skip_reasons[0]

    def compute(item):
        source, seed, n_or_names = item
        if source == "network":
            return network_cell(seed, n_or_names, f"network-seed{seed}-n{n_or_names}")
        return kernel_cells(source, seed, n_or_names)

    def assemble(records, finished):
        cells = {key: record for key, record in records.items() if record is not None}
        return _assemble(dataset, sizes, list(seeds), names, cells, num_test_used, n0s,
                         network_loss, num_bootstrap, skip_reasons[0] if skip_reasons else None,
                         settings, store, fit_window, local_points, finished)

    grid.run(compute, max_new=max_new_cells, after_each=None if store.sharded else (
        lambda *_: cell_store.write_json_atomic(os.path.join(output_dir, "results.json"),
                                                assemble(grid.records, finished=False))))
    records = grid.gathered(excuse=infinite_skip_reason)
    if records is None:
        return None  # Other shards' cells are missing (logged): no results.json yet.
    results = assemble(records, finished=store.sharded or grid.finished)
    cell_store.write_json_atomic(os.path.join(output_dir, "results.json"), results)
    study_b.data_scaling_summaries(results, os.path.join(output_dir, "tensorboard", "summary"))
    if write_figures:
        study_b.data_scaling_figures(results, os.path.join(output_dir, "figures"))
    return results


# ---------------------------------------------------------------- the assembly


def _examples_array(store, sources, sizes, seeds, num_test, key):
    """(K, S, T) per-example values of one method from its cells' .npz files (NaN: missing).

    `sources`: ((cell key, grid row or None), seed column). A kernel cell's
    file names its rows by `n`; files written before that hold a row per
    grid size.
    """
    from experiments import cells as cells_lib

    out = np.full((len(sizes), len(seeds), num_test), np.nan)
    for (cell_id, row), column in sources:
        arrays = cells_lib.load_npz(os.path.join(store.cell_dir(cell_id), "examples.npz"))
        if row is not None:
            out[row, column] = arrays[key]
        elif "n" in arrays:
            for n, values in zip(arrays["n"], arrays[key]):
                if int(n) in sizes:
                    out[sizes.index(int(n)), column] = values
        elif len(arrays[key]) == len(sizes):
            out[:, column] = arrays[key]
        else:
            raise ValueError(
                f"Expected the per-example file of cell {cell_id!r} to hold one row per grid "
                f"size ({len(sizes)}). Received: rows={len(arrays[key])}")
    return out


def _on_grid(cell, key, sizes):
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


def _assemble(dataset, sizes, seeds, names, cells, num_test, n0s, network_loss, num_bootstrap,
              infinite_skipped, settings, store, fit_window, local_points, finished):
    """The results.json dictionary from the finished cells (missing values: null)."""
    # Half a test error: the floor of a mean error before taking logs.
    floor = 0.5 / num_test
    low, high = (None, None) if fit_window is None else fit_window
    methods, arrays = {}, {}

    def table(values):
        means = np.where(np.all(np.isfinite(values), axis=2), values.mean(axis=2), np.nan)
        return [[None if not np.isfinite(v) else float(v) for v in row] for row in means]

    for name in names:
        if name == "network":
            sources = [((f"network-seed{s}-n{n}", k), j) for k, n in enumerate(sizes)
                       for j, s in enumerate(seeds) if f"network-seed{s}-n{n}" in cells]
        else:
            sources = [((f"{name}-seed{s}", None), j) for j, s in enumerate(seeds)
                       if f"{name}-seed{s}" in cells]
        if not sources:
            continue
        errors = 1.0 - _examples_array(store, sources, sizes, seeds, num_test, "correct")
        losses = _examples_array(store, sources, sizes, seeds, num_test, "example_loss")
        n0 = int(name[len(_AFTER):]) if name.startswith(_AFTER) else None
        window = (low if n0 is None else max(low or 0, n0), high)
        entry = {"test_error": table(errors), "test_loss": table(losses),
                 "loss_name": ("cross_entropy" if name == "network" and network_loss != "mse"
                               else "mse"),
                 "fit_window": [window[0], window[1]]}
        entry.update(stats.scaling_fits(sizes, errors, losses, window=window, floor=floor,
                                        local_points=local_points, num_bootstrap=num_bootstrap))
        if name == "network":
            def per_cell(key):
                return [[cells.get(f"network-seed{s}-n{n}", {}).get(key) for s in seeds]
                        for n in sizes]

            entry.update(train_steps=per_cell("steps"), train_loss=per_cell("train_loss"),
                         train_error=per_cell("train_error"), hit_cap=per_cell("hit_cap"))
            entry["cap_hits"] = int(sum(bool(v) for row in entry["hit_cap"] for v in row))
            entry["runs"] = int(sum(v is not None for row in entry["hit_cap"] for v in row))
        else:
            seed_cells = [cells.get(f"{name}-seed{s}", {}) for s in seeds]
            ridges = [_on_grid(c, "ridge_factor", sizes) for c in seed_cells]
            entry["ridge_factor"] = [[r[k] for r in ridges] for k in range(len(sizes))]
            entry["with_f0"] = any(c.get("with_f0", False) for c in seed_cells)
            pre = [c["pretraining"] for c in seed_cells if "pretraining" in c]
            if pre:
                entry["pretraining_cap_hits"] = int(sum(bool(p.get("hit_cap")) for p in pre))
                entry["pretraining_steps"] = [p.get("steps") for p in pre]
        methods[name] = entry
        arrays[name] = {"test_error": errors, "test_loss": losses, "window": window}
    comparisons = {}
    if "network" in arrays:
        others = {name: value for name, value in arrays.items() if name != "network"}
        # Exponents of different losses are never compared.
        comparisons = {f"network_minus_{name}": value for name, value in stats.exponent_comparisons(
            sizes, arrays["network"], others, floor=floor, compare_loss=network_loss == "mse",
            num_bootstrap=num_bootstrap).items()}
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


def main(argv):
    launcher.main(argv, "data_scaling", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
