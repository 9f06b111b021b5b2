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

from experiments import kernel_methods, launcher, network_fit, stats
from experiments import settings as settings_lib

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
    from one sliced kernel) live in the cell store (`experiments.cells`).

    The keyword arguments (gin binds them by name) are documented, and
    checked before any work, by `experiments.settings.DataScaling`.

    Returns:
        The results dictionary (also in results.json).
    """
    options = settings_lib.DataScaling(**locals())
    import keras_ntk
    from experiments import cells as cell_store
    from experiments import data as data_lib
    from experiments import grid as grid_lib
    from experiments import models as models_lib
    from experiments import train
    from experiments.figures import study_b

    methods = list(methods)
    n0s = [int(v) for v in n0s] if "after_kernel" in methods else []
    options.validate()
    data = data_lib.load_dataset(dataset, num_train=num_train, num_test=num_test,
                                 data_dir=data_dir)
    num_classes = data.num_classes
    validation, pool, candidates = _partition(len(data.train.y), num_validation,
                                              max(n0s, default=0), split_seed)
    options.validate_candidates(len(data.train.y), len(candidates), n0s)
    sizes = ([int(v) for v in sizes] if sizes is not None
             else geometric_sizes(min(smallest_n, len(candidates)), len(candidates), num_sizes))
    options.validate_sizes(len(data.train.y), len(candidates), n0s, sizes)
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
    recipe = dict(options.network_recipe(), jit_compile=jit_compile, strategy=strategy,
                  crash_after_epochs=simulate_crash_after_epochs)

    def cell_settings(name, seed, n):
        return options.cell_settings(common, name, seed, n, per_seed_sizes[seed], num_test_used)

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
        correct, example_loss = network_fit.example_scores(
            network_fit.predict(network, data.test.x), data.test.y, num_classes, network_loss)
        cell_store.save_npz_atomic(examples_path(key), correct=correct,
                                   example_loss=example_loss)
        return {key: dict(fit, test_error=float(1 - correct.mean()),
                          test_loss=float(example_loss.mean()))}

    def pretrained(seed, key, n0):
        """The network after training from θ0 on n0 pool examples (stored), and its fit."""
        rows = pool[np.random.RandomState(1000 + seed).permutation(len(pool))[:n0]]
        return network_fit.trained_once(
            build, lambda: init_weights(seed), data.train.x[rows], data.train.y[rows],
            num_classes, store.cell_dir(key), seed=seed,
            tensorboard_dir=os.path.join(output_dir, "tensorboard", key), **recipe)

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
        return _assemble(options, sizes, names, cells, num_test_used, n0s,
                         skip_reasons[0] if skip_reasons else None, store, finished)

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


def _assemble(options, sizes, names, cells, num_test, n0s, infinite_skipped, store, finished):
    """The results.json dictionary from the finished cells (missing values: null)."""
    seeds, network_loss, num_bootstrap = (list(options.seeds), options.network_loss,
                                          options.num_bootstrap)
    # Half a test error: the floor of a mean error before taking logs.
    floor = 0.5 / num_test
    low, high = (None, None) if options.fit_window is None else options.fit_window
    methods, arrays, num_seeds = {}, {}, len(seeds)

    def load(cell_id):
        from experiments import cells as cell_store

        return cell_store.load_npz(os.path.join(store.cell_dir(cell_id), "examples.npz"))

    for name in names:
        if name == "network":
            sources = [((f"network-seed{s}-n{n}", k), j) for k, n in enumerate(sizes)
                       for j, s in enumerate(seeds) if f"network-seed{s}-n{n}" in cells]
        else:
            sources = [((f"{name}-seed{s}", None), j) for j, s in enumerate(seeds)
                       if f"{name}-seed{s}" in cells]
        if not sources:
            continue
        errors = 1.0 - stats.size_seed_examples(load, sources, sizes, num_seeds, num_test,
                                                "correct")
        losses = stats.size_seed_examples(load, sources, sizes, num_seeds, num_test,
                                          "example_loss")
        n0 = int(name[len(_AFTER):]) if name.startswith(_AFTER) else None
        window = (low if n0 is None else max(low or 0, n0), high)
        entry = {"test_error": stats.example_means(errors),
                 "test_loss": stats.example_means(losses),
                 "loss_name": ("cross_entropy" if name == "network" and network_loss != "mse"
                               else "mse"),
                 "fit_window": [window[0], window[1]]}
        entry.update(stats.scaling_fits(sizes, errors, losses, window=window, floor=floor,
                                        local_points=options.local_points,
                                        num_bootstrap=num_bootstrap))
        if name == "network":
            entry.update(network_fit.fit_table(
                [[cells.get(f"network-seed{s}-n{n}", {}) for s in seeds] for n in sizes]))
        else:
            entry.update(kernel_methods.kernel_cells_table(
                [cells.get(f"{name}-seed{s}", {}) for s in seeds], sizes))
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
        "dataset": options.dataset,
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
        "settings": options.recorded(),
        "cells": cells,
    }


def main(argv):
    launcher.main(argv, "data_scaling", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
