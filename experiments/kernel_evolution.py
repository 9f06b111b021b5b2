"""Study B (2 of 2): does the empirical NTK stop moving during training?

Vyas, Nakkiran and Bansal (2022) report that the eNTK keeps changing late in
training ("kernel velocity" does not vanish), so a fixed kernel cannot
describe the network. This binary trains one network per width with a
CONSTANT learning rate (with a rate decaying to 0 the velocity vanishes
trivially) and takes eNTK snapshots with `keras_ntk.NTKTracker` at
log-spaced global steps (`every_n_steps` list), on a fixed probe set made of
`num_probe` training inputs, `num_validation` other training inputs and the
test inputs (Θt on all of them, so kernel regression with Θt can be scored).

Per width and snapshot, results.json holds

* `velocity`: NTKTracker's `ntk_velocity`, the cosine kernel distance
  1 − ⟨Θa, Θb⟩/(‖Θa‖‖Θb‖) between consecutive snapshots divided by the steps
  between them. For small changes this distance is QUADRATIC in the change
  (1 − cos φ ≈ φ²/2), so with log-spaced snapshots (gaps ∝ t) it reads as
  v² · t rather than a rate;
* `velocity_relative`: NTKTracker's `ntk_relative_velocity`, ‖Θb − Θa‖_F / ‖Θa‖_F divided by the steps between
  the snapshots, linear in the change: the rate the verdict is based on;
* `distance_from_init` (cosine, NTKTracker's), `alignment` (centred
  kernel-target alignment with one-hot labels on the whole probe set),
  `weight_distance_from_init` (‖θt − θ0‖/‖θ0‖), `ntk_trace`;
* `kernel_regression_test_error`: test error of kernel regression with Θt
  (float64, one-hot targets, f0 not subtracted, λ = r · mean diag chosen on
  the validation inputs; the logit-averaged eNTK used as Θ ⊗ I is an
  approximation), trained on the `num_probe` probe inputs;
* `network_test_error`: the network's own test error at the same steps.

The slope of log velocity_relative against log step over the last decade
of steps (step ≥ total/10) is fitted with its standard error and stated by
a fixed rule (`velocity_verdict`): faster than 1/t (slope + 2 s.e. < −1):
the kernel converges; like 1/t (−1 within 2 s.e.): the per-step velocity
vanishes, yet the kernel moves by a similar amount every decade of steps;
slower than 1/t (slope < −0.25): it keeps moving; slope ≥ −0.25: it
plateaus. `distance_from_init_growth_last_decade` is how much the distance
from init grew over that last decade.

A width whose results are in results.json is skipped on a rerun; a width cut
short is retrained from the start.

Run: `python -m experiments.kernel_evolution
--gin_file=kernel_evolution/digits_mlp.gin --output_dir=runs/b_evolution`.
"""

import os
import time

import numpy as np
from absl import logging

from experiments import launcher

LOSSES = ("cross_entropy", "mse")
_TAIL_FRACTION = 0.1


def log_spaced_steps(total_steps, num):
    """About `num` distinct integer steps from 1 to `total_steps`, log-spaced."""
    if total_steps < 1 or num < 1:
        raise ValueError(
            "Expected total_steps >= 1 and num >= 1. "
            f"Received: total_steps={total_steps}, num={num}"
        )
    return sorted({int(round(v)) for v in np.geomspace(1, total_steps, num)})


def tail_slope(steps, values, start):
    """Least-squares slope of log(value) on log(step) for steps ≥ `start`, and its standard error.

    Returns:
        (slope, standard error), or (None, None) with fewer than 3 usable points.
    """
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    keep = (steps >= start) & np.isfinite(values) & (values > 0)
    if keep.sum() < 3:
        return None, None
    x, y = np.log(steps[keep]), np.log(values[keep])
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    spread = np.sum((x - x.mean()) ** 2)
    error = np.sqrt(np.sum(residuals**2) / max(len(x) - 2, 1) / spread) if spread > 0 else np.inf
    return float(slope), float(error)


def velocity_verdict(slope, error=0.0):
    """The fixed rule turning a tail slope ± 2 standard errors into words.

    * slope + 2 s.e. < −1: decays faster than 1/t, the kernel converges;
    * −1 within slope ± 2 s.e.: decays like 1/t, the kernel moves by a similar
      amount every decade of steps (distance grows like log t);
    * otherwise, slope < −0.25: decays slower than 1/t, the kernel keeps moving;
    * slope ≥ −0.25: plateaus.
    """
    if slope is None:
        return "undetermined (fewer than 3 snapshots in the tail)"
    if slope + 2 * error < -1.0:
        return "decays faster than 1/t (the kernel converges)"
    if slope - 2 * error <= -1.0:
        return ("decays like 1/t (slope within 2 s.e. of -1): the per-step velocity goes to "
                "zero, but the kernel moves by a similar amount every decade of steps")
    if slope < -0.25:
        return "decays slower than 1/t (the kernel keeps moving)"
    return "plateaus (slope >= -0.25: does not decay)"


def summarize(cell, total_steps):
    """Adds the tail fits, the verdict and the last decade's movement to a width's series."""
    start = _TAIL_FRACTION * total_steps
    slope, error = tail_slope(cell["steps"], cell["velocity_relative"], start)
    cosine_slope, cosine_error = tail_slope(cell["steps"], cell["velocity"], start)
    steps = np.asarray(cell["steps"], np.float64)
    distance = np.asarray(cell["distance_from_init"], np.float64)
    at_start = float(np.interp(np.log(start), np.log(steps), distance))
    return dict(
        cell,
        tail_start_step=float(start),
        velocity_relative_tail_slope=slope,
        velocity_relative_tail_slope_se=error,
        velocity_tail_slope=cosine_slope,
        velocity_tail_slope_se=cosine_error,
        velocity_verdict=velocity_verdict(slope, error or 0.0),
        distance_from_init_tail_start=at_start,
        distance_from_init_growth_last_decade=float(distance[-1] - at_start),
    )


def _width_kwargs(model, width, depth):
    if model == "mlp":
        return {"widths": (int(width),) * int(depth)}
    if model == "lenet":
        return {"filters": (int(width), 2 * int(width)), "hidden": (8 * int(width),) * 2}
    if model == "resnet18":
        return {"width": int(width)}
    raise ValueError(f"No width knob for model {model!r}. Received: model={model!r}")


def _train_width(width, *, model_builder, model, depth, data, num_classes, probe_x, probe_y,
                 layout, snapshot_steps, epochs, batch_size, learning_rate, momentum, loss,
                 seed, ridge_factors, jit_compile, strategy, output_dir, save_kernels,
                 ntk_batch_size, ntk_implementation):
    """Trains one width with an NTKTracker; returns its per-snapshot series."""
    import keras
    import tensorflow as tf

    import keras_ntk
    from experiments import data_scaling

    keras.utils.set_random_seed(seed)
    with strategy.scope():
        network = model_builder(data.input_shape, num_classes, **_width_kwargs(model, width, depth))
        if loss == "mse":
            targets = np.eye(num_classes, dtype=np.float32)[data.train.y]
            loss_object = keras.losses.MeanSquaredError()
        else:
            targets = data.train.y.astype(np.int32)
            loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        network.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                        loss=loss_object, jit_compile=jit_compile)
    tensorboard = os.path.join(output_dir, "tensorboard", f"width{width}")
    kernels_dir = os.path.join(output_dir, "kernels", f"width{width}")
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
            network_errors[step] = data_scaling.error_rate(logits, test_y)

    started = time.time()
    progress = {"next": 0}

    def log_progress(batch, logs=None):
        step = int(network.optimizer.iterations.numpy())
        if len(tracker.history) > progress["next"]:
            progress["next"] = len(tracker.history)
            elapsed = time.time() - started
            total = max(snapshot_steps)
            logging.info("width %s: snapshot %d of %d at step %d of %d; elapsed %.0f s, "
                         "ETA %.0f s", width, len(tracker.history), len(snapshot_steps), step,
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
    snapshots = tracker.history
    initial_kernel = tracker.initial_kernel  # Θ0 on the probe
    steps = [int(s["step"]) for s in snapshots]
    kernel_errors = []
    for snapshot in snapshots:
        scores = data_scaling.kernel_method_errors(
            snapshot["kernel"], layout, probe_y, num_classes, seed,
            [layout["num_candidates"]], ridge_factors)
        kernel_errors.append(scores["test_error"][0])
    initial = data_scaling.kernel_method_errors(initial_kernel, layout, probe_y,
                                                num_classes, seed, [layout["num_candidates"]],
                                                ridge_factors)["test_error"][0]
    velocity = [float(s["ntk_velocity"]) for s in snapshots]
    velocity_relative = [float(s["ntk_relative_velocity"]) for s in snapshots]
    cell = {
        "steps": steps,
        "epochs": [int(s["epoch"]) + 1 for s in snapshots],
        "velocity": velocity,
        "velocity_relative": velocity_relative,
        "distance_from_init": [float(s["ntk_distance_from_init"]) for s in snapshots],
        "alignment": [float(s["ntk_alignment"]) for s in snapshots],
        "weight_distance_from_init": [float(s["weight_distance_from_init"]) for s in snapshots],
        "ntk_trace": [float(s["ntk_trace"]) for s in snapshots],
        "kernel_regression_test_error": kernel_errors,
        "kernel_regression_test_error_init": initial,
        "network_test_error": [network_errors.get(s) for s in steps],
        "final_train_loss": float(history.history["loss"][-1]),
        "wall_seconds": time.time() - started,
    }
    cell = summarize(cell, max(snapshot_steps))
    logging.info("width %s: relative velocity tail slope %s ± %s → %s", width,
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
    seed=0,
    num_snapshots=25,
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

    Args:
        output_dir: the run's directory (local or gs://).
        strategy: the `tf.distribute.Strategy` models are built in.
        model_builders: name → builder(input_shape, num_outputs, ...).
        data_dir: tfds data directory.
        dataset: "digits", "mnist" or "cifar10".
        model: "mlp" (`depth` hidden layers of `width`), "lenet" (filters
            (w, 2w), hidden (8w, 8w)) or "resnet18" (stage-1 width w).
        widths: the widths to compare.
        depth: hidden layers of the MLP.
        epochs, batch_size, learning_rate, momentum: SGD at a CONSTANT rate
            on all training examples.
        loss: "cross_entropy" (softmax) or "mse" (one-hot targets).
        seed: seed of θ0 and the data order.
        num_snapshots: about this many log-spaced snapshot steps from 1 to
            the last step.
        num_probe, num_validation: training inputs of the probe set used as
            the kernel-regression training set and to choose its ridge; the
            probe set also holds every test input.
        num_train, num_test: use the first examples of each split (None: all).
        ridge_factors: λ / mean(diag Θ) candidates.
        jit_compile: passed to `model.compile`.
        save_kernels: also keep every snapshot kernel (NTKTracker save_dir,
            read with `keras_ntk.load_ntk_history`) under `kernels/`.
        ntk_batch_size, ntk_implementation: `keras_ntk.empirical_ntk` options.
        write_figures: draw the figures at the end.
        overwrite: discard widths stored with other settings instead of
            refusing to run (`--overwrite`).

    Returns:
        The results dictionary (also in results.json).
    """
    from experiments import cells
    from experiments import data as data_lib

    if loss not in LOSSES:
        raise ValueError(f"Expected loss in {LOSSES}. Received: loss={loss!r}")
    if model not in model_builders:
        raise ValueError(
            f"Unknown model. Known models: {', '.join(sorted(model_builders))}. "
            f"Received: model={model!r}"
        )
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"Expected positive widths. Received: widths={list(widths)!r}")
    data = data_lib.load_dataset(dataset, num_train=num_train, num_test=num_test,
                                 data_dir=data_dir)
    if num_probe + num_validation > len(data.train.y):
        raise ValueError(
            f"Expected num_probe + num_validation <= {len(data.train.y)} training examples. "
            f"Received: num_probe={num_probe}, num_validation={num_validation}"
        )
    num_classes = int(max(data.train.y.max(), data.test.y.max())) + 1
    order = np.random.RandomState(seed).permutation(len(data.train.y))
    probe_rows = order[:num_probe + num_validation]
    probe_x = np.concatenate([data.train.x[probe_rows], data.test.x])
    probe_y = np.concatenate([data.train.y[probe_rows], data.test.y])
    layout = {"num_candidates": num_probe, "num_validation": num_validation,
              "num_test": len(data.test.y)}
    steps_per_epoch = int(np.ceil(len(data.train.y) / batch_size))
    total_steps = epochs * steps_per_epoch
    snapshot_steps = log_spaced_steps(total_steps, num_snapshots)

    results_path = os.path.join(output_dir, "results.json")
    store = cells.CellStore(output_dir, overwrite=overwrite)

    def width_settings(width):
        """The operative settings of one width (not jit_compile/ntk_batch_size: speed only)."""
        network = model_builders[model](data.input_shape, num_classes,
                                        **_width_kwargs(model, width, depth))
        return {"dataset": dataset, "num_train": len(data.train.y), "num_test": len(data.test.y),
                "model": model, "width": width, "depth": depth,
                "architecture": cells.architecture(network), "epochs": epochs,
                "batch_size": batch_size, "learning_rate": learning_rate, "momentum": momentum,
                "loss": loss, "seed": seed, "steps": snapshot_steps, "num_probe": num_probe,
                "num_validation": num_validation, "ridge_factors": list(ridge_factors),
                "ntk_implementation": ntk_implementation}

    # Every stored width is checked before any work: other settings are refused here.
    settings = {str(int(w)): width_settings(int(w)) for w in widths}
    done = {}
    for key in settings:
        record = store.get(f"width{key}", settings[key])
        if record is not None:
            done[key] = record
    results = {
        "study": "kernel_evolution",
        "dataset": dataset,
        "model": model,
        "depth": depth,
        "epochs": [],
        "steps": snapshot_steps,
        "steps_per_epoch": steps_per_epoch,
        "epoch_fraction": [s / steps_per_epoch for s in snapshot_steps],
        "widths": done,
        "recipe": {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                   "momentum": momentum, "schedule": "constant", "loss": loss, "seed": seed},
        "num_probe": num_probe, "num_validation": num_validation,
        "num_test": len(data.test.y),
        "notes": (
            "velocity: NTKTracker's cosine kernel distance between consecutive snapshots per "
            "step (quadratic in small changes); velocity_relative: ‖ΔΘ‖_F/‖Θ‖_F per step "
            "(linear; the verdict uses it). Constant learning rate, so velocity divided by the "
            "rate is the same curve scaled. Kernel regression: float64, f0 not subtracted, "
            "logit-averaged eNTK as Θ⊗I (an approximation), ridge chosen on validation inputs."
        ),
    }
    started = time.time()
    for index, width in enumerate(widths, start=1):
        key = str(int(width))
        if key in done:
            logging.info("width %d of %d (%s): already finished, skipped", index, len(widths),
                         key)
            continue
        logging.info("width %d of %d (%s): training %d steps, %d snapshots", index, len(widths),
                     key, total_steps, len(snapshot_steps))
        done[key] = _train_width(
            int(width), model_builder=model_builders[model], model=model, depth=depth,
            data=data, num_classes=num_classes, probe_x=probe_x, probe_y=probe_y,
            layout=layout, snapshot_steps=snapshot_steps, epochs=epochs,
            batch_size=batch_size, learning_rate=learning_rate, momentum=momentum, loss=loss,
            seed=seed, ridge_factors=list(ridge_factors), jit_compile=jit_compile,
            strategy=strategy, output_dir=output_dir, save_kernels=save_kernels,
            ntk_batch_size=ntk_batch_size, ntk_implementation=ntk_implementation)
        store.put(f"width{key}", settings[key], done[key])
        results["epochs"] = done[key]["epochs"]
        cells.write_json_atomic(results_path, results)
        logging.info("width %d of %d (%s) done; elapsed %.0f s", index, len(widths), key,
                     time.time() - started)
    # The tail fits follow the current rule, also for widths read back from results.json.
    for key in done:
        done[key] = summarize(done[key], total_steps)
    if done:
        results["epochs"] = next(iter(done.values()))["epochs"]
    results["finished"] = all(str(int(w)) in done for w in widths)
    cells.write_json_atomic(results_path, results)
    if write_figures and done:
        draw_figures(results, os.path.join(output_dir, "figures"))
    return results


def draw_figures(results, directory):
    """velocity.png, distance_from_init.png, alignment.png, kernel_regression.png (per width)."""
    import tensorflow as tf

    from experiments import report

    plt = report.pyplot()
    tf.io.gfile.makedirs(directory)
    widths = sorted(results["widths"].items(), key=lambda item: int(item[0]))
    per_epoch = results["steps_per_epoch"]

    def save(fig, name):
        report.save_figure(fig, os.path.join(directory, name))

    def epoch_axis(ax):
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch,
                                                   lambda e: e * per_epoch))
        top.set_xlabel("epoch")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (width, cell) in enumerate(widths):
        color = f"C{index % 10}"
        for ax, key, slope_key in ((axes[0], "velocity_relative", "velocity_relative_tail_slope"),
                                   (axes[1], "velocity", "velocity_tail_slope")):
            slope = cell[slope_key]
            ax.plot(cell["steps"], cell[key], "o-", ms=3, color=color,
                    label=f"width {width}" + (f" (tail slope {slope:.2f})" if slope is not None
                                              else ""))
    for ax, label in ((axes[0], "relative velocity ‖ΔΘ‖_F/‖Θ‖_F per step"),
                      (axes[1], "cosine velocity (1−cos)/Δstep (NTKTracker)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(widths[0][1]["tail_start_step"], color="gray", lw=0.6, ls=":")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        epoch_axis(ax)
    save(fig, "velocity.png")

    for key, label, log_y, name in (
        ("distance_from_init", "kernel distance from init (1−cos)", True, "distance_from_init.png"),
        ("alignment", "centred kernel-target alignment", False, "alignment.png"),
    ):
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
        for index, (width, cell) in enumerate(widths):
            ax.plot(cell["steps"], cell[key], "o-", ms=3, color=f"C{index % 10}",
                    label=f"width {width}")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        epoch_axis(ax)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for index, (width, cell) in enumerate(widths):
        color = f"C{index % 10}"
        ax.plot(cell["steps"], cell["kernel_regression_test_error"], "o-", ms=3, color=color,
                label=f"kernel regression with Θt, width {width}")
        ax.axhline(cell["kernel_regression_test_error_init"], color=color, lw=0.6, ls=":")
        errors = [np.nan if e is None else e for e in cell["network_test_error"]]
        ax.plot(cell["steps"], errors, "--", color=color, lw=0.8, label=f"network, width {width}")
    ax.set_xscale("log")
    ax.set_yscale("log")  # a zero error is not drawn
    ax.set_xlabel("step")
    ax.set_ylabel("test error")
    ax.set_title(f"kernel regression on {results['num_probe']} probe inputs (dotted: Θ0)",
                 fontsize=9)
    ax.legend(fontsize=6)
    epoch_axis(ax)
    save(fig, "kernel_regression.png")


def main(argv):
    launcher.main(argv, "kernel_evolution", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
