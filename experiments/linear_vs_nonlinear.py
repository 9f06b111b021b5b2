"""Study A: what can linearized neural networks actually say about generalization?

Ortiz-Jiménez, Moosavi-Dezfooli and Frossard (NeurIPS 2021). Per cell (model,
task, k, seed), from one saved θ0 per model and with one recipe and data
order: the network, its linearization at θ0 (`linearized_init_mode`), the
difference model at θ0 and the difference model at θT, each trained and
scored on the test set; then alignment, kernel distance, a_j and ‖θT − θ0‖
(`experiments.entk`). The four models, the tasks and what is measured:
docs/study_a.md; flags, outputs and resuming: docs/experiments.md.

Run: `python -m experiments.linear_vs_nonlinear
--gin_file=linear_vs_nonlinear/digits_mlp.gin --output_dir=runs/a`.
"""

import os

import numpy as np
from absl import app, logging

from experiments import entk, launcher, settings
from experiments.figures.study_a import MODELS  # noqa: F401 (a cell's models, in training order)

TASKS = settings.LinearVsNonlinear.TASKS


def _cell_id(model, task, k, seed):
    return f"{model}-{task}" + (f"-k{k}" if k is not None else "") + f"-seed{seed}"


class _Study:
    """State shared by the cells of one run (data, θ0 per model, strategy)."""

    def __init__(self, output_dir, strategy, model_builders, dataset, recipe,
                 num_probe, num_projection, ntk_batch_size, ntk_implementation,
                 eigen_solver="dense"):
        self.output_dir = output_dir
        self.strategy = strategy
        self.model_builders = model_builders
        self.dataset = dataset
        self.recipe = recipe
        self.num_probe = min(num_probe, len(dataset.train.x))
        self.num_projection = num_projection
        self.tensorboard = True
        self.fit_backups = True
        self.probe_x = dataset.train.x[: self.num_probe]
        # The inputs of the eigenfunction tasks: train then test.
        self.inputs = np.concatenate([dataset.train.x, dataset.test.x])
        # How Θ is computed, and diagonalized and projected over train+test.
        self.kernels = entk.Kernels(ntk_batch_size, ntk_implementation,
                                    entk.resolve_solver(eigen_solver, len(self.inputs)))

    def path(self, *parts):
        return os.path.join(self.output_dir, *parts)

    def build(self, name, weights_path=None):
        from experiments import train

        return train.build_model(self.strategy, self.model_builders[name],
                                 self.dataset.input_shape, 1, weights_path=weights_path)

    def linearize(self, network, mode, non_trainable_values=None):
        import keras

        import keras_ntk
        from experiments import train

        return train.build_model(self.strategy, lambda: keras.Sequential([
            keras.Input(self.dataset.input_shape),
            keras_ntk.Linearize(network, mode=mode, non_trainable_values=non_trainable_values),
        ], name=f"linearized_{network.name}"))


def _initial_state(study, model_name, init_seed, num_eigenvectors, init_dir=None):
    """θ0 of `model_name` (saved once), the probe Θ0 and the eigenpairs of Θ0 on train+test.

    The eigenvectors serve the eigenfunction tasks and the a_j of every task.

    Both files live in `init_dir` (the store's `init-<model>` cell), written
    atomically; an unreadable one is discarded and computed again.
    """
    from experiments import cells

    init_dir = init_dir or study.path("init")
    weights_path = cells.initial_weights(lambda: study.build(model_name),
                                         os.path.join(init_dir, f"{model_name}.weights.h5"),
                                         init_seed)
    model = study.build(model_name, weights_path)
    eigen_path = os.path.join(init_dir, f"{model_name}_eigen.npz")
    saved = cells.load_or_discard(eigen_path, cells.load_npz)
    if saved is not None and (
            "eigenvectors" not in saved or saved["eigenvectors"].shape[1] < num_eigenvectors):
        saved = None  # Computed for fewer eigenvectors: again from the same θ0.
    if saved is None:
        logging.info("eNTK at θ0 of %s on %d probe inputs", model_name, len(study.probe_x))
        saved = {"probe_kernel": study.kernels.kernel(model, study.probe_x),
                 "eigen_solver": np.asarray(study.kernels.solver)}
        logging.info("Eigenvectors of the eNTK at θ0 of %s on %d train+test inputs (%s)",
                     model_name, len(study.inputs), study.kernels.solver)
        saved["eigenvalues"], saved["eigenvectors"] = study.kernels.top_eigenpairs(
            model, study.inputs, num_eigenvectors)
        cells.save_npz_atomic(eigen_path, **saved)
    return weights_path, saved


def _task_labels(study, task, k, eigen):
    from experiments import data as data_lib

    train, test = study.dataset.train, study.dataset.test
    if task == "binary":
        return data_lib.binary_labels(train.y), data_lib.binary_labels(test.y)
    labels = data_lib.eigenfunction_labels(eigen["eigenvectors"], k)
    return labels[: len(train.y)], labels[len(train.y):]


def _run_cell(study, cell, init_weights_path, init_state, linearized_init_mode, cell_dir=None):
    """Trains the four models of one cell (same recipe, same data order) and measures.

    Stages finished by an earlier, interrupted run are read back from
    `cell_dir` (the store's directory of this cell).
    """
    import tensorflow as tf

    from experiments import cells, network_fit, report, train
    from keras_ntk import metrics

    model_name, task, k, seed = cell
    cell_id = _cell_id(*cell)
    cell_dir = cell_dir or study.path("cells", cell_id)
    tf.io.gfile.makedirs(cell_dir)
    stages_path = os.path.join(cell_dir, "stages.json")
    stages = cells.load_or_discard(stages_path, cells.load_json) or {}
    train_y, test_y = _task_labels(study, task, k, init_state)
    data = study.dataset
    fit_kwargs = dict(study.recipe, seed=seed, strategy=study.strategy)

    def fit_and_score(stage, model):
        train.fit(
            model, data.train.x, train_y,
            backup_dir=os.path.join(cell_dir, f"backup_{stage}") if study.fit_backups else None,
            tensorboard_dir=(study.path("tensorboard", cell_id, stage) if study.tensorboard
                             else None),
            **fit_kwargs,
        )
        # Predicted labels 1[logit > 0] in inference mode.
        predictions = network_fit.predict(model, data.test.x).reshape(-1) > 0
        return {
            "train": train.binary_accuracy(model, data.train.x, train_y),
            "test": float(np.mean(predictions == (test_y > 0.5))),
            "test_predictions": report.pack_bits(predictions),
        }

    def save_stages():
        cells.write_json_atomic(stages_path, stages)

    # 1. The network, trained from θ0.
    network_path = os.path.join(cell_dir, "network.weights.h5")
    network = study.build(model_name)
    if "network" in stages and not cells.load_weights_or_discard(network, network_path):
        stages = {}  # θT unreadable: every stage after it is trained again.
    if "network" not in stages:
        logging.info("%s: training the network", cell_id)
        network = study.build(model_name, init_weights_path)
        stages["network"] = fit_and_score("network", network)
        cells.save_weights_atomic(network, network_path)
        save_stages()
    initial = study.build(model_name, init_weights_path)

    # 2. The linearization at θ0 (full by default), and 3. the difference
    # model at θ0, the baseline of the θT tracking rule.
    modes = {"linearized_init": linearized_init_mode, "linearized_init_difference": "difference"}
    for stage, mode in modes.items():
        if stage in stages:
            continue
        if stage == "linearized_init_difference" and linearized_init_mode == "difference":
            stages[stage] = stages["linearized_init"]  # The same fit.
            continue
        logging.info("%s: training the linearization at θ0 (%s)", cell_id, mode)
        linearized = study.linearize(initial, mode)
        accuracy = fit_and_score(stage, linearized)
        delta = linearized.layers[-1].deltas
        stages[stage] = dict(accuracy,
                             weight_distance=entk.weights_norm([d.numpy() for d in delta]))
        save_stages()

    # 4. The difference model at θT, BatchNorm statistics reset to θ0's.
    if "linearized_final" not in stages:
        logging.info("%s: training the linearization at θT", cell_id)
        initial_statistics = [np.asarray(v) for v in initial.non_trainable_weights]
        linearized = study.linearize(network, "difference", initial_statistics)
        stages["linearized_final"] = fit_and_score("linearized_final", linearized)
        save_stages()

    # 5. Kernels and distances.
    if "kernels" not in stages:
        logging.info("%s: eNTK at θT on %d probe inputs and a_j on %d train+test inputs",
                     cell_id, study.num_probe, len(study.inputs))
        probe_y = train_y[: study.num_probe]
        labels_pm = 2.0 * probe_y - 1.0  # Alignment uses ±1 labels.
        kernel_final = study.kernels.kernel(network, study.probe_x)
        vectors = init_state["eigenvectors"][:, : study.num_projection]
        all_labels_pm = 2.0 * np.concatenate([train_y, test_y]) - 1.0
        stages["kernels"] = dict(
            entk.kernel_change(init_state["probe_kernel"], kernel_final, labels_pm),
            **entk.weight_change(initial.trainable_weights, network.trainable_weights),
            # a_j = v_jᵀ Θ v_j over train+test in the eigenbasis of the tasks:
            # at θ0 these are the eigenvalues λ_j.
            projection={
                "init": [float(a) for a in init_state["eigenvalues"][: study.num_projection]],
                "final": [float(a) for a in study.kernels.eigenbasis_projection(
                    network, study.inputs, vectors)],
            },
            label_energy=[float(e) for e in metrics.eigen_energy(all_labels_pm, vectors)])
        save_stages()

    return report.study_a_record(cell, _cell_id(*cell), stages, train_y, test_y,
                                 linearized_init_mode)


def run(
    *,
    output_dir,
    strategy,
    model_builders,
    data_dir=None,
    dataset="digits",
    models=("mlp",),
    tasks=TASKS,
    ks=(1, 2, 5, 10, 50),
    seeds=(0,),
    init_seed=0,
    num_train=None,
    num_test=None,
    epochs=100,
    batch_size=128,
    learning_rate=0.05,
    momentum=0.9,
    drop_remainder=False,
    jit_compile="auto",
    linearized_init_mode="full",
    num_probe=512,
    num_projection=100,
    ntk_batch_size=None,
    ntk_implementation="auto",
    eigen_solver="auto",
    max_new_cells=None,
    verbose="auto",
    tensorboard=True,
    fit_backups=True,
    write_report=True,
    simulate_crash_after_epochs=None,
    overwrite=False,
):
    """Runs study A and writes results.json, figures and report.md into `output_dir`.

    Cells are stored, skipped, resumed (by model, and inside a fit by epoch)
    or refused as docs/experiments.md#resuming describes.

    The keyword arguments (gin binds them by name) are documented, and
    checked before any work, by `experiments.settings.LinearVsNonlinear`.

    Returns:
        The results dictionary (also in results.json).
    """
    options = settings.LinearVsNonlinear(**locals())
    from experiments import cells as cell_store
    from experiments import data as data_lib
    from experiments import grid as grid_lib
    from experiments import report

    models, tasks = list(models), list(tasks)
    ks = [int(k) for k in ks]
    options.validate()
    cells = [
        (m, task, k, s)
        for m in models
        for task in tasks
        for k in (ks if task == "eigenfunction" else [None])
        for s in seeds
    ]
    results_path = os.path.join(output_dir, "results.json")
    results = report.study_a_results(dataset, linearized_init_mode, init_seed, dict(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, momentum=momentum,
        drop_remainder=drop_remainder))
    store = cell_store.CellStore(output_dir, overwrite=overwrite)
    data = data_lib.load_dataset(dataset, num_train=num_train, num_test=num_test,
                                 data_dir=data_dir)
    options.validate_sizes(data)
    results["num_train"], results["num_test"] = len(data.train.y), len(data.test.y)
    study = _Study(output_dir, strategy, model_builders, data,
                   dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                        momentum=momentum, drop_remainder=drop_remainder,
                        jit_compile=jit_compile, verbose=verbose,
                        crash_after_epochs=simulate_crash_after_epochs),
                   num_probe, num_projection, ntk_batch_size, ntk_implementation,
                   eigen_solver)
    results["num_probe"] = study.num_probe
    study.tensorboard, study.fit_backups = tensorboard, fit_backups
    need_eigen = "eigenfunction" in tasks
    num_eigenvectors = max(max(ks) if need_eigen else 0, num_projection)
    if num_eigenvectors >= len(study.inputs):
        raise ValueError(
            f"Expected fewer eigenvectors than the {len(study.inputs)} train+test inputs. "
            f"Received: ks={ks}, num_projection={num_projection}")
    # The operative settings of every cell (θ0's and the cell's own); not
    # what only changes speed or memory (jit_compile, ntk_batch_size, verbose).
    init_settings = {
        name: {"dataset": dataset, "num_train": len(data.train.y),
               "num_test": len(data.test.y), "model": name, "init_seed": init_seed,
               "architecture": cell_store.architecture(study.build(name)),
               "num_probe": study.num_probe, "num_projection": num_projection,
               "eigen_solver": eigen_solver, "ntk_implementation": ntk_implementation}
        for name in models
    }

    def cell_settings(cell):
        model_name, task, k, seed = cell
        return dict(init_settings[model_name], task=task, k=k, seed=seed, epochs=epochs,
                    batch_size=batch_size, learning_rate=learning_rate, momentum=momentum,
                    drop_remainder=drop_remainder, linearized_init_mode=linearized_init_mode)

    init_states = {}

    def initial_state(model_name):
        """θ0 and the eigenpairs of Θ0 of `model_name`, computed once (the store's init cell)."""
        if model_name not in init_states:
            init_key = f"init-{model_name}"
            init_states[model_name] = _initial_state(study, model_name, init_seed,
                                                     num_eigenvectors, store.cell_dir(init_key))
            eigen = init_states[model_name][1]
            results["eigen"][model_name] = {
                "eigenvalues": [float(v) for v in eigen["eigenvalues"][:num_eigenvectors]],
                "eigenvectors_file": os.path.join("cells", init_key, f"{model_name}_eigen.npz"),
                "solver": str(eigen["eigen_solver"]),
                "inputs": "train+test",
            }
        weights_path, init_state = init_states[model_name]
        if init_state["eigenvectors"].shape[1] < num_eigenvectors:
            raise ValueError(
                f"Saved eigenvectors of {model_name} stop at "
                f"{init_state['eigenvectors'].shape[1]}; use a new output_dir for larger k or "
                f"num_projection. Received: ks={ks}, num_projection={num_projection}"
            )
        return weights_path, init_state

    def compute(cell_id):
        cell = cells_by_id[cell_id]
        weights_path, init_state = initial_state(cell[0])
        return _run_cell(study, cell, weights_path, init_state, linearized_init_mode,
                         store.cell_dir(cell_id))

    def write_results(*_):
        results["runs"] = [record for record in grid.records.values() if record is not None]
        cell_store.write_json_atomic(results_path, results)

    cells_by_id = {_cell_id(*cell): cell for cell in cells}
    # Every stored cell and θ0 is checked before any work: other settings are refused here.
    grid = grid_lib.Grid(store, [(key, cell_settings(cell)) for key, cell in cells_by_id.items()],
                         shared={f"init-{name}": init_settings[name] for name in models})
    grid.run(compute, after_each=None if store.sharded else write_results,
             max_new=max_new_cells, discard_cell_dir=True)
    records = grid.gathered()
    if records is None:
        return None  # Other shards' cells are missing (logged): no results.json yet.
    if store.sharded:
        for name in models:
            initial_state(name)  # results["eigen"], from the θ0 cell stored by a shard.
    write_results()
    if write_report:
        report.write_study_a_report(output_dir, results)
    return results


def main(argv):
    launcher.main(argv, "linear_vs_nonlinear", run)


if __name__ == "__main__":
    app.run(main)
