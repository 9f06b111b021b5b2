"""End-to-end tests of the study binaries (experiments/linear_vs_nonlinear.py).

The binaries run in subprocesses (as users run them, conftest's run_binary);
conftest's two logical CPUs do not reach a subprocess, so the
MirroredStrategy test passes the binary's hidden --num_cpu_devices=2.
"""

import json
import os

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from experiments import configurables, data, launcher, linear_vs_nonlinear, report
from study_outputs import configured_run, make_stale

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
        assert set(run["test_accuracy"]) == set(linear_vs_nonlinear.MODELS)
        labels = report.unpack_bits(run["test_labels"], run["num_test"])
        for name, accuracy in run["test_accuracy"].items():
            predictions = report.unpack_bits(run["test_predictions"][name], run["num_test"])
            assert accuracy == np.mean(predictions == labels)
        assert set(run["alignment"]) >= {"init", "final"}
        for value in (*run["test_accuracy"].values(), *run["alignment"].values(),
                      run["weight_distance"], run["kernel_distance"]):
            assert type(value) is float and np.isfinite(value)
        assert all(0 <= a <= 1 for a in run["test_accuracy"].values())
        np.testing.assert_allclose(run["weight_distance_squared"], run["weight_distance"] ** 2)
        assert run["variant"] == {"linearized_init": "full",
                                  "linearized_init_difference": "difference",
                                  "linearized_final": "difference_bn_init_statistics"}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, study_a):
    """The smoke config run three times: 1 cell, killed mid-fit, completed.

    Before the third run the eigenvector file is truncated, as a kill during its
    write by older code left it: it must be discarded and computed again.
    """
    output = tmp_path_factory.mktemp("smoke") / "run"
    first = study_a(output, TWO_EPOCHS,
                    "--gin_bindings=linear_vs_nonlinear.run.max_new_cells=1")
    first_results = json.loads((output / "results.json").read_text())
    killed = study_a(output, TWO_EPOCHS, "--simulate_crash_after_epochs=1",
                     check=False)
    backup_exists = (output / "cells" / CELLS[1] / "backup_network").exists()
    eigen = output / "cells" / "init-mlp" / "mlp_eigen.npz"
    eigen.write_bytes(eigen.read_bytes()[: eigen.stat().st_size // 2])
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
    assert "Discarding" in log and "mlp_eigen.npz: unreadable" in log
    results = json.loads((interrupted_run["output"] / "results.json").read_text())
    _check_contract(results, CELLS)
    assert results["runs"][0] == interrupted_run["first_results"]["runs"][0]
    assert not (interrupted_run["output"] / "cells" / CELLS[1]).exists()
    # No temporary file is left by the killed write or any other.
    assert not [p for p in interrupted_run["output"].rglob("*") if ".tmp-" in p.name]


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
    # a_j at θ0 is v_jᵀ Θ0 v_j in the eigenbasis of Θ0 over train+test (the
    # tasks' basis): the eigenvalues of the naive kernel, not of a probe kernel.
    np.testing.assert_allclose(eigen_run["projection"]["init"], values[:16], rtol=1e-3)

    labels = (vectors[:, 1] >= 0).astype(float)  # k = 2.
    # The label energy of the k = 2 task on v_j over train+test: (v_jᵀ y)²/‖y‖², y = ±1
    # (invariant to the sign of v_2).
    y_task = 2 * labels - 1
    np.testing.assert_allclose(eigen_run["label_energy"][:3],
                               (vectors[:, :3].T @ y_task) ** 2 / len(y_task), atol=2e-3)
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
    ("epochs = 0", r"linear_vs_nonlinear.run.epochs to be an int >= 1. Received: epochs=0"),
    ("num_train = -5", r"run.num_train to be None or an int >= 1. Received: num_train=-5"),
    ("momentum = 1.0", r"run.momentum to be a number in \[0, 1\). Received: momentum=1.0"),
    ("seeds = []", r"run.seeds to be a non-empty list of distinct ints. Received: seeds=\[\]"),
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


@pytest.mark.parametrize("binding, message", [
    ("num_train = 5000", r"run.num_train <= 1437 \(the digits train split\)"),
    ("num_test = 361", r"run.num_test <= 360 \(the digits test split\)"),
    ("num_probe = 2000", r"run.num_probe <= 1437 training examples. Received: num_probe=2000"),
])
def test_sizes_larger_than_the_dataset_are_refused_before_training(tmp_path, data_dir, binding,
                                                                    message):
    run = launcher.configurable("linear_vs_nonlinear", linear_vs_nonlinear.run)
    with gin.unlock_config():
        gin.parse_config(f"linear_vs_nonlinear.run.{binding}")
    try:
        with pytest.raises(ValueError, match=message):
            run(output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                model_builders=configurables.MODELS, data_dir=data_dir)
    finally:
        gin.clear_config()
    assert not (tmp_path / "results.json").exists()


def test_mirrored_strategy_on_two_logical_cpus(tmp_path, study_a):
    output = tmp_path / "run"
    result = study_a(output, "--strategy=mirrored", "--num_cpu_devices=2",
                        "--gin_bindings=linear_vs_nonlinear.run.tasks=['binary']")
    # conftest's two logical CPUs do not reach the subprocess: the flag does it.
    assert "MirroredStrategy with 2 replica(s)" in result.stderr
    results = json.loads((output / "results.json").read_text())
    _check_contract(results, ["mlp-binary-seed0"])


def _resnet18_parameters(width, blocks=(2, 2, 2, 2), channels=3):
    """Trainable weights of the reference ResNet-18 (Flax ResNet V1), counted by hand."""
    count = 9 * channels * width + 2 * width  # Stem conv (no bias) + BN γ, β.
    previous = width
    for stage, size in enumerate(blocks):
        filters = width * 2**stage
        for block in range(size):
            count += 9 * previous * filters + 2 * filters  # conv1 + bn1
            count += 9 * filters * filters + 2 * filters  # conv2 + bn2
            if previous != filters:
                count += previous * filters + 2 * filters  # 1×1 projection + BN
            previous = filters
    return count + previous + 1  # Dense head to one logit.


# Trainable weights of the reference models, by hand: MLP 3072-100-100-1;
# LeNet 5×5 'same' + 2×2 pooling (32→16→8): 8·8·16 = 1024 features.
CIFAR10_CONFIGS = {
    "cifar10_mlp.gin": ("mlp", 3072 * 100 + 100 + 100 * 100 + 100 + 100 + 1),
    "cifar10_lenet.gin": ("lenet", 5 * 5 * 3 * 6 + 6 + 5 * 5 * 6 * 16 + 16
                          + 1024 * 120 + 120 + 120 * 84 + 84 + 84 + 1),
    "cifar10_resnet18.gin": ("resnet18", _resnet18_parameters(64)),
}


@pytest.mark.slow  # 0.5 to 3 minutes each on the shared 2-core machine.
@pytest.mark.parametrize("config", sorted(CIFAR10_CONFIGS))
def test_cifar10_configs_build_and_take_one_step_on_mock_data(tmp_path, config):
    """Each CIFAR-10 config: the reference's model, one SGD step of every fit (no Lanczos)."""
    import keras
    import tensorflow_datasets as tfds

    model_name, parameters = CIFAR10_CONFIGS[config]
    run = launcher.configurable("linear_vs_nonlinear", linear_vs_nonlinear.run)
    gin.add_config_file_search_path(os.path.join(ROOT, "gin_configs"))
    gin.parse_config_files_and_bindings(
        [os.path.join(ROOT, "gin_configs", "linear_vs_nonlinear", config)],
        ["linear_vs_nonlinear.run.ks = [2]",
         "linear_vs_nonlinear.run.seeds = [0]",
         "linear_vs_nonlinear.run.num_train = 16",
         "linear_vs_nonlinear.run.num_test = 8",
         "linear_vs_nonlinear.run.batch_size = 16",  # 16 examples: exactly one step.
         "linear_vs_nonlinear.run.epochs = 1",
         "linear_vs_nonlinear.run.num_probe = 8",
         "linear_vs_nonlinear.run.num_projection = 4",
         "linear_vs_nonlinear.run.eigen_solver = 'dense'",
         # The configs' eNTK blocks (20 for ResNet-18) exceed this CPU's default budget.
         "linear_vs_nonlinear.run.ntk_batch_size = 4",
         "linear_vs_nonlinear.run.jit_compile = False",
         "linear_vs_nonlinear.run.verbose = 0",
         "linear_vs_nonlinear.run.tensorboard = False",
         "linear_vs_nonlinear.run.fit_backups = False",
         "linear_vs_nonlinear.run.write_report = False"],
    )
    try:
        with tfds.testing.mock_data(num_examples=24):
            results = run(
                output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                model_builders=configurables.MODELS,
            )
            model = configurables.MODELS[model_name]((32, 32, 3), 1)
    finally:
        gin.clear_config()
    assert results["dataset"] == "cifar10" and results["num_train"] == 16
    assert results["recipe"]["drop_remainder"] is True
    assert int(sum(np.prod(w.shape) for w in model.trainable_weights)) == parameters
    assert [r["task"] for r in results["runs"]] == ["eigenfunction", "binary"]
    for run in results["runs"]:
        assert run["model"] == model_name and run["variant"]["linearized_init"] == "full"
        assert run["weight_distance"] > 0  # One SGD step moved the weights.
    if model_name == "resnet18":
        # γ = 0 on each branch's last BatchNorm; momentum 0.9, ε 1e-5; GeLU (tanh form).
        norms = [layer for layer in model.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
        assert all(n.momentum == 0.9 and n.epsilon == 1e-5 for n in norms)
        assert all(np.all(n.gamma.numpy() == 0) == n.name.endswith("_bn2") for n in norms)
    if model_name == "lenet":
        assert [type(layer).__name__ for layer in model.layers if "pool" in layer.name] == [
            "AveragePooling2D", "AveragePooling2D"]


def test_lenet_reference_options_against_numpy():
    """5×5 'same' convolutions and 2×2 average pooling (the reference LeNet), by numpy."""
    model = configurables.models.lenet((32, 32, 3), 1, kernel_size=5, padding="same",
                                       pooling="average")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    conv = model.get_layer("conv_0")
    kernel, bias = conv.kernel.numpy().astype(np.float64), conv.bias.numpy()
    padded = np.pad(x.astype(np.float64), ((0, 0), (2, 2), (2, 2), (0, 0)))
    patches = np.stack([padded[:, i:i + 32, j:j + 32] for i in range(5) for j in range(5)],
                       axis=3)  # (2, 32, 32, 25, 3)
    activation = np.maximum(np.einsum("nhwpc,pcf->nhwf", patches,
                                      kernel.reshape(25, 3, 6)) + bias, 0)
    pooled = activation.reshape(2, 16, 2, 16, 2, 6).mean(axis=(2, 4))
    probe = keras.Model(model.layers[0].input, model.get_layer("pool_0").output)
    np.testing.assert_allclose(probe(x).numpy(), pooled, rtol=1e-4, atol=1e-5)
    assert model.get_layer("dense_0").kernel.shape == (1024, 120)
    # The defaults are unchanged: 5×5 'valid' and max pooling on 32×32.
    default = configurables.models.lenet((32, 32, 3), 1)
    assert default.get_layer("dense_0").kernel.shape == (5 * 5 * 16, 120)
    assert type(default.get_layer("pool_0")).__name__ == "MaxPooling2D"
    with pytest.raises(ValueError, match="Received: pooling='mean'"):
        configurables.models.lenet((32, 32, 3), 1, pooling="mean")


def test_resnet18_reference_options():
    """γ = 0 on each branch's last BN makes every block start as its shortcut; tanh GeLU."""
    model = configurables.models.resnet18((8, 8, 3), 1, width=4, activation="gelu",
                                          zero_init_last_bn=True, bn_momentum=0.9,
                                          bn_epsilon=1e-5)
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
    stem = keras.Model(model.input, model.get_layer("stem_bn").output)(x).numpy()

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    # Block 0 of stage 0 (no projection): the branch is 0, the block gives gelu(gelu(stem)).
    branch = keras.Model(model.input, model.get_layer("stage0_block0_bn2").output)(x).numpy()
    np.testing.assert_allclose(branch, 0.0, atol=1e-6)
    add = next(layer for layer in model.layers if isinstance(layer, keras.layers.Add))
    output = keras.Model(model.input, model.layers[model.layers.index(add) + 1].output)(x)
    np.testing.assert_allclose(output.numpy(), gelu_tanh(gelu_tanh(stem.astype(np.float64))),
                               rtol=1e-4, atol=1e-5)
    # Keras' defaults stay the defaults.
    default = configurables.models.resnet18((8, 8, 3), 1, width=4)
    norm = default.get_layer("stage0_block0_bn2")
    assert (norm.momentum, norm.epsilon) == (0.99, 1e-3) and np.all(norm.gamma.numpy() == 1)


def test_lanczos_eigenfunction_tasks_match_the_dense_eigendecomposition(tmp_path, data_dir):
    """eigen_solver='lanczos' (matrix-free, for CIFAR-scale N) gives the dense top eigenpairs."""

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
            study, "mlp", init_seed=0, num_eigenvectors=6)
    dense, lanczos = states["dense"], states["lanczos"]
    assert str(lanczos["eigen_solver"]) == "lanczos" and lanczos["eigenvectors"].shape == (256, 6)
    np.testing.assert_allclose(lanczos["eigenvalues"], dense["eigenvalues"][:6], rtol=1e-4)
    # Same eigenvectors up to sign, hence the same eigenfunction labels up to a flip.
    overlaps = np.abs(np.sum(lanczos["eigenvectors"] * dense["eigenvectors"][:, :6], axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="Received: eigen_solver='qr'"):
        linear_vs_nonlinear.run(output_dir=str(tmp_path / "refused"), strategy=None,
                                model_builders={"mlp": builder}, tasks=["binary"], ks=[],
                                linearized_init_mode="difference", eigen_solver="qr")


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_a_j_is_taken_in_the_eigenbasis_of_the_tasks(tmp_path, data_dir, solver):
    """a_j = v_jᵀ ΘT v_j over train+test, v_j the saved eigenvectors the tasks come from."""

    dataset = data.load_dataset("digits", num_train=120, num_test=40, data_dir=data_dir)

    def builder(input_shape, outputs):
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(16, activation="tanh"),
                                 keras.layers.Dense(outputs)])

    study = linear_vs_nonlinear._Study(
        str(tmp_path), tf.distribute.get_strategy(), {"mlp": builder}, dataset, {},
        num_probe=32, num_projection=5, ntk_batch_size=None, ntk_implementation="auto",
        eigen_solver=solver)
    weights_path, state = linear_vs_nonlinear._initial_state(study, "mlp", init_seed=0,
                                                             num_eigenvectors=5)
    # The task labels are the signs of these same columns.
    train_y, test_y = linear_vs_nonlinear._task_labels(study, "eigenfunction", 3, state)
    np.testing.assert_array_equal(np.concatenate([train_y, test_y]),
                                  state["eigenvectors"][:, 2] >= 0)
    # "Trained" weights: θ0 moved by a fixed perturbation.
    model = study.build("mlp", weights_path)
    rng = np.random.default_rng(0)
    for w in model.trainable_weights:
        w.assign(w.numpy() + 0.3 * rng.normal(size=w.shape).astype(np.float32))
    vectors = state["eigenvectors"]
    a = study.kernels.eigenbasis_projection(model, study.inputs, vectors)
    # Naive float64 reference: per-example Jacobians over the same 160 inputs.
    inputs = np.concatenate([dataset.train.x, dataset.test.x]).reshape(160, -1)
    weights64 = [tf.Variable(tf.cast(w, tf.float64)) for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        h = tf.tanh(inputs.astype(np.float64) @ weights64[0] + weights64[1])
        logits = (h @ weights64[2] + weights64[3])[:, 0]
    flat = np.concatenate([j.numpy().reshape(160, -1)
                           for j in tape.jacobian(logits, weights64)], axis=1)
    kernel = flat @ flat.T
    np.testing.assert_allclose(a, np.einsum("nj,nm,mj->j", vectors, kernel, vectors), rtol=1e-3)
    # At θ0 the same projection gives back the eigenvalues (j = k is v_k itself).
    initial = study.build("mlp", weights_path)
    np.testing.assert_allclose(study.kernels.eigenbasis_projection(initial, study.inputs, vectors),
                               state["eigenvalues"][:5], rtol=1e-3)


def test_a_stale_cell_after_an_unfinished_one_is_refused_before_any_work(
        interrupted_run, data_dir, tmp_path, monkeypatch):
    """Every stored cell is checked before the first fit, not when the loop reaches it."""
    import shutil

    from experiments import train

    output = tmp_path / "stale"
    shutil.copytree(interrupted_run["output"], output)
    make_stale(output / "cells", CELLS[0], CELLS[1], "learning_rate", 0.1)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before every cell was checked")

    monkeypatch.setattr(train, "fit", no_work)
    monkeypatch.setattr(linear_vs_nonlinear, "_initial_state", no_work)
    with configured_run("linear_vs_nonlinear", linear_vs_nonlinear.run, SMOKE,
                        ["linear_vs_nonlinear.run.epochs = 2"]) as run:
        with pytest.raises(ValueError, match=rf"Cell '{CELLS[1]}'.*learning_rate: 0.1 "
                                             r"\(stored\) → 0.05 \(now\)"):
            run(output_dir=str(output), strategy=tf.distribute.get_strategy(),
                model_builders=configurables.MODELS, data_dir=data_dir)
