"""Tests of experiments/data_scaling.py (study B, data scaling).

References: exponents of synthetic power laws with known α, `numpy.linalg.solve`
for kernel ridge regression, kernels recomputed with `keras_ntk.empirical_ntk` on
the subset (not sliced), the closed-form arc-cosine NTK of a one-hidden-layer
ReLU network.
"""

import functools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from experiments import data_scaling, kernel_methods, models, network_fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_geometric_sizes():
    assert data_scaling.geometric_sizes(50, 987, 6) == [50, 91, 165, 299, 544, 987]
    assert data_scaling.geometric_sizes(10, 10, 3) == [10]
    with pytest.raises(ValueError, match="Received: smallest=0"):
        data_scaling.geometric_sizes(0, 10, 3)


def _relu_ntk_one_hidden_layer(x1, x2):
    """Closed-form NTK of NTKDense(∞, σw²=1) → ReLU → NTKDense(σw²=1), no biases."""
    d = x1.shape[1]
    k = x1 @ x2.T / d
    n1, n2 = np.sum(x1 * x1, 1) / d, np.sum(x2 * x2, 1) / d
    norms = np.sqrt(np.outer(n1, n2))
    theta = np.arccos(np.clip(k / norms, -1, 1))
    nngp = norms * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    derivative = (np.pi - theta) / (2 * np.pi)
    return nngp + k * derivative


def test_ntk_parameterized_twin_has_the_closed_form_kernel():
    model = models.mlp((4, 4, 1), 10, widths=(32,))
    twin = models.ntk_parameterized(model, sigma_w2=1.0, sigma_b2=0.0)
    assert [type(layer).__name__ for layer in twin.layers] == [
        "Flatten", "NTKDense", "ReLU", "NTKDense"]
    x = np.random.RandomState(0).normal(size=(7, 4, 4, 1))
    kernel = keras_ntk.infinite_kernels(twin, x).ntk
    flat = x.reshape(7, -1)
    np.testing.assert_allclose(kernel, _relu_ntk_one_hidden_layer(flat, flat), rtol=1e-6)
    with pytest.raises(ValueError, match="MaxPooling2D"):
        models.ntk_parameterized(models.lenet((8, 8, 1), 10))


def test_run_resumes_without_recomputing_finished_cells(tmp_path, monkeypatch):
    calls = {"train": 0, "kernel": 0}
    train_network, kernel_errors = network_fit.train_network, kernel_methods.kernel_method_errors

    def counted_train(*args, **kwargs):
        calls["train"] += 1
        return train_network(*args, **kwargs)

    def counted_kernel(*args, **kwargs):
        calls["kernel"] += 1
        return kernel_errors(*args, **kwargs)

    monkeypatch.setattr(network_fit, "train_network", counted_train)
    monkeypatch.setattr(kernel_methods, "kernel_method_errors", counted_kernel)
    run = functools.partial(
        data_scaling.run, output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
        model_builders={"mlp": functools.partial(models.mlp, widths=(16,))},
        methods=["network", "entk_init", "after_kernel"], n0s=[20], sizes=[10, 30],
        seeds=[0, 1], num_train=200, num_test=60, num_validation=30, train_steps=20,
        num_bootstrap=20, write_figures=False, network_loss="cross_entropy")
    partial = run(max_new_cells=3)
    assert not partial["finished"] and len(partial["cells"]) == 3
    assert calls == {"train": 3, "kernel": 0}
    first_cells = dict(partial["cells"])
    full = run()
    assert full["finished"] and len(full["cells"]) == 8
    # 1 more network cell + 2 after-kernel pre-trainings; 4 kernel cells.
    assert calls == {"train": 6, "kernel": 4}
    assert full["methods"]["network"]["loss_name"] == "cross_entropy"
    # After-kernels pre-trained on n0 = 20 examples: no value, and no fit point, at n = 10.
    after = full["methods"]["after_kernel_n0=20"]
    assert after["test_error"][0] == [None, None] and None not in after["test_error"][1]
    assert after["fit_window"][0] == 20 and min(after["fit_sizes_error"] or [20]) >= 20
    assert full["methods"]["entk_init"]["with_f0"] and not after["with_f0"]
    # Cross-entropy network: its loss exponent is never compared with the kernels' MSE.
    assert all("alpha_loss" not in c for c in full["exponent_differences"].values())
    assert full["methods"]["network"]["cap_hits"] == 4  # 20 steps never reach 1e-3
    assert full["methods"]["entk_init"]["loss_name"] == "mse"
    assert all(full["cells"][key] == value for key, value in first_cells.items())
    again = run()
    assert calls == {"train": 6, "kernel": 4}
    assert again["methods"] == full["methods"]
    # Another grid: the kernel cells (all n from one kernel) are refused, naming it,
    # before any work (no network is trained for the new n = 20).
    with pytest.raises(ValueError, match=r"sizes: \[10, 30\] \(stored\) → \[10, 20\] \(now\)"):
        run(sizes=[10, 20])
    assert calls == {"train": 6, "kernel": 4}
    # With overwrite they are recomputed; the network cells of n = 10 are kept.
    regridded = run(sizes=[10, 20], overwrite=True)
    assert calls == {"train": 6 + 2 + 2, "kernel": 4 + 4}  # 2 new n=20 fits, 2 after-kernels.
    assert regridded["cells"]["network-seed0-n10"] == full["cells"]["network-seed0-n10"]


def test_kernel_only_run_trains_no_network_and_keeps_kernel_cells_of_unchanged_seeds(
        tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(network_fit, "train_network", lambda *a, **k: trained.append(1))
    run = functools.partial(
        data_scaling.run, output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
        model_builders={"mlp": functools.partial(models.mlp, widths=(16,))},
        methods=["entk_init"], seeds=[0, 1], large_n=30, seeds_large_n=1, num_train=200,
        num_test=40, num_validation=30, num_bootstrap=10, write_figures=False)
    first = run(sizes=[10, 30])
    assert not trained and set(first["cells"]) == {"entk_init-seed0", "entk_init-seed1"}
    # A larger grid: seed 1 still runs only n = 10 (n >= 30 on seed 0 only), so its stored
    # kernel cell is kept and read by n (its file has one row); seed 0's grid changed.
    with pytest.raises(ValueError, match=r"entk_init-seed0"):
        run(sizes=[10, 30, 60])
    second = run(sizes=[10, 30, 60], overwrite=True)
    assert second["cells"]["entk_init-seed1"] == first["cells"]["entk_init-seed1"]
    assert second["cells"]["entk_init-seed0"]["n"] == [10, 30, 60]
    errors = second["methods"]["entk_init"]["test_error"]
    assert errors[0][1] == first["methods"]["entk_init"]["test_error"][0][1]
    assert errors[2][1] is None and errors[2][0] is not None
    assert not trained


def test_smoke_binary_end_to_end(tmp_path, run_binary):
    output = tmp_path / "run"
    run_binary("data_scaling", output)
    results = json.loads((output / "results.json").read_text())
    assert results["study"] == "data_scaling" and results["dataset"] == "digits"
    assert results["n"] == [20, 60, 200] and results["finished"]
    assert set(results["methods"]) == {"network", "entk_init", "after_kernel_n0=30",
                                       "infinite_ntk"}
    for name, method in results["methods"].items():
        errors = np.array(method["test_error"], np.float64)
        if name == "after_kernel_n0=30":  # n = 20 < n0: not run
            assert np.all(np.isnan(errors[0])) and method["fit_sizes_error"] == [60, 200]
            errors = errors[1:]
        assert errors.shape[1] == 2 and np.all((errors >= 0) & (errors <= 1)), name
        assert np.array(method["test_loss"], np.float64).shape == (3, 2)
        assert type(method["alpha"]) is float and len(method["alpha_interval"]) == 2
        assert all(type(v) is float for v in method["alpha_interval"])
        assert type(method["alpha_loss"]) is float
    assert set(results["exponent_differences"]) == {
        "network_minus_entk_init", "network_minus_after_kernel_n0=30", "network_minus_infinite_ntk"}
    # With 60+ training examples every method beats chance (90% error) clearly.
    assert all(np.mean(m["test_error"][-1]) < 0.5 for m in results["methods"].values())
    for name in ("test_error_vs_n.png", "test_loss_vs_n.png"):
        assert (output / "figures" / name).stat().st_size > 1000
    assert "data_scaling.run.sizes = [20, 60, 200]" in (output / "config.gin").read_text()
    assert "experiments.data_scaling" in (output / "command.txt").read_text()
    assert list((output / "tensorboard" / "summary").iterdir())


@pytest.mark.parametrize("study", ["data_scaling", "kernel_evolution"])
def test_every_gin_config_parses(study):
    import gin

    from experiments import configurables, kernel_evolution, launcher  # noqa: F401 (models)

    launcher.configurable(study, {"data_scaling": data_scaling.run,
                                  "kernel_evolution": kernel_evolution.run}[study])
    directory = os.path.join(ROOT, "gin_configs", study)
    gin.add_config_file_search_path(launcher.GIN_CONFIGS_DIR)
    try:
        for name in sorted(os.listdir(directory)):
            gin.clear_config()
            gin.parse_config_file(os.path.join(directory, name))
            if name != "base.gin":
                assert gin.query_parameter(f"{study}.run.dataset").split("/")[0] in (
                    "digits", "mnist1d", "cifar10"), name
    finally:
        gin.clear_config()


ONE_NETWORK_CELL = ["--gin_bindings=data_scaling.run.methods=['network']",
                    "--gin_bindings=data_scaling.run.sizes=[60]",
                    "--gin_bindings=data_scaling.run.seeds=[0]",
                    "--gin_bindings=data_scaling.run.write_figures=False"]


@pytest.mark.slow  # Three runs of the binary: about a minute on the shared machine.
def test_binary_killed_mid_fit_resumes_to_the_uninterrupted_numbers(tmp_path, run_binary):
    killed = run_binary("data_scaling", tmp_path / "killed", *ONE_NETWORK_CELL,
                        "--simulate_crash_after_epochs=1", check=False)
    assert killed.returncode == 3, killed.stderr[-3000:]  # After 50 of 100 steps.
    assert not (tmp_path / "killed" / "cells" / "network-seed0-n60.json").exists()
    run_binary("data_scaling", tmp_path / "killed", *ONE_NETWORK_CELL)
    run_binary("data_scaling", tmp_path / "uninterrupted", *ONE_NETWORK_CELL)
    resumed, uninterrupted = (
        json.loads((tmp_path / name / "results.json").read_text())["cells"]["network-seed0-n60"]
        for name in ("killed", "uninterrupted"))
    assert resumed == uninterrupted and resumed["steps"] == 100


@pytest.mark.slow  # Three runs of the binary: about a minute on the shared machine.
def test_binary_refuses_a_changed_setting_and_overwrite_recomputes(tmp_path, run_binary):
    output = tmp_path / "run"
    run_binary("data_scaling", output, *ONE_NETWORK_CELL)
    record = (output / "cells" / "network-seed0-n60.json").read_text()
    refused = run_binary("data_scaling", output, *ONE_NETWORK_CELL,
                         "--gin_bindings=data_scaling.run.learning_rate=0.2", check=False)
    assert refused.returncode != 0
    assert "learning_rate: 0.05 (stored) → 0.2 (now)" in refused.stderr
    assert (output / "cells" / "network-seed0-n60.json").read_text() == record
    run_binary("data_scaling", output, *ONE_NETWORK_CELL, "--overwrite",
               "--gin_bindings=data_scaling.run.learning_rate=0.2")
    stored = json.loads((output / "cells" / "network-seed0-n60.json").read_text())
    assert stored["settings"]["learning_rate"] == 0.2
    results = json.loads((output / "results.json").read_text())
    assert results["cells"]["network-seed0-n60"] == stored["record"]
    assert results["settings"]["learning_rate"] == 0.2


@pytest.mark.parametrize("binding, message", [
    (dict(sizes=[-5, 10]), r"Received: data_scaling.run.sizes=\[-5, 10\]"),
    (dict(sizes=[30, 10]), r"increasing order"),
    (dict(methods=["network", "ntk"]), r"Received: data_scaling.run.methods="),
    (dict(dataset="imagenet"), r"Received: data_scaling.run.dataset='imagenet'"),
    (dict(stop_criterion="never"), r"Received: data_scaling.run.stop_criterion='never'"),
    (dict(large_n=100), r"data_scaling.run.large_n=100"),
    (dict(fit_window=(500, 100)), r"data_scaling.run.fit_window"),
    # 1437 digits − 150 validation − 300 n0 pool leave 987 candidates.
    (dict(sizes=[10, 1000]), r"Expected sizes at most 987 .*data_scaling.run.sizes=\[10, 1000\]"),
])
def test_impossible_settings_are_refused_before_any_work(tmp_path, binding, message):
    with pytest.raises(ValueError, match=message):
        data_scaling.run(output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                         model_builders={"mlp": models.mlp}, **binding)
    assert not (tmp_path / "cells").exists()


# Trainable weights of the study-B CIFAR-10 models with 10 logits, counted by hand:
# MLP 3072-2048-2048-10; LeNet-5 on 32×32×3 (5×5 'valid', 2×2 max pooling: 32→28→14→10→5,
# 5·5·16 = 400 features, dense 120-84-10).
CIFAR10_CONFIGS = {
    "cifar10_mlp.gin": ("mlp", 3072 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 10 + 10,
                        {"network", "entk_init", "after_kernel_n0=10", "infinite_ntk"}),
    "cifar10_lenet.gin": ("lenet", 5 * 5 * 3 * 6 + 6 + 5 * 5 * 6 * 16 + 16 + 400 * 120 + 120
                          + 120 * 84 + 84 + 84 * 10 + 10,
                          {"network", "entk_init", "after_kernel_n0=10"}),
}


@pytest.mark.slow  # ~20 s each on the shared 2-core machine (load 6-8).
@pytest.mark.parametrize("config", sorted(CIFAR10_CONFIGS))
def test_cifar10_config_runs_end_to_end_on_mock_data(tmp_path, config):
    """The config's tfds.load("cifar10") path (mocked: no download), its model, every method."""
    import gin
    import tensorflow_datasets as tfds

    from experiments import configurables, launcher

    model_name, parameters, methods = CIFAR10_CONFIGS[config]
    run = launcher.configurable("data_scaling", data_scaling.run)
    gin.add_config_file_search_path(launcher.GIN_CONFIGS_DIR)
    gin.parse_config_files_and_bindings(
        [os.path.join(ROOT, "gin_configs", "data_scaling", config)],
        ["data_scaling.run.num_train = 60", "data_scaling.run.num_test = 20",
         "data_scaling.run.num_validation = 10", "data_scaling.run.n0s = [10]",
         "data_scaling.run.sizes = [10, 40]", "data_scaling.run.seeds = [0]",
         "data_scaling.run.train_steps = 3", "data_scaling.run.batch_size = 16",
         "data_scaling.run.num_bootstrap = 10", "data_scaling.run.jit_compile = False",
         "data_scaling.run.write_figures = False"])
    shapes = []

    def recording(builder):
        def build(input_shape, num_outputs, **kwargs):
            shapes.append((tuple(input_shape), num_outputs))
            return builder(input_shape, num_outputs, **kwargs)
        return build

    try:
        with tfds.testing.mock_data(num_examples=60):
            results = run(output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                          model_builders={name: recording(builder) for name, builder
                                          in configurables.MODELS.items()})
        model = configurables.MODELS[model_name]((32, 32, 3), 10)  # The config's widths.
    finally:
        gin.clear_config()
    assert results["dataset"] == "cifar10" and results["finished"]
    assert set(results["methods"]) == methods and results["n"] == [10, 40]
    assert shapes and set(shapes) == {((32, 32, 3), 10)}
    assert int(sum(np.prod(w.shape) for w in model.trainable_weights)) == parameters
    for name, method in results["methods"].items():
        errors = np.array(method["test_error"], np.float64)
        finite = errors[np.isfinite(errors)]
        assert finite.size and np.all((finite >= 0) & (finite <= 1)), name


def test_network_fits_as_tables_count_cap_hits_and_runs():
    """network_fit.fit_table: rows per size, columns per seed, {} where a seed did not run."""
    fits = [[{"steps": 100, "train_loss": 0.5, "train_error": 0.1, "hit_cap": True},
             {"steps": 40, "train_loss": 1e-4, "train_error": 0.0, "hit_cap": False}],
            [{}, {"steps": 100, "train_loss": 0.2, "train_error": 0.05, "hit_cap": True}]]
    assert network_fit.fit_table(fits) == {
        "train_steps": [[100, 40], [None, 100]], "train_loss": [[0.5, 1e-4], [None, 0.2]],
        "train_error": [[0.1, 0.0], [None, 0.05]], "hit_cap": [[True, False], [None, True]],
        "cap_hits": 2, "runs": 3}
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.5, 0.1]])
    correct, loss = network_fit.example_scores(logits, np.array([0, 2]), 3, "mse")
    np.testing.assert_array_equal(correct, [True, False])
    np.testing.assert_allclose(loss, [(1 + 0 + 1) / 3, (0 + 0.25 + 0.81) / 3])
    _, cross_entropy = network_fit.example_scores(logits, np.array([0, 2]), 3, "cross_entropy")
    np.testing.assert_allclose(cross_entropy, -np.log(np.exp(logits[[0, 1], [0, 2]])
                                                      / np.exp(logits).sum(1)))
