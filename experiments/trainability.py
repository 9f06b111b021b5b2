"""Study C: disentangling trainability and generalization in deep networks.

Xiao, Pennington and Schoenholz (ICML 2020), on the infinite-width NTK
(`keras_ntk.infinite_kernels` of `experiments.models.ntk_fcn`/`ntk_cnn`),
with the grid of neural-tangents' notebook for the paper, in four parts:
1-2. FCN phase diagrams over (σw², depth): condition number, gradient-flow
   training loss, the mean predictor's accuracy and spread, depth scales
   (a cell is one σw² row, every depth: `experiments.phase_diagram`);
3. FCN vs CNN-Flatten vs CNN-GAP: NTK spectra and kernel regression;
4. finite NTK-parameterized FCNs trained by gradient descent against the
   infinite mean prediction.
This binary holds the grids, the cell of part 4 and the assembly of
results.json; the cells of parts 1-3 and their data are computed by
`experiments.phase_diagram`, the arguments documented and checked by
`experiments.settings.Trainability`. What is computed and found:
docs/study_c.md; flags, outputs, resuming: docs/experiments.md. Figures:
`experiments.figures.study_c`.

Run: `python -m experiments.trainability --gin_file=trainability/digits.gin
--output_dir=runs/c`.
"""

import math
import os
import time

import numpy as np
from absl import logging

from experiments import cells as cells_lib
from experiments import grid as grid_lib
from experiments import launcher, phase_diagram, stats
from experiments import settings as settings_lib

ARCHITECTURES = settings_lib.Trainability.ARCHITECTURES
ACTIVATIONS = settings_lib.Trainability.ACTIVATIONS


# ---------------------------------------------------------------- 1 + 2


def _phase_key(activation, sigma_w2):
    return f"{activation}/sigma_w2={sigma_w2:.10g}"


def _phase_part(points, output_dir, activations, grids, depths, sigma_b2, phase_data,
                num_classes, times, learning_rate_fraction, kernel_batch_size):
    """Part 1-2's cell (one σw² row, every depth), its TensorBoard log and its assembly."""
    x_train, labels_train, x_test, labels_test, _ = phase_data

    def compute(key):
        activation, sigma_w2 = points[key]
        return phase_diagram.phase_row(activation, sigma_w2, sigma_b2, depths, x_train, x_test,
                                       labels_train, labels_test, num_classes, times,
                                       learning_rate_fraction, kernel_batch_size)

    def log(key, row):
        activation, sigma_w2 = points[key]
        prefix = f"sigma_w2={sigma_w2:g}"
        cells_lib.log_scalars(os.path.join(output_dir, "tensorboard", f"phase_{activation}"), {
            depth: {f"{prefix}/log10_condition_number": math.log10(cell["condition_number"]),
                    f"{prefix}/mean_predictor_test_accuracy":
                        cell["mean_predictor"]["test_accuracy"]}
            for depth, cell in zip(depths, row["cells"])})

    def assemble(records):
        return {"phase_diagram": [phase_diagram.assemble_diagram(
            activation, grids[activation], depths, sigma_b2,
            [records[key] for key in points if points[key][0] == activation], times,
            learning_rate_fraction) for activation in activations]}

    return compute, log, assemble


# ---------------------------------------------------------------- 3


def _architecture_part(points, output_dir, names, depths, activation, sigma_w2, sigma_b2, split,
                       description, kernel_size, ridge, kernel_batch_size):
    """Part 3's cell (an architecture at a depth), its TensorBoard log and its assembly."""

    def compute(key):
        return phase_diagram.architecture_cell(*points[key], activation, sigma_w2, sigma_b2,
                                               split, kernel_size, ridge, kernel_batch_size)

    def log(key, cell):
        name, depth = points[key]
        cells_lib.log_scalars(os.path.join(output_dir, "tensorboard", "architectures"), {depth: {
            f"{name}/test_accuracy": cell["test_accuracy"],
            f"{name}/log10_condition_number": math.log10(cell["condition_number"])}})

    def assemble(records):
        out = {}
        for name in names:
            by_depth = [records[key] for key in points if points[key][0] == name]
            out[name] = {
                # The contract's number: the deepest of `architecture_depths`.
                "test_accuracy": by_depth[-1]["test_accuracy"],
                "depth": [int(d) for d in depths],
                **{f"{key}_by_depth" if key == "test_accuracy" else key:
                   [c[key] for c in by_depth]
                   for key in ("test_accuracy", "test_correct", "condition_number",
                               "condition_at_float64_bound", "eigenvalues", "kernel_seconds")},
            }
        return {
            "architectures": out,
            "architecture_tests": stats.pairwise_mcnemar(
                {name: a["test_correct"] for name, a in out.items()}, depths),
            "architecture_setup": {
                "activation": activation, "sigma_w2": float(sigma_w2),
                "sigma_b2": float(sigma_b2), "num_train": len(split[1]),
                "num_test": len(split[3]), "examples": description,
                "kernel_size": int(kernel_size), "ridge_relative_to_mean_diagonal": float(ridge),
                "kernel_seconds_total": float(sum(sum(a["kernel_seconds"])
                                                  for a in out.values())),
            },
        }

    return compute, log, assemble


# ---------------------------------------------------------------- 4


def _train_finite(width, seed, depth, activation, sigma_w2, sigma_b2, x_train, y_train,
                  x_test, rate, steps, strategy, log_dir):
    """f_T − f_0 on test inputs (and f_T, f_0) of one width and seed."""
    import keras
    import tensorflow as tf

    from experiments import models, train

    keras.utils.set_random_seed(seed)
    # keras "mse" is ‖f − Y‖²/(n·O), twice the ‖f − Y‖²/(2·n·O) of
    # predict.gradient_descent_mse: the same steps need half the rate.
    model = train.build_model(
        strategy, models.ntk_fcn, x_train.shape[1:], y_train.shape[1], depth=depth, width=width,
        sigma_w2=sigma_w2, sigma_b2=sigma_b2, activation=activation,
        compile_with=lambda model: model.compile(optimizer=keras.optimizers.SGD(rate / 2),
                                                 loss="mse"))
    f0_train = model.predict(x_train, batch_size=len(x_train), verbose=0).astype(np.float64)
    f0_test = model.predict(x_test, batch_size=1024, verbose=0).astype(np.float64)
    targets = (y_train + f0_train).astype(np.float32)
    # Full-batch gradient descent: `steps` steps of one batch, in one epoch (one epoch per
    # step costs Keras' per-epoch overhead every step).
    batches = tf.data.Dataset.from_tensors((x_train, targets)).repeat()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(log_dir, update_freq=max(1, steps // 50))])
    ft_train = model.predict(x_train, batch_size=len(x_train), verbose=0).astype(np.float64)
    ft_test = model.predict(x_test, batch_size=1024, verbose=0).astype(np.float64)
    return ft_test, f0_test, float(np.mean((ft_train - targets) ** 2))


def _finite_width_part(points, output_dir, dataset, widths, seeds, depth, activation, sigma_w2,
                       sigma_b2, num_train, steps, learning_rate_fraction, strategy):
    """Part 4's cell (a width and seed), and its assembly against the infinite prediction."""
    import keras_ntk
    from experiments import models
    from keras_ntk import predict

    x_train = dataset.train.x[:num_train]
    labels_train = dataset.train.y[:num_train]
    x_test, labels_test = dataset.test.x, dataset.test.y
    num_classes = dataset.num_classes
    # One-hot − 1/C (as the session-1 runs of this part).
    y_train = phase_diagram.heatmap_targets(labels_train, num_classes) - 1.0 / num_classes
    model = models.ntk_fcn(x_train.shape[1:], 1, depth=depth, width=8, sigma_w2=sigma_w2,
                           sigma_b2=sigma_b2, activation=activation)
    x_all = np.concatenate([x_train, x_test]).astype(np.float64)
    ntk = keras_ntk.infinite_kernels(model, x_all).ntk
    k_train, k_test_train = ntk[:num_train, :num_train], ntk[num_train:, :num_train]
    rate = learning_rate_fraction * predict.max_learning_rate(k_train, y_train.size)
    _, infinite_test = predict.gradient_descent_mse(k_train, y_train, rate, steps, k_test_train,
                                                    discrete=True)
    scale = np.linalg.norm(infinite_test)

    def error(outputs):
        return float(np.linalg.norm(outputs - infinite_test) / scale)

    def compute(key):
        width, seed = points[key]
        ft, f0, loss = _train_finite(
            width, seed, depth, activation, sigma_w2, sigma_b2, x_train, y_train, x_test, rate,
            steps, strategy,
            os.path.join(output_dir, "tensorboard", "finite_width", f"w{width}_s{seed}"))
        return {"centred_test": (ft - f0).tolist(), "raw_test": ft.tolist(), "final_loss": loss}

    def assemble(records):
        per_width = []
        for width in widths:
            runs = [records[key] for key in points if points[key][0] == width]
            centred = [np.asarray(run["centred_test"]) for run in runs]
            raw = [np.asarray(run["raw_test"]) for run in runs]
            per_width.append({
                "width": int(width),
                "centred_relative_error": [error(c) for c in centred],
                "centred_relative_error_mean": float(np.mean([error(c) for c in centred])),
                "ensemble_centred_relative_error": error(np.mean(centred, axis=0)),
                "ensemble_raw_relative_error": error(np.mean(raw, axis=0)),
                "single_raw_relative_error_mean": float(np.mean([error(r) for r in raw])),
                "centred_test_accuracy": [phase_diagram.accuracy(c, labels_test) for c in centred],
                "ensemble_centred_test_accuracy": phase_diagram.accuracy(np.mean(centred, axis=0),
                                                                         labels_test),
                "final_train_loss": [r["final_loss"] for r in runs],
            })
        return {"finite_width": {
            "activation": activation, "depth": int(depth), "sigma_w2": float(sigma_w2),
            "sigma_b2": float(sigma_b2), "num_train": int(num_train), "steps": int(steps),
            "learning_rate": float(rate), "learning_rate_fraction": float(learning_rate_fraction),
            "seeds": [int(s) for s in seeds],
            "infinite_test_accuracy": phase_diagram.accuracy(infinite_test, labels_test),
            "comparison": "relative Frobenius error ‖f − μ_T‖/‖μ_T‖ on test inputs, μ_T the "
                          "infinite mean predictor after T steps",
            "widths": per_width,
        }}

    return compute, None, assemble


# ---------------------------------------------------------------- run


def run(
    *,
    output_dir,
    strategy,
    model_builders=None,
    data_dir=None,
    dataset="digits",
    num_train=500,
    num_test=None,
    activations=ACTIVATIONS,
    relu_sigma_w2=(0.5, 1.0, 1.5, 1.8, 2.0),
    erf_sigma_w2=(0.25, 0.5, 1.0, 2.0, 4.0),
    sigma_b2=0.05,
    depths=(1, 4, 16, 64),
    times=(1, 8, 64, 512, 4096),
    learning_rate_fraction=1.0,
    heldout="test",
    architectures=ARCHITECTURES,
    architecture_depths=(2, 8),
    architecture_activation="relu",
    architecture_sigma_w2=2.0,
    architecture_num_train=200,
    architecture_num_test=200,
    conv_kernel_size=3,
    ridge=0.0,
    finite_widths=(64, 256, 1024),
    finite_seeds=(0, 1, 2),
    finite_depth=2,
    finite_activation="relu",
    finite_sigma_w2=2.0,
    finite_num_train=256,
    finite_steps=200,
    finite_learning_rate_fraction=0.5,
    kernel_batch_size=None,
    write_figures=True,
    overwrite=False,
):
    """Runs study C and writes results.json, the cells, figures and TensorBoard logs.

    The keyword arguments (gin binds them by name) are documented, and
    checked before any work, by `experiments.settings.Trainability`.

    Returns:
        The results dictionary (also in results.json).
    """
    options = settings_lib.Trainability(**locals())
    from experiments import data as data_lib
    from experiments.figures import study_c as figures

    del model_builders
    activations, architectures = list(activations), list(architectures)
    grids = options.grids
    depths = [int(d) for d in depths]
    times = [float(t) for t in times]
    options.validate()
    # Data first: sizes the dataset cannot provide are refused before any cell is written.
    data = data_lib.load_dataset(
        dataset, num_train=None if heldout == "test_and_unused_train" else num_train,
        num_test=num_test, data_dir=data_dir)
    options.validate_sizes(data)
    # The operative settings of each part's cells (kernel_batch_size: memory only).
    common = {"dataset": dataset, "sigma_b2": float(sigma_b2)}
    settings = {
        "phase": dict(common, num_train=num_train, num_test=num_test, heldout=heldout,
                      depths=depths, times=times,
                      learning_rate_fraction=float(learning_rate_fraction)),
        "architectures": dict(common, activation=architecture_activation,
                              sigma_w2=float(architecture_sigma_w2),
                              num_train=architecture_num_train, num_test=architecture_num_test,
                              heldout=heldout, conv_kernel_size=conv_kernel_size,
                              ridge=float(ridge)),
        "finite_width": dict(common, num_test=num_test,
                             depth=finite_depth, activation=finite_activation,
                             sigma_w2=float(finite_sigma_w2), finite_num_train=finite_num_train,
                             steps=finite_steps,
                             learning_rate_fraction=float(finite_learning_rate_fraction)),
    }
    store = cells_lib.CellStore(output_dir, overwrite=overwrite)

    def part_grid(part, points, label, name):
        """The grid of one part: a cell `<part>-<label>` per point, with the part's settings."""
        return grid_lib.Grid(store, [
            (f"{part}-{label(*p).replace('/', '-')}", dict(settings[part], part=part,
                                                           cell=label(*p)), label(*p), p)
            for p in points], name)

    architecture_depths = [int(d) for d in architecture_depths]
    finite_widths, finite_seeds = [int(w) for w in finite_widths], [int(s) for s in finite_seeds]
    phase_grid = part_grid("phase", [(a, s) for a in activations for s in grids[a]],
                           _phase_key, "phase row (σw², every depth)")
    architecture_grid = part_grid(
        "architectures", [(n, d) for n in architectures for d in architecture_depths],
        lambda n, d: f"{n}/depth={d}", "architecture cell")
    finite_grid = part_grid("finite_width", [(w, s) for w in finite_widths for s in finite_seeds],
                            lambda w, s: f"width={w}/seed={s}", "finite-width run")
    # Every stored cell of every part is checked before any work: other settings refused here.
    grid_lib.check_all(phase_grid, architecture_grid, finite_grid)
    start = time.time()
    results = {"study": "trainability", "dataset": dataset, "sigma_b2": float(sigma_b2),
               "targets": "heatmaps: raw one-hot (accuracy of the argmax); spread analysis: "
                          "one-hot minus the training mean"}

    results_path = os.path.join(output_dir, "results.json")

    def phase_part():
        phase_data = phase_diagram.examples(data, num_train or len(data.train.y), heldout)
        results["num_train"], results["num_test"] = len(phase_data[1]), len(phase_data[3])
        results["examples"] = phase_data[4]
        logging.info("Part 1-2: FCN phase diagrams on %d train / %d held-out inputs (%s)",
                     results["num_train"], results["num_test"], phase_data[4])
        num_classes = data.num_classes
        return _phase_part(phase_grid.points, output_dir, activations, grids, depths, sigma_b2,
                           phase_data, num_classes, times, learning_rate_fraction,
                           kernel_batch_size)

    def architecture_part():
        subset = data_lib.load_dataset(
            dataset, num_train=None if heldout == "test_and_unused_train" else
            architecture_num_train, num_test=None, data_dir=data_dir)
        x_train, labels_train, x_test, labels_test, description = phase_diagram.examples(
            subset, architecture_num_train, heldout, flat=False)
        split = (x_train, labels_train, x_test[:architecture_num_test],
                 labels_test[:architecture_num_test])
        logging.info("Part 3: architectures %s on %d train / %d test inputs", architectures,
                     len(split[1]), len(split[3]))
        description += f", the first {len(split[3])} of them" if architecture_num_test else ""
        return _architecture_part(architecture_grid.points, output_dir, architectures,
                                  architecture_depths, architecture_activation,
                                  architecture_sigma_w2, sigma_b2, split, description,
                                  conv_kernel_size, ridge, kernel_batch_size)

    def finite_width_part():
        logging.info("Part 4: finite widths %s, seeds %s", finite_widths, finite_seeds)
        return _finite_width_part(
            finite_grid.points, output_dir, data, finite_widths, finite_seeds, finite_depth,
            finite_activation, finite_sigma_w2, sigma_b2, min(finite_num_train, len(data.train.y)),
            int(finite_steps), finite_learning_rate_fraction, strategy)

    # Each part: its cells computed (this shard's, with --shard), then assembled. Unsharded,
    # results.json is rewritten after each part (the heatmaps first: parts 3 and 4 can take
    # much longer); a shard assembles every part once, from every shard's cells, after its
    # own last cell (the common path of the binaries: Grid.run, then Grid.gathered).
    parts = [(phase_grid, phase_part)] + [(architecture_grid, architecture_part)] * bool(
        architectures) + [(finite_grid, finite_width_part)] * bool(finite_widths)
    assemblers = []
    for grid, part in parts:
        compute, log, assemble = part()
        grid.run(compute, after_each=log)
        assemblers.append(assemble)
        if store.sharded:
            continue
        results.update(assemble(grid.records))
        if grid is not finite_grid:
            cells_lib.write_json_atomic(results_path, results)
        if write_figures and grid is phase_grid:
            figures.draw_figures(results, os.path.join(output_dir, "figures"))
    if store.sharded:
        records = grid_lib.gathered(*(grid for grid, _ in parts))
        if records is None:
            return None  # Other shards' cells are missing (logged): no results.json yet.
        for assemble, part_records in zip(assemblers, records):
            results.update(assemble(part_records))
    results["seconds_this_run"] = time.time() - start
    cells_lib.write_json_atomic(results_path, results)
    if write_figures:
        figures.draw_figures(results, os.path.join(output_dir, "figures"))
    return results


def main(argv):
    launcher.main(argv, "trainability", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
