"""End-to-end tests of the study binaries (experiments/linear_vs_nonlinear.py).

The binaries run in subprocesses (as users run them, conftest's run_binary);
conftest's two logical CPUs do not reach a subprocess, so the
MirroredStrategy test passes the binary's hidden --num_cpu_devices=2.
"""

import json
import os

import gin
import numpy as np
import pytest
import tensorflow as tf

from experiments import configurables, data, launcher, linear_vs_nonlinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "linear_vs_nonlinear/smoke.gin"
FIGURES = ("accuracy_vs_k.png", "alignment.png", "projection.png", "energy.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def study_a(run_binary, data_dir):
    """The study A binary on the smoke config, in a subprocess (conftest's run_binary)."""
    def run(output_dir, *args, check=True):
        return run_binary("linear_vs_nonlinear", output_dir, f"--data_dir={data_dir}", *args,
                          check=check)

    return run


CELLS = ["mlp-eigenfunction-k2-seed0", "mlp-binary-seed0"]
TWO_EPOCHS = "--gin_bindings=linear_vs_nonlinear.run.epochs=2"


def _check_contract(results, expected_cells):
    assert results["study"] == "linear_vs_nonlinear" and results["dataset"] == "digits"
    assert sorted(r["cell"] for r in results["runs"]) == sorted(expected_cells)
    for run in results["runs"]:
        assert run["model"] == "mlp" and run["task"] in ("eigenfunction", "binary")
        assert (run["k"] is None) == (run["task"] == "binary")
        assert type(run["seed"]) is int
        assert set(run["test_accuracy"]) >= {"network", "linearized_init", "linearized_final"}
        assert set(run["alignment"]) >= {"init", "final"}
        for value in (*run["test_accuracy"].values(), *run["alignment"].values(),
                      run["weight_distance"], run["kernel_distance"]):
            assert type(value) is float and np.isfinite(value)
        assert all(0 <= a <= 1 for a in run["test_accuracy"].values())
        np.testing.assert_allclose(run["weight_distance_squared"], run["weight_distance"] ** 2)
        assert run["variant"]["linearized_final"] == "difference_bn_init_statistics"


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, study_a):
    """The smoke config run three times: 1 cell, killed mid-fit, completed."""
    output = tmp_path_factory.mktemp("smoke") / "run"
    first = study_a(output, TWO_EPOCHS,
                       "--gin_bindings=linear_vs_nonlinear.run.max_new_cells=1")
    first_results = json.loads((output / "results.json").read_text())
    killed = study_a(output, TWO_EPOCHS, "--simulate_crash_after_epochs=1",
                        check=False)
    backup_exists = (output / "cells" / CELLS[1] / "backup_network").exists()
    resumed = study_a(output, TWO_EPOCHS)
    return dict(output=output, first=first, first_results=first_results, killed=killed,
                backup_exists=backup_exists, resumed=resumed)


def test_resume_after_a_kill(interrupted_run):
    assert [r["cell"] for r in interrupted_run["first_results"]["runs"]] == CELLS[:1]
    # Killed (os._exit) after the first of two epochs of the next cell's first fit.
    assert interrupted_run["killed"].returncode == 3
    assert interrupted_run["backup_exists"]
    log = interrupted_run["resumed"].stderr
    assert f"cell 1 of 2 ({CELLS[0]}): already finished, skipped" in log
    assert f"{CELLS[0]}: training the network" not in log  # Not retrained.
    assert "Resuming the fit from its backup" in log
    results = json.loads((interrupted_run["output"] / "results.json").read_text())
    _check_contract(results, CELLS)
    assert results["runs"][0] == interrupted_run["first_results"]["runs"][0]
    assert not (interrupted_run["output"] / "cells" / CELLS[1]).exists()


def _flat_numbers(value):
    if isinstance(value, dict):
        return [v for key in sorted(value) for v in _flat_numbers(value[key])]
    if isinstance(value, list):
        return [v for item in value for v in _flat_numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow  # A fourth smoke run: about a minute on the shared machine.
def test_a_run_killed_mid_fit_equals_an_uninterrupted_one(interrupted_run, study_a, tmp_path):
    """Killed inside the network's fit (after 1 of 2 epochs), resumed: the same numbers."""
    output = tmp_path / "uninterrupted"
    study_a(output, TWO_EPOCHS)
    uninterrupted = json.loads((output / "results.json").read_text())
    resumed = json.loads((interrupted_run["output"] / "results.json").read_text())
    assert [r["cell"] for r in resumed["runs"]] == [r["cell"] for r in uninterrupted["runs"]]
    for got, want in zip(resumed["runs"], uninterrupted["runs"]):
        # What training produced is bit-identical ...
        for key in ("test_accuracy", "train_accuracy", "weight_distance", "kernel_distance",
                    "alignment", "weight_distance_linearized_init"):
            assert got[key] == want[key], (got["cell"], key)
        # ... and quantities of the probe eigenvectors (LAPACK eigh in another process:
        # threaded sums, last-bit differences, resume or not) agree to rounding.
        assert _flat_numbers(got) == pytest.approx(_flat_numbers(want), rel=1e-12, abs=1e-15)
    # The killed cell's fit ran epoch 2 only after the resume (not from epoch 1 again).
    assert "after epoch 1" in interrupted_run["resumed"].stderr


LEARNING_RATE_0_1 = "--gin_bindings=linear_vs_nonlinear.run.learning_rate=0.1"


def test_a_rerun_with_a_changed_setting_is_refused_naming_it(interrupted_run, study_a):
    output = interrupted_run["output"]
    before = (output / "cells" / f"{CELLS[0]}.json").read_text()
    refused = study_a(output, TWO_EPOCHS, LEARNING_RATE_0_1, check=False)
    assert refused.returncode != 0
    assert "learning_rate: 0.05 (stored) → 0.1 (now)" in refused.stderr
    assert "--overwrite" in refused.stderr
    # A model width is named by its place in the model's config (θ0 is refused first).
    refused = study_a(output, TWO_EPOCHS, "--gin_bindings=models.mlp.widths=(16,)", check=False)
    assert refused.returncode != 0
    assert "architecture.layers[2].config.units: 32 (stored) → 16 (now)" in refused.stderr
    assert (output / "cells" / f"{CELLS[0]}.json").read_text() == before
    assert "learning_rate" not in refused.stderr


@pytest.mark.slow  # Trains a cell again: ~30 s on the shared machine.
def test_overwrite_recomputes_the_cells_of_other_settings(interrupted_run, study_a, tmp_path):
    import shutil

    output = tmp_path / "copy"
    shutil.copytree(interrupted_run["output"], output)
    result = study_a(output, TWO_EPOCHS, LEARNING_RATE_0_1, "--overwrite",
                     "--gin_bindings=linear_vs_nonlinear.run.max_new_cells=1")
    assert f"Discarding cell {CELLS[0]}" in result.stderr
    assert f"{CELLS[0]}: training the network" in result.stderr
    stored = json.loads((output / "cells" / f"{CELLS[0]}.json").read_text())
    assert stored["settings"]["learning_rate"] == 0.1 and stored["settings"]["epochs"] == 2
    # The other stale cell was discarded when reached; results.json holds only current cells.
    assert not (output / "cells" / f"{CELLS[1]}.json").exists()
    results = json.loads((output / "results.json").read_text())
    assert [r["cell"] for r in results["runs"]] == CELLS[:1]
    assert results["recipe"]["learning_rate"] == 0.1
    # θ0 (its settings do not include the rate) was kept: the same file.
    assert ((output / "cells" / "init-mlp" / "mlp.weights.h5").read_bytes()
            == (interrupted_run["output"] / "cells" / "init-mlp" / "mlp.weights.h5").read_bytes())


def test_smoke_config_outputs_and_numbers(interrupted_run, data_dir):
    output = interrupted_run["output"]
    results = json.loads((output / "results.json").read_text())
    _check_contract(results, CELLS)
    for name in FIGURES:
        assert (output / "figures" / name).stat().st_size > 1000
    assert "run.epochs = 2" in (output / "config.gin").read_text()
    assert "--gin_file=linear_vs_nonlinear/smoke.gin" in (output / "command.txt").read_text()
    assert "| mlp | k=2 |" in (output / "report.md").read_text()
    assert os.listdir(output / "tensorboard")

    # Independent reference for the eigenfunction task: the eNTK at the saved
    # θ0 from the naive float64 Jacobian, on the same train+test inputs.
    dataset = data.load_dataset("digits", num_train=256, num_test=128, data_dir=data_dir)
    model = configurables.models.mlp((8, 8, 1), 1, widths=(32,))
    model.load_weights(str(output / "cells" / "init-mlp" / "mlp.weights.h5"))
    inputs = np.concatenate([dataset.train.x, dataset.test.x]).astype(np.float64)
    weights64 = [tf.Variable(tf.cast(w, tf.float64)) for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        h = tf.reshape(inputs, (len(inputs), -1))
        h = tf.nn.relu(h @ weights64[0] + weights64[1])
        logits = (h @ weights64[2] + weights64[3])[:, 0]
    jacobians = tape.jacobian(logits, weights64)
    flat = np.concatenate([j.numpy().reshape(len(inputs), -1) for j in jacobians], axis=1)
    kernel = flat @ flat.T
    values, vectors = np.linalg.eigh(kernel)
    values, vectors = values[::-1], vectors[:, ::-1]
    saved = np.load(output / "cells" / "init-mlp" / "mlp_eigen.npz")
    np.testing.assert_allclose(saved["eigenvalues"][:10], values[:10], rtol=1e-3)
    (eigen_run,) = [r for r in results["runs"] if r["task"] == "eigenfunction"]
    labels = (vectors[:, 1] >= 0).astype(float)  # k = 2.
    # The sign of an eigenvector is arbitrary: the base rate up to 1 − p.
    base_rate = labels[256:].mean()
    assert min(abs(eigen_run["base_rate"]["test"] - base_rate),
               abs(eigen_run["base_rate"]["test"] - (1 - base_rate))) < 1e-9
    # Kernel-target alignment at θ0 on the 64 probe inputs with ±1 labels.
    probe = kernel[:64, :64]
    y = 2 * data.binary_labels(dataset.train.y[:64]) - 1
    binary = next(r for r in results["runs"] if r["task"] == "binary")
    np.testing.assert_allclose(binary["alignment"]["init"],
                               y @ probe @ y / (np.linalg.norm(probe) * (y @ y)), rtol=1e-3)
    # ‖θT − θ0‖ is recorded; on this task θ moved.
    assert binary["weight_distance"] > 0 and binary["relative_weight_distance"] > 0


def test_bad_gin_binding_fails_before_training(tmp_path, study_a):
    output = tmp_path / "run"
    result = study_a(output,
                        "--gin_bindings=linear_vs_nonlinear.run.no_such_argument=1", check=False)
    assert result.returncode != 0
    assert "Bad gin config or binding" in result.stderr and "no_such_argument" in result.stderr
    assert not (output / "results.json").exists()


@pytest.mark.parametrize("binding, message", [
    ("dataset = 'imagenet'", "Known datasets: cifar10, digits, mnist"),
    ("models = ['vgg']", "Known models: " + ", ".join(sorted(configurables.MODELS))),
    ("tasks = ['regression']", "Known tasks: eigenfunction, binary"),
])
def test_unknown_names_are_listed_before_any_work(tmp_path, binding, message):
    run = launcher.configurable("linear_vs_nonlinear", linear_vs_nonlinear.run)
    with gin.unlock_config():
        gin.parse_config(f"linear_vs_nonlinear.run.{binding}")
    try:
        with pytest.raises(ValueError, match=message):
            run(
                output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                model_builders=configurables.MODELS,
            )
    finally:
        gin.clear_config()
    assert not os.listdir(tmp_path)


def test_mirrored_strategy_on_two_logical_cpus(tmp_path, study_a):
    output = tmp_path / "run"
    result = study_a(output, "--strategy=mirrored", "--num_cpu_devices=2",
                        "--gin_bindings=linear_vs_nonlinear.run.tasks=['binary']")
    # conftest's two logical CPUs do not reach the subprocess: the flag does it.
    assert "MirroredStrategy with 2 replica(s)" in result.stderr
    results = json.loads((output / "results.json").read_text())
    _check_contract(results, ["mlp-binary-seed0"])


@pytest.mark.slow  # About a minute on the shared 2-core machine.
def test_cifar10_lenet_config_one_step_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    run = launcher.configurable("linear_vs_nonlinear", linear_vs_nonlinear.run)
    gin.add_config_file_search_path(os.path.join(ROOT, "gin_configs"))
    gin.parse_config_files_and_bindings(
        [os.path.join(ROOT, "gin_configs", "linear_vs_nonlinear", "cifar10_lenet.gin")],
        ["linear_vs_nonlinear.run.tasks = ['binary']",
         "linear_vs_nonlinear.run.seeds = [0]",
         "linear_vs_nonlinear.run.num_train = 16",
         "linear_vs_nonlinear.run.num_test = 8",
         "linear_vs_nonlinear.run.batch_size = 16",
         "linear_vs_nonlinear.run.epochs = 1",
         "linear_vs_nonlinear.run.num_probe = 8",
         "linear_vs_nonlinear.run.num_projection = 4",
         "linear_vs_nonlinear.run.jit_compile = False",
         "linear_vs_nonlinear.run.verbose = 0",
         "linear_vs_nonlinear.run.write_report = False"],
    )
    try:
        with tfds.testing.mock_data(num_examples=24):
            results = run(
                output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                model_builders=configurables.MODELS,
            )
    finally:
        gin.clear_config()
    assert results["dataset"] == "cifar10" and results["num_train"] == 16
    (run,) = results["runs"]
    assert run["model"] == "lenet" and run["task"] == "binary"
    assert run["weight_distance"] > 0  # One SGD step moved the weights.
    assert linear_vs_nonlinear.TASKS == ("eigenfunction", "binary")


def test_lanczos_eigenfunction_tasks_match_the_dense_eigendecomposition(tmp_path, data_dir):
    """eigen_solver='lanczos' (matrix-free, for CIFAR-scale N) gives the dense top eigenpairs."""
    import keras

    dataset = data.load_dataset("digits", num_train=200, num_test=56, data_dir=data_dir)

    def builder(input_shape, outputs):
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(32, activation="relu"),
                                 keras.layers.Dense(outputs)])

    states = {}
    for solver in ("dense", "lanczos"):
        study = linear_vs_nonlinear._Study(
            str(tmp_path / solver), tf.distribute.get_strategy(), {"mlp": builder}, dataset,
            {}, num_probe=32, num_projection=4, ntk_batch_size=None,
            ntk_implementation="auto", eigen_solver=solver)
        _, states[solver] = linear_vs_nonlinear._initial_state(
            study, "mlp", init_seed=0, need_eigen=True, num_eigenvectors=6)
    dense, lanczos = states["dense"], states["lanczos"]
    assert str(lanczos["eigen_solver"]) == "lanczos" and lanczos["eigenvectors"].shape == (256, 6)
    np.testing.assert_allclose(lanczos["eigenvalues"], dense["eigenvalues"][:6], rtol=1e-4)
    # Same eigenvectors up to sign, hence the same eigenfunction labels up to a flip.
    overlaps = np.abs(np.sum(lanczos["eigenvectors"] * dense["eigenvectors"][:, :6], axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="Received: eigen_solver='qr'"):
        linear_vs_nonlinear._validate("digits", ["mlp"], ["binary"], [], {"mlp": builder},
                                      "difference", "qr")
