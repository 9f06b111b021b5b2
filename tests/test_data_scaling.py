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
from experiments import data_scaling, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_geometric_sizes():
    assert data_scaling.geometric_sizes(50, 987, 6) == [50, 91, 165, 299, 544, 987]
    assert data_scaling.geometric_sizes(10, 10, 3) == [10]
    with pytest.raises(ValueError, match="Received: smallest=0"):
        data_scaling.geometric_sizes(0, 10, 3)


def test_regression_path_matches_numpy_solve():
    rng = np.random.RandomState(0)
    features = rng.normal(size=(30, 12))
    kernel = features @ features.T  # rank 12: singular without the ridge
    y = np.eye(3)[rng.randint(0, 3, size=20)]
    train, evaluation = np.arange(20), np.arange(20, 30)
    ridges = [1e-3, 0.5, 10.0]
    for solver in ("eigh", "cholesky"):
        path = data_scaling.regression_path(kernel[np.ix_(train, train)],
                                            kernel[np.ix_(evaluation, train)], y, ridges,
                                            solver=solver)
        for ridge, predictions in zip(ridges, path):
            reference = kernel[np.ix_(evaluation, train)] @ np.linalg.solve(
                kernel[np.ix_(train, train)] + ridge * np.eye(20), y)
            np.testing.assert_allclose(predictions, reference, rtol=1e-6, atol=1e-9)
    # The Cholesky path leaves the caller's kernel untouched (it factorizes a copy).
    k_train = kernel[np.ix_(train, train)].copy()
    data_scaling.regression_path(k_train, kernel[np.ix_(evaluation, train)], y, ridges,
                                 solver="cholesky")
    np.testing.assert_array_equal(k_train, kernel[np.ix_(train, train)])


def test_linearized_predictor_equals_linearize_trained_by_full_batch_gd():
    # One output, n = 8 ≪ 1 + 6·48 + 48 + 48 parameters, float64 regression; the Linearize
    # model f0 + J·δ trained from δ = 0 by full-batch GD on the MSE converges to the
    # minimum-norm fit, whose test predictions are f0* + Θ*Θ⁻¹(Y − f0) (λ → 0).
    keras.utils.set_random_seed(0)
    net = models.mlp((6,), 1, widths=(48,))
    rng = np.random.RandomState(0)
    x_train = rng.normal(size=(8, 6)).astype(np.float32)
    x_test = rng.normal(size=(5, 6)).astype(np.float32)
    y_train = rng.normal(size=(8, 1)).astype(np.float32)
    k_train = np.asarray(keras_ntk.empirical_ntk(net, x_train), np.float64)
    k_test_train = np.asarray(keras_ntk.empirical_ntk(net, x_test, x_train), np.float64)
    f0_train = np.asarray(net(x_train), np.float64)
    f0_test = np.asarray(net(x_test), np.float64)
    predicted = data_scaling.linearized_predictions(
        k_train, k_test_train, y_train, [1e-9 * np.mean(np.diag(k_train))],
        f0_train=f0_train, f0_eval=f0_test)[0]

    linear = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(net)])
    eigenvalues = np.linalg.eigvalsh(k_train)
    # MSE = mean (f − y)²: function-space GD step lr·(2/n)·Θ; stable below n/λmax.
    learning_rate = 0.5 * len(x_train) / eigenvalues[-1]
    steps = int(20 * eigenvalues[-1] / eigenvalues[0]) + 200
    linear.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    batches = tf.data.Dataset.from_tensors((x_train, y_train)).repeat()
    linear.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    assert float(np.mean((linear(x_train).numpy() - y_train) ** 2)) < 1e-8
    scale = np.abs(predicted - f0_test).max()
    np.testing.assert_allclose(linear(x_test).numpy(), predicted, atol=2e-3 * scale)
    # Without f0 (the kernel predictor) the test predictions differ by about f0 itself.
    kernel_only = data_scaling.linearized_predictions(
        k_train, k_test_train, y_train, [1e-9 * np.mean(np.diag(k_train))])[0]
    assert np.abs(kernel_only - predicted).max() > 10 * 2e-3 * scale


def test_sliced_kernel_regression_equals_recomputed_kernel():
    keras.utils.set_random_seed(0)
    model = models.mlp((8, 8, 1), 3, widths=(16,))
    rng = np.random.RandomState(0)
    layout = {"num_candidates": 24, "num_validation": 6, "num_test": 10}
    x_union = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
    y_union = rng.randint(0, 3, size=40)
    union_kernel = np.asarray(keras_ntk.empirical_ntk(model, x_union), np.float64)
    train, validation, test = data_scaling.kernel_indices(layout, n=11)
    np.testing.assert_array_equal(train, np.arange(11))
    np.testing.assert_array_equal(validation, np.arange(24, 30))
    np.testing.assert_array_equal(test, np.arange(30, 40))
    # Kernels recomputed on the subset, in float64 from float32 passes.
    k_train = np.asarray(keras_ntk.empirical_ntk(model, x_union[train]), np.float64)
    k_test_train = np.asarray(keras_ntk.empirical_ntk(model, x_union[test], x_union[train]),
                              np.float64)
    np.testing.assert_allclose(union_kernel[np.ix_(train, train)], k_train, rtol=1e-4,
                               atol=1e-5 * np.abs(k_train).max())
    y = np.eye(3)[y_union[train]]
    ridge = 1e-2 * np.mean(np.diag(k_train))
    sliced = data_scaling.regression_path(union_kernel[np.ix_(train, train)],
                                          union_kernel[np.ix_(test, train)], y, [ridge])[0]
    reference = k_test_train @ np.linalg.solve(k_train + ridge * np.eye(11), y)
    np.testing.assert_allclose(sliced, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())
    # And the method's scores are those of the reference predictions at the chosen ridge.
    scores = data_scaling.kernel_method_errors(union_kernel, layout, y_union, 3, [5, 11],
                                               [1e-2], min_n=6)
    np.testing.assert_allclose(scores["test_error"][1],
                               np.mean(np.argmax(reference, 1) != y_union[test]))
    np.testing.assert_allclose(scores["test_loss"][1],
                               np.mean((reference - np.eye(3)[y_union[test]]) ** 2), rtol=1e-3)
    np.testing.assert_array_equal(scores["correct"][1], np.argmax(reference, 1) == y_union[test])
    # Sizes below min_n (after-kernels: n < n0) are not run.
    assert scores["test_error"][0] is None and np.all(np.isnan(scores["correct"][0]))
    # With offsets f0: the linearized predictor f0 + Θ*(Θ+λ)⁻¹(Y − f0).
    f0 = rng.normal(size=(40, 3))
    with_f0 = data_scaling.kernel_method_errors(union_kernel, layout, y_union, 3, [11], [1e-2],
                                                offsets=f0)
    shifted = f0[test] + k_test_train @ np.linalg.solve(k_train + ridge * np.eye(11),
                                                        y - f0[train])
    np.testing.assert_allclose(with_f0["test_loss"][0],
                               np.mean((shifted - np.eye(3)[y_union[test]]) ** 2), rtol=1e-3)


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
    train_network, kernel_errors = data_scaling.train_network, data_scaling.kernel_method_errors

    def counted_train(*args, **kwargs):
        calls["train"] += 1
        return train_network(*args, **kwargs)

    def counted_kernel(*args, **kwargs):
        calls["kernel"] += 1
        return kernel_errors(*args, **kwargs)

    monkeypatch.setattr(data_scaling, "train_network", counted_train)
    monkeypatch.setattr(data_scaling, "kernel_method_errors", counted_kernel)
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


def test_losses_and_error_against_keras():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(9, 4))
    labels = rng.randint(0, 4, size=9)
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    np.testing.assert_allclose(data_scaling.cross_entropy(logits, labels), float(reference),
                               rtol=1e-5)
    one_hot = np.eye(4)[labels]
    np.testing.assert_allclose(data_scaling.mse(logits, one_hot),
                               float(keras.losses.MeanSquaredError()(one_hot, logits)), rtol=1e-5)
    assert data_scaling.error_rate(one_hot, labels) == 0.0
    assert data_scaling.error_rate(-one_hot, labels) == 1.0


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
