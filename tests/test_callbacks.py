"""NTKTracker in model.fit, checked against kernels recomputed independently."""

import csv
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from keras_ntk import metrics
from keras_ntk.callbacks import NTKTracker, load_ntk_history

KEYS = (
    "ntk_distance_from_init",
    "ntk_velocity",
    "ntk_relative_velocity",
    "ntk_alignment",
    "ntk_trace",
    "ntk_condition",
    "weight_distance_from_init",
    "weight_distance_sq",
)


def small_mlp():
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype("float32")
    y = np.sign(x[:, :1] + 0.3 * x[:, 1:2]).astype("float32")
    return x, y


def naive_kernel(model, x):
    """Θ = J Jᵀ from explicit float64 Jacobians (one logit)."""
    with tf.GradientTape() as tape:
        out = model(x, training=False)
    jacobians = tape.jacobian(out, model.trainable_weights)
    jac = np.concatenate([np.reshape(np.asarray(j, np.float64), (len(x), -1)) for j in jacobians], 1)
    return jac @ jac.T


def fit_with_tracker(model, tmp_path, epochs=3, **kwargs):
    x, y = data()
    probe_x, probe_y = x[:12], y[:12, 0]
    tracker = NTKTracker(probe_x, probe_y, save_dir=str(tmp_path / "ntk"), **kwargs)
    csv_path = tmp_path / "log.csv"
    model.compile(optimizer=keras.optimizers.SGD(0.2, momentum=0.9), loss="mse")
    history = model.fit(
        x, y, batch_size=8, epochs=epochs, verbose=0,
        callbacks=[tracker, keras.callbacks.CSVLogger(str(csv_path))],
    )
    return tracker, history, csv_path, probe_x, probe_y


def test_logs_history_and_csv_match_metrics_of_saved_kernels(tmp_path):
    model = small_mlp()
    initial_reference = naive_kernel(model, data()[0][:12])
    tracker, history, csv_path, _, probe_y = fit_with_tracker(model, tmp_path)
    saved = load_ntk_history(str(tmp_path / "ntk"))
    initial = saved["initial"]["kernel"]
    # Θ0 is the kernel of the untrained model (independent naive reference).
    assert np.linalg.norm(initial - initial_reference) / np.linalg.norm(initial_reference) < 1e-4
    assert [s["epoch"] for s in saved["snapshots"]] == [0, 1, 2]
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    previous = initial
    for epoch, snapshot in enumerate(saved["snapshots"]):
        kernel = snapshot["kernel"]
        expected = {
            "ntk_distance_from_init": metrics.kernel_distance(initial, kernel),
            "ntk_velocity": metrics.kernel_distance(previous, kernel),
            "ntk_relative_velocity": np.linalg.norm(kernel - previous) / np.linalg.norm(previous),
            "ntk_alignment": metrics.kernel_alignment(kernel, probe_y, centered=True),
            "ntk_trace": np.trace(kernel),
            "ntk_condition": metrics.condition_number(kernel),
        }
        for key, value in expected.items():
            assert history.history[key][epoch] == pytest.approx(value, rel=1e-6)
            assert float(rows[epoch][key]) == pytest.approx(value, rel=1e-5)
        previous = kernel
    assert all(key in rows[0] for key in KEYS)
    np.testing.assert_array_equal(tracker.initial_kernel, initial)
    # The network's kernel moves; its weights move.
    assert history.history["ntk_distance_from_init"][-1] > 1e-4
    assert history.history["weight_distance_from_init"][-1] > 0


def test_weight_distance_is_relative_to_initial_weights(tmp_path):
    model = small_mlp()
    initial = np.concatenate([np.ravel(w.numpy()) for w in model.trainable_weights])
    _, history, _, _, _ = fit_with_tracker(model, tmp_path, epochs=1)
    final = np.concatenate([np.ravel(w.numpy()) for w in model.trainable_weights])
    assert history.history["weight_distance_sq"][0] == pytest.approx(np.sum((final - initial) ** 2), rel=1e-5)
    assert history.history["weight_distance_from_init"][0] == pytest.approx(
        np.linalg.norm(final - initial) / np.linalg.norm(initial), rel=1e-5
    )


def test_linearized_model_has_a_constant_kernel(tmp_path):
    net = small_mlp()
    linear = keras_ntk.Linearize(net)
    model = keras.Sequential([keras.Input((5,)), linear])
    theta0 = np.concatenate([np.ravel(w.numpy()) for w in net.trainable_weights])
    _, history, _, _, _ = fit_with_tracker(model, tmp_path)
    assert max(history.history["ntk_distance_from_init"]) < 1e-6
    # θ = θ0 + δ, so the relative distance divides by ‖θ0‖, never by ‖δ0‖ = 0.
    delta = np.concatenate([np.ravel(d.numpy()) for d in linear.deltas])
    assert np.linalg.norm(delta) > 0
    assert history.history["weight_distance_from_init"][-1] == pytest.approx(
        np.linalg.norm(delta) / np.linalg.norm(theta0), rel=1e-4
    )


def test_untracked_epochs_log_nan(tmp_path):
    _, history, csv_path, _, _ = fit_with_tracker(small_mlp(), tmp_path, epochs=4, every_n_epochs=2)
    distances = history.history["ntk_distance_from_init"]
    assert math.isnan(distances[0]) and math.isnan(distances[2])
    assert distances[1] > 0 and distances[3] > 0
    # Velocity between the epoch-1 and epoch-3 snapshots is per epoch.
    saved = load_ntk_history(str(tmp_path / "ntk"))["snapshots"]
    assert history.history["ntk_velocity"][3] == pytest.approx(
        metrics.kernel_distance(saved[0]["kernel"], saved[1]["kernel"]) / 2, rel=1e-6
    )


def test_step_snapshots_and_tensorboard(tmp_path):
    tracker, _, _, _, _ = fit_with_tracker(
        small_mlp(), tmp_path, epochs=2, every_n_epochs=0, every_n_steps=[1, 2, 5],
        tensorboard_dir=str(tmp_path / "tb"),
    )
    assert [record["step"] for record in tracker.history] == [1, 2, 5]
    assert [record["epoch"] for record in tracker.history] == [0, 0, 1]
    saved = load_ntk_history(str(tmp_path / "ntk"))["snapshots"]
    assert [s["step"] for s in saved] == [1, 2, 5]
    assert saved[2]["ntk_velocity"] == pytest.approx(
        metrics.kernel_distance(saved[1]["kernel"], saved[2]["kernel"]) / 3, rel=1e-6
    )
    assert tf.io.gfile.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


def test_resumed_training_keeps_initial_kernel(tmp_path):
    model = small_mlp()
    fit_with_tracker(model, tmp_path, epochs=1)
    first = load_ntk_history(str(tmp_path / "ntk"))["initial"]["kernel"]
    # The model has trained: its current kernel is not Θ0 any more...
    current = naive_kernel(model, data()[0][:12])
    assert metrics.kernel_distance(first, current) > 1e-5
    # ...but a new tracker on the same save_dir reloads Θ0 rather than recomputing it.
    tracker, history, _, _, _ = fit_with_tracker(model, tmp_path, epochs=1)
    np.testing.assert_array_equal(tracker._initial_kernel, first)
    last = load_ntk_history(str(tmp_path / "ntk"))["snapshots"][-1]["kernel"]
    assert history.history["ntk_distance_from_init"][0] == pytest.approx(
        metrics.kernel_distance(first, last), rel=1e-6
    )


def test_errors_say_what_was_received(tmp_path):
    with pytest.raises(ValueError, match="Received: every_n_epochs=-1"):
        NTKTracker(np.zeros((2, 5)), every_n_epochs=-1)
    with pytest.raises(ValueError, match="Received: every_n_steps=0"):
        NTKTracker(np.zeros((2, 5)), every_n_steps=0)
    with pytest.raises(ValueError, match=r"Received: every_n_steps=\[1, 0\.5\]"):
        NTKTracker(np.zeros((2, 5)), every_n_steps=[1, 0.5])
    with pytest.raises(ValueError, match=r"Received: every_n_steps=\[\]"):
        NTKTracker(np.zeros((2, 5)), every_n_steps=[])
    # numpy integers (e.g. np.geomspace(...).astype(int), log-spaced) are accepted.
    steps = np.unique(np.geomspace(1, 1000, 10).astype(int))
    assert NTKTracker(np.zeros((2, 5)), every_n_steps=steps).every_n_steps == [int(s) for s in steps]
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    tracker = NTKTracker(np.zeros((3, 5), "float32"), ntk_kwargs={"trace_axes": ()})
    with pytest.raises(ValueError, match=r"Received: a kernel of shape \(3, 3, 2, 2\)"):
        model.fit(np.zeros((4, 5)), np.zeros((4, 2)), epochs=1, verbose=0, callbacks=[tracker])
    with pytest.raises(ValueError, match="NTKTracker save_dir"):
        load_ntk_history(str(tmp_path / "missing"))


def test_fit_under_mirrored_strategy(tmp_path, mirrored_strategy):
    """Two replicas (the logical CPUs of conftest): Θ0 is the model's kernel, logs are filled."""
    strategy = mirrored_strategy
    with strategy.scope():
        model = small_mlp()
    initial_reference = naive_kernel(model, data()[0][:12])
    with strategy.scope():
        tracker, history, _, _, probe_y = fit_with_tracker(model, tmp_path, epochs=2)
    saved = load_ntk_history(str(tmp_path / "ntk"))
    initial = saved["initial"]["kernel"]
    assert np.linalg.norm(initial - initial_reference) / np.linalg.norm(initial_reference) < 1e-4
    final_reference = naive_kernel(model, data()[0][:12])
    assert history.history["ntk_distance_from_init"][-1] == pytest.approx(
        metrics.kernel_distance(initial_reference, final_reference), rel=1e-3
    )
    assert history.history["ntk_alignment"][-1] == pytest.approx(
        metrics.kernel_alignment(final_reference, probe_y, centered=True), rel=1e-4
    )


def test_a_second_fit_with_the_same_tracker_keeps_initial_kernel():
    model = small_mlp()
    x, y = data()
    initial_reference = naive_kernel(model, x[:12])
    tracker = NTKTracker(x[:12], y[:12, 0])
    model.compile(optimizer=keras.optimizers.SGD(0.2, momentum=0.9), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tracker])
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tracker])
    final_reference = naive_kernel(model, x[:12])
    # Distance from the kernel before the FIRST fit, not from the start of the second.
    assert history.history["ntk_distance_from_init"][0] == pytest.approx(
        metrics.kernel_distance(initial_reference, final_reference), rel=1e-3
    )


def test_tensorboard_holds_eigenvalue_histogram_and_kernel_image(tmp_path):
    tracker, _, _, _, _ = fit_with_tracker(
        small_mlp(), tmp_path, epochs=1, every_n_epochs=0, every_n_steps=[2, 4],
        tensorboard_dir=str(tmp_path / "tb"),
    )
    found = {}
    for path in tf.io.gfile.glob(str(tmp_path / "tb" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found[(value.tag, event.step)] = tf.make_ndarray(value.tensor)
    for record in tracker.history:
        step = record["step"]
        # Histogram buckets (left, right, count): the 12 eigenvalues of the snapshot.
        buckets = found[("ntk_eigenvalues", step)]
        assert buckets[:, 2].sum() == pytest.approx(12)
        eigenvalues = metrics.spectrum(record["kernel"])
        assert buckets[0, 0] == pytest.approx(eigenvalues[-1], rel=1e-5)
        assert buckets[-1, 1] == pytest.approx(eigenvalues[0], rel=1e-5)
        # The image is the 12×12 kernel (width, height, PNG bytes).
        assert [int(v) for v in found[("ntk_kernel", step)][:2]] == [12, 12]
        assert float(found[("ntk_distance_from_init", step)]) == pytest.approx(
            record["ntk_distance_from_init"], rel=1e-5
        )


def naive_layer_kernels(model, x):
    """{layer name: J_l J_lᵀ} from explicit float64 Jacobians per layer (one logit)."""
    out = {}
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        with tf.GradientTape() as tape:
            y = model(x, training=False)
        jac = tape.jacobian(y, layer.trainable_weights)
        jac = np.concatenate([np.reshape(np.asarray(j, np.float64), (len(x), -1)) for j in jac], 1)
        out[layer.name] = jac @ jac.T
    return out


def cosine_distance(a, b):
    return 1 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))


def test_per_layer_distances_from_init(tmp_path):
    model = small_mlp()
    x, _ = data()
    model(x[:1])
    initial = naive_layer_kernels(model, x[:12])
    tracker, history, csv_path, probe_x, _ = fit_with_tracker(
        model, tmp_path, epochs=3, every_n_epochs=2, per_layer=True)
    names = [layer.name for layer in model.layers]
    keys = [f"ntk_distance_from_init/{name}" for name in names]
    final = naive_layer_kernels(model, probe_x)
    logged = history.history
    for name, key in zip(names, keys):
        # Epochs 0 and 2 untracked (every 2 epochs: epoch index 1 only).
        assert math.isnan(logged[key][0]) and math.isnan(logged[key][2])
        assert logged[key][1] > 1e-6  # the kernels moved
    # The last tracked snapshot equals the distance of the naive kernels, checked
    # on a fresh snapshot at the end of training.
    values = tracker._snapshot(epoch=3, step=tracker._global_step() + 1)
    for name, key in zip(names, keys):
        expected = cosine_distance(initial[name], final[name])
        np.testing.assert_allclose(values[key], expected, rtol=1e-3, atol=1e-7)
    # The split sums to the whole kernel; Θ0_l saved for resuming.
    saved = load_ntk_history(str(tmp_path / "ntk"))["initial"]
    assert [str(n) for n in saved["layer_names"]] == names
    for name, kernel in zip(names, saved["layer_kernels"]):
        np.testing.assert_allclose(kernel, initial[name], rtol=1e-4,
                                   atol=1e-5 * np.abs(initial[name]).max())
    np.testing.assert_allclose(saved["layer_kernels"].sum(0), saved["kernel"], rtol=1e-6)
    with open(csv_path) as handle:
        header = next(csv.reader(handle))
    assert set(keys) <= set(header)


def test_per_layer_resume_needs_saved_layer_kernels(tmp_path):
    model = small_mlp()
    fit_with_tracker(model, tmp_path, epochs=1)
    with pytest.raises(ValueError, match="per-layer kernels.*Received: save_dir"):
        fit_with_tracker(small_mlp(), tmp_path, epochs=1, per_layer=True)


# ------------------------------------------- never aborts fit, never silently wrong


def dead_relu_mlp():
    """Every hidden ReLU is dead (pre-activations −1): Θ(x, x') = 1 from the output bias alone."""
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="relu", kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant(-1.0)),
        keras.layers.Dense(1),
    ])


def test_undefined_metric_logs_nan_and_warns_once_without_stopping_fit(tmp_path):
    model = dead_relu_mlp()
    with pytest.warns(RuntimeWarning, match="ntk_alignment.*undefined") as caught:
        tracker, history, _, _, _ = fit_with_tracker(model, tmp_path, epochs=3)
    assert sum("ntk_alignment" in str(w.message) for w in caught) == 1
    assert len(history.history["loss"]) == 3
    assert all(math.isnan(v) for v in history.history["ntk_alignment"])
    # The kernel is the all-ones matrix at every epoch (closed form): it never moves.
    for record in tracker.history:
        np.testing.assert_allclose(record["kernel"], np.ones((12, 12)), rtol=1e-6)
    assert history.history["ntk_distance_from_init"] == pytest.approx([0.0] * 3, abs=1e-6)
    assert history.history["ntk_trace"] == pytest.approx([12.0] * 3, rel=1e-6)


def test_diverged_model_logs_nan_and_fit_goes_on(tmp_path):
    model = small_mlp()

    class Diverge(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                kernel = self.model.layers[0].kernel
                kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    x, y = data()
    tracker = NTKTracker(x[:12], y[:12, 0])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(RuntimeWarning, match="not finite|non-finite"):
        history = model.fit(x, y, epochs=3, verbose=0, callbacks=[Diverge(), tracker])
    assert len(history.history["loss"]) == 3
    assert history.history["ntk_distance_from_init"][0] == pytest.approx(
        metrics.kernel_distance(tracker.initial_kernel, tracker.history[0]["kernel"]), rel=1e-6)
    for key in KEYS:
        assert math.isnan(history.history[key][1]) and math.isnan(history.history[key][2]), key


def test_construction_refuses_what_it_can_check():
    probe = np.zeros((4, 5), "float32")
    with pytest.raises(ValueError, match=r"Received: probe_labels.shape=\(3,\)"):
        NTKTracker(probe, np.ones(3))
    with pytest.raises(ValueError, match=r"Received: probe_inputs\[2, 1\]=nan"):
        bad = probe.copy()
        bad[2, 1] = np.nan
        NTKTracker(bad)
    with pytest.raises(ValueError, match=r"Received: probe_labels\[1\]=inf"):
        NTKTracker(probe, [1.0, np.inf, 1.0, 1.0])
    with pytest.raises(ValueError, match="Received: every_n_epochs=0, every_n_steps=None"):
        NTKTracker(probe, every_n_epochs=0)
    with pytest.raises(ValueError, match="Received: every_n_epochs=True"):
        NTKTracker(probe, every_n_epochs=True)
    with pytest.raises(ValueError, match=r"Received: ntk_kwargs with \['trace_axis', 'x2'\]"):
        NTKTracker(probe, ntk_kwargs={"trace_axis": (), "x2": probe})
    with pytest.raises(ValueError, match=r"Received: probe_inputs with leading sizes \[3, 4\]"):
        NTKTracker([probe, probe[:3]])


def test_corrupt_snapshots_are_named(tmp_path):
    fit_with_tracker(small_mlp(), tmp_path, epochs=2)
    save_dir = tmp_path / "ntk"
    snapshot = sorted(save_dir.glob("step_*.npz"))[-1]
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # a write killed halfway
    with pytest.raises(ValueError, match=f"Received: path='{snapshot}'"):
        load_ntk_history(str(save_dir))
    # Resuming from a truncated Θ0 names the file instead of failing in numpy.
    initial = save_dir / "initial.npz"
    initial.write_bytes(b"")
    model = small_mlp()
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    with pytest.raises(ValueError, match=f"truncated or corrupt.*Received: path='{initial}'"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[NTKTracker(x[:12], save_dir=str(save_dir))])


def test_summary_writer_is_closed_at_train_end(tmp_path):
    import os

    def open_event_files():
        fd_dir = "/proc/self/fd"
        targets = []
        for fd in os.listdir(fd_dir):
            try:
                targets.append(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                pass
        return [t for t in targets if str(tmp_path / "tb") in t]

    x, y = data()
    model = small_mlp()
    model.compile(optimizer="sgd", loss="mse")
    tracker = NTKTracker(x[:12], y[:12, 0], tensorboard_dir=str(tmp_path / "tb"))
    seen_during_fit = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen_during_fit.append(len(open_event_files()))

    model.fit(x, y, epochs=2, verbose=0, callbacks=[tracker, Probe()])
    assert seen_during_fit[-1] == 1  # the check sees an open writer
    assert open_event_files() == []
    # Everything written is readable: two snapshots of every scalar.
    events = tf.io.gfile.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    scalars = [v.tag for e in tf.compat.v1.train.summary_iterator(events[0])
               for v in e.summary.value if v.tag == "ntk_trace"]
    assert len(scalars) == 2
    # A second fit with the same tracker opens a new writer and closes it too.
    model.fit(x, y, epochs=1, verbose=0, callbacks=[tracker])
    assert open_event_files() == []
