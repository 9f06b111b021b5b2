"""Study B (2 of 2): does the empirical NTK stop moving during training?

Vyas, Bansal and Nakkiran (2022). One network per (width, seed), trained at a
CONSTANT learning rate (with a rate decaying to 0 the velocity vanishes
trivially), with eNTK snapshots (`keras_ntk.NTKTracker`) at log-spaced times
t_i and t_i + Δt on a fixed probe set (training, validation and test inputs).
Per t_i a cell holds the kernel velocity (cosine, Fort et al. 2020) and the
relative one, the distance from init, the alignment, ‖θt − θ0‖/‖θ0‖, tr Θ,
the test error of kernel regression with Θt and the network's test error;
the tail slope and its verdict follow `experiments.kernel_velocity`. What
was run and found: docs/study_b.md; flags, outputs, resuming:
docs/experiments.md.

Run: `python -m experiments.kernel_evolution
--gin_file=kernel_evolution/digits_mlp.gin --output_dir=runs/b_evolution`.
"""

import os
import time

import numpy as np
from absl import logging

from experiments import kernel_methods, kernel_velocity, launcher, settings



def _width_kwargs(model, width, depth):
    if model == "mlp":
        return {"widths": (int(width),) * int(depth)}
    if model == "lenet":
        return {"filters": (int(width), 2 * int(width)), "hidden": (8 * int(width),) * 2}
    if model == "resnet18":
        return {"width": int(width)}
    if model == "conv1d":
        return {"channels": (int(width),) * int(depth)}
    raise ValueError(f"No width knob for model {model!r}. Received: model={model!r}")


def _train_width(width, *, model_builder, model, depth, data, num_classes, probe_x, probe_y,
                 layout, velocity_times, velocity_dt, epochs, batch_size, learning_rate,
                 momentum, loss, seed, ridge_factors, jit_compile, strategy, output_dir,
                 save_kernels, ntk_batch_size, ntk_implementation):
    """Trains one (width, seed) with an NTKTracker; returns its series at the velocity times.

    Snapshots are taken at every t_i and t_i + Δt (`velocity_dt`); the
    velocity at t_i is the cosine kernel distance between the two divided by
    Δt (Fort et al. 2020), the relative velocity ‖Θ(t_i+Δt) − Θ(t_i)‖_F /
    (‖Θ(t_i)‖_F Δt); the other series are read at t_i.
    """
    snapshot_steps = sorted(set(velocity_times) | {t + velocity_dt for t in velocity_times})
    run_name = f"width{width}_seed{seed}"
    import keras
    import tensorflow as tf

    import keras_ntk
    from experiments import train

    keras.utils.set_random_seed(seed)
    if loss == "mse":
        targets = np.eye(num_classes, dtype=np.float32)[data.train.y]
    else:
        targets = data.train.y.astype(np.int32)
    network = train.build_model(
        strategy, model_builder, data.input_shape, num_classes,
        **_width_kwargs(model, width, depth), compile_with=lambda network: network.compile(
            optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
            loss=(keras.losses.MeanSquaredError() if loss == "mse" else
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
            jit_compile=jit_compile))
    tensorboard = os.path.join(output_dir, "tensorboard", run_name)
    kernels_dir = os.path.join(output_dir, "kernels", run_name)
    if tf.io.gfile.exists(kernels_dir):
        tf.io.gfile.rmtree(kernels_dir)  # a width cut short starts again
    one_hot_probe = np.eye(num_classes)[probe_y]
    tracker = keras_ntk.NTKTracker(
        probe_x, one_hot_probe, every_n_epochs=0, every_n_steps=list(snapshot_steps),
        save_dir=kernels_dir if save_kernels else None,
        tensorboard_dir=os.path.join(tensorboard, "ntk"),
        ntk_kwargs=dict(batch_size=ntk_batch_size, implementation=ntk_implementation),
    )
    network_errors = {}
    test_x, test_y = data.test.x, data.test.y
    wanted = set(snapshot_steps)

    def score_network(batch, logs=None):
        step = int(network.optimizer.iterations.numpy())
        if step in wanted:
            logits = np.asarray(network(test_x, training=False))
            network_errors[step] = kernel_methods.error_rate(logits, test_y)

    started = time.time()
    progress = {"next": 0}

    def log_progress(batch, logs=None):
        step = int(network.optimizer.iterations.numpy())
        if len(tracker.history) > progress["next"]:
            progress["next"] = len(tracker.history)
            elapsed = time.time() - started
            total = max(snapshot_steps)
            logging.info("%s: snapshot %d of %d at step %d of %d; elapsed %.0f s, "
                         "ETA %.0f s", run_name, len(tracker.history), len(snapshot_steps), step,
                         total, elapsed, elapsed * (total - step) / max(step, 1))

    dataset = (tf.data.Dataset.from_tensor_slices((data.train.x, targets))
               .shuffle(len(targets), seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    # The tracker precedes TensorBoard (it must, to be seen in the epoch logs).
    history = network.fit(dataset, epochs=epochs, verbose=0, callbacks=[
        tracker,
        keras.callbacks.LambdaCallback(on_train_batch_end=score_network),
        keras.callbacks.LambdaCallback(on_train_batch_end=log_progress),
        keras.callbacks.TensorBoard(os.path.join(tensorboard, "train"), write_graph=False,
                                    profile_batch=0),
    ])
    by_step = {int(snapshot["step"]): snapshot for snapshot in tracker.history}
    missing = [t for t in snapshot_steps if t not in by_step]
    if missing:
        raise RuntimeError(f"NTKTracker took no snapshot at steps {missing} of {run_name}.")
    initial_kernel = tracker.initial_kernel  # Θ0 on the probe
    starts = [by_step[t] for t in velocity_times]
    velocity, velocity_relative = [], []
    for t, start in zip(velocity_times, starts):
        a = np.asarray(start["kernel"], np.float64)
        b = np.asarray(by_step[t + velocity_dt]["kernel"], np.float64)
        velocity.append(float(keras_ntk.metrics.kernel_distance(a, b)) / velocity_dt)
        velocity_relative.append(float(np.linalg.norm(b - a) / np.linalg.norm(a)) / velocity_dt)
    kernel_errors = []
    for snapshot in starts:
        scores = kernel_methods.kernel_method_errors(
            snapshot["kernel"], layout, probe_y, num_classes,
            [layout["num_candidates"]], ridge_factors)
        kernel_errors.append(scores["test_error"][0])
    initial = kernel_methods.kernel_method_errors(initial_kernel, layout, probe_y,
                                                num_classes, [layout["num_candidates"]],
                                                ridge_factors)["test_error"][0]
    cell = {
        "steps": list(velocity_times),
        "epochs": [int(s["epoch"]) + 1 for s in starts],
        "velocity_dt": int(velocity_dt),
        "velocity": velocity,
        "velocity_relative": velocity_relative,
        "distance_from_init": [float(s["ntk_distance_from_init"]) for s in starts],
        "alignment": [float(s["ntk_alignment"]) for s in starts],
        "weight_distance_from_init": [float(s["weight_distance_from_init"]) for s in starts],
        "ntk_trace": [float(s["ntk_trace"]) for s in starts],
        "kernel_regression_test_error": kernel_errors,
        "kernel_regression_test_error_init": initial,
        "network_test_error": [network_errors.get(t) for t in velocity_times],
        "final_train_loss": float(history.history["loss"][-1]),
        "wall_seconds": time.time() - started,
    }
    cell = kernel_velocity.summarize(cell, max(snapshot_steps))
    logging.info("%s: relative velocity tail slope %s ± %s → %s", run_name,
                 cell["velocity_relative_tail_slope"], cell["velocity_relative_tail_slope_se"],
                 cell["velocity_verdict"])
    return cell


def run(
    *,
    output_dir,
    strategy,
    model_builders,
    data_dir=None,
    dataset="digits",
    model="mlp",
    widths=(64, 256, 1024),
    depth=2,
    epochs=100,
    batch_size=64,
    learning_rate=0.05,
    momentum=0.0,
    loss="cross_entropy",
    seeds=(0, 1, 2),
    num_snapshots=25,
    velocity_dt=10,
    probe_seed=0,
    num_probe=300,
    num_validation=100,
    num_train=None,
    num_test=None,
    ridge_factors=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    jit_compile="auto",
    save_kernels=False,
    ntk_batch_size=None,
    ntk_implementation="auto",
    write_figures=True,
    overwrite=False,
):
    """Runs the kernel-evolution study; writes results.json, figures and TensorBoard logs.

    The keyword arguments (gin binds them by name) are documented, and
    checked before any work, by `experiments.settings.KernelEvolution`.

    Returns:
        The results dictionary (also in results.json).
    """
    options = settings.KernelEvolution(**locals())
    from experiments import cells
    from experiments import data as data_lib
    from experiments import grid as grid_lib

    options.validate()
    _width_kwargs(model, widths[0], depth)  # refuses a model without a width knob
    data = data_lib.load_dataset(dataset, num_train=num_train, num_test=num_test,
                                 data_dir=data_dir)
    options.validate_sizes(data)
    num_classes = data.num_classes
    order = np.random.RandomState(probe_seed).permutation(len(data.train.y))
    probe_x, probe_y, layout = kernel_methods.kernel_union(
        data.train, data.test, order[:num_probe], order[num_probe:num_probe + num_validation])
    steps_per_epoch = int(np.ceil(len(data.train.y) / batch_size))
    total_steps = epochs * steps_per_epoch
    velocity_times, _ = kernel_velocity.paired_snapshot_steps(total_steps, num_snapshots,
                                                              velocity_dt)

    results_path = os.path.join(output_dir, "results.json")
    store = cells.CellStore(output_dir, overwrite=overwrite)

    def run_settings(width, seed):
        """The operative settings of one (width, seed) (not jit_compile/ntk_batch_size)."""
        network = model_builders[model](data.input_shape, num_classes,
                                        **_width_kwargs(model, width, depth))
        return {"dataset": dataset, "num_train": len(data.train.y), "num_test": len(data.test.y),
                "model": model, "width": width, "depth": depth,
                "architecture": cells.architecture(network), "epochs": epochs,
                "batch_size": batch_size, "learning_rate": learning_rate, "momentum": momentum,
                "loss": loss, "seed": seed, "steps": velocity_times, "velocity_dt": velocity_dt,
                "num_probe": num_probe, "num_validation": num_validation,
                "probe_seed": probe_seed, "ridge_factors": list(ridge_factors),
                "ntk_implementation": ntk_implementation}

    work = {f"width{int(w)}-seed{int(s)}": (int(w), int(s)) for w in widths for s in seeds}
    grid = grid_lib.Grid(store, [(key, run_settings(*point), key, point)
                                 for key, point in work.items()], name="run")
    # Every stored run is checked before any work: other settings are refused here.
    records = grid.check()
    results = {
        "study": "kernel_evolution",
        "dataset": dataset,
        "model": model,
        "depth": depth,
        "epochs": [],
        "steps": velocity_times,
        "velocity_dt": int(velocity_dt),
        "steps_per_epoch": steps_per_epoch,
        "epoch_fraction": [s / steps_per_epoch for s in velocity_times],
        "widths": {},
        "seeds": [int(s) for s in seeds],
        "recipe": {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                   "momentum": momentum, "schedule": "constant", "loss": loss,
                   "seeds": [int(s) for s in seeds]},
        "num_probe": num_probe, "num_validation": num_validation,
        "num_test": len(data.test.y),
        "notes": (
            "velocity (Fort et al. 2020, Vyas et al. 2022): the cosine kernel distance "
            "1 − ⟨Θa,Θb⟩/(‖Θa‖‖Θb‖) between Θ(t) and Θ(t+Δt) divided by Δt, at log-spaced t "
            "with the same Δt (velocity_dt steps) everywhere; quadratic in small changes. "
            "velocity_relative: ‖Θ(t+Δt) − Θ(t)‖_F/(‖Θ(t)‖_F Δt), linear (the verdict uses "
            "its tail slope, mean over seeds ± s.e. over seeds). Constant learning rate. "
            "Series are means over seeds; per-seed series under `seeds`. Kernel regression: "
            "float64, f0 not subtracted, logit-averaged eNTK as Θ⊗I (an approximation), ridge "
            "chosen on validation inputs."
        ),
    }

    def write(*_):
        done = {}
        for key, record in records.items():
            if record is not None:
                width, seed = work[key]
                done.setdefault(str(width), {})[str(seed)] = kernel_velocity.summarize(
                    record, total_steps)
        for width, per_seed in done.items():
            results["widths"][width] = kernel_velocity.aggregate_seeds(per_seed)
        if results["widths"]:
            results["epochs"] = next(iter(results["widths"].values()))["epochs"]
        cells.write_json_atomic(results_path, results)

    def compute(key):
        width, seed = work[key]
        logging.info("width %d, seed %d: training %d steps, %d velocity times", width, seed,
                     total_steps, len(velocity_times))
        return _train_width(
            width, model_builder=model_builders[model], model=model, depth=depth,
            data=data, num_classes=num_classes, probe_x=probe_x, probe_y=probe_y,
            layout=layout, velocity_times=velocity_times, velocity_dt=velocity_dt,
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            momentum=momentum, loss=loss, seed=seed, ridge_factors=list(ridge_factors),
            jit_compile=jit_compile, strategy=strategy, output_dir=output_dir,
            save_kernels=save_kernels, ntk_batch_size=ntk_batch_size,
            ntk_implementation=ntk_implementation)

    grid.run(compute, after_each=None if store.sharded else write)
    if grid.gathered() is None:
        return None  # Other shards' cells are missing (logged): no results.json yet.
    # The tail fits follow the current rule, also for runs read back from the store.
    results["finished"] = all(record is not None for record in records.values())
    write()
    if write_figures and results["widths"]:
        from experiments.figures import study_b

        study_b.kernel_evolution_figures(results, os.path.join(output_dir, "figures"))
    return results


def main(argv):
    launcher.main(argv, "kernel_evolution", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
