"""Tests of experiments/kernel_evolution.py (study B, kernel evolution).

References: slopes of synthetic power laws, Frobenius norms and cosine distances
computed with numpy from the kernels the tracker saved, kernels recomputed with
`keras_ntk.empirical_ntk` from saved weights.
"""

import functools
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from experiments import kernel_evolution, kernel_velocity, models
from study_outputs import assert_same_results, make_stale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("evolution")
    run = functools.partial(
        kernel_evolution.run, output_dir=str(output), strategy=tf.distribute.get_strategy(),
        model_builders={"mlp": models.mlp}, widths=[8, 32], depth=1, num_train=256,
        num_test=64, epochs=3, batch_size=64, num_snapshots=8, velocity_dt=1, seeds=[0, 1],
        num_probe=40, num_validation=20, save_kernels=True)
    first = run(widths=[8])
    results = run()
    return dict(output=output, first=first, results=results, run=run)


def test_results_shape(smoke_run):
    results = smoke_run["results"]
    assert results["study"] == "kernel_evolution" and results["finished"]
    assert results["steps"] == [1, 3, 6, 8, 11] and results["velocity_dt"] == 1
    assert results["epochs"] == [1, 1, 2, 2, 3]
    assert set(results["widths"]) == {"8", "32"}
    for cell in results["widths"].values():
        for key in ("velocity", "velocity_relative", "distance_from_init", "alignment",
                    "kernel_regression_test_error", "network_test_error"):
            assert len(cell[key]) == 5 and all(type(v) is float for v in cell[key]), key
        assert all(0 <= v <= 1 for v in cell["kernel_regression_test_error"])
        assert cell["velocity_verdict"] and np.isclose(cell["tail_start_step"], 1.2)
        assert cell["distance_from_init_growth_last_decade"] > 0
        assert set(cell["seeds"]) == {"0", "1"}
        # The width's series is the mean of its seeds'.
        np.testing.assert_allclose(cell["velocity"], np.mean(
            [cell["seeds"][s]["velocity"] for s in ("0", "1")], axis=0), rtol=1e-12)
    for name in ("velocity.png", "distance_from_init.png", "alignment.png",
                 "kernel_regression.png"):
        assert (smoke_run["output"] / "figures" / name).stat().st_size > 1000
    assert list((smoke_run["output"] / "tensorboard" / "width8_seed0" / "ntk").iterdir())
    # The width finished in the first call was kept, not retrained.
    assert results["widths"]["8"]["seeds"] == smoke_run["first"]["widths"]["8"]["seeds"]


def test_series_match_numpy_on_saved_kernels(smoke_run):
    cell = smoke_run["results"]["widths"]["32"]["seeds"]["1"]
    history = keras_ntk.load_ntk_history(str(smoke_run["output"] / "kernels" / "width32_seed1"))
    kernels = {s["step"]: s["kernel"] for s in history["snapshots"]}
    k0 = history["initial"]["kernel"]
    assert sorted(kernels) == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]
    for i, t in enumerate(cell["steps"]):
        a, b = kernels[t], kernels[t + 1]  # Δt = 1
        cosine = np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)
        np.testing.assert_allclose(cell["velocity"][i], 1 - cosine, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(cell["velocity_relative"][i],
                                   np.linalg.norm(b - a) / np.linalg.norm(a), rtol=1e-5)
        np.testing.assert_allclose(
            cell["distance_from_init"][i],
            1 - np.sum(k0 * a) / np.linalg.norm(k0) / np.linalg.norm(a), rtol=1e-5, atol=1e-12)
    # The kernel moved, less so for the wider network (same steps and rate).
    narrow = smoke_run["results"]["widths"]["8"]["distance_from_init"][-1]
    assert 0 < smoke_run["results"]["widths"]["32"]["distance_from_init"][-1] < narrow


def test_rerun_skips_and_other_schedule_refused(smoke_run, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a finished width was retrained")

    monkeypatch.setattr(kernel_evolution, "_train_width", fail)
    again = smoke_run["run"](write_figures=False)
    assert again["widths"] == smoke_run["results"]["widths"]
    with pytest.raises(ValueError, match=r"epochs: 3 \(stored\) → 4 \(now\); steps: "):
        smoke_run["run"](epochs=4)


def test_a_stale_run_after_an_unfinished_one_is_refused_before_any_work(smoke_run, tmp_path,
                                                                       monkeypatch):
    import shutil

    def fail(*args, **kwargs):
        raise AssertionError("work started before every run was checked")

    output = tmp_path / "stale"
    shutil.copytree(smoke_run["output"], output)
    make_stale(output / "cells", "width8-seed0", "width32-seed1", "learning_rate", 0.1)
    monkeypatch.setattr(kernel_evolution, "_train_width", fail)
    with pytest.raises(ValueError, match=r"Cell 'width32-seed1'.*learning_rate: 0.1 \(stored\) "
                                         r"→ 0.05 \(now\)"):
        smoke_run["run"](output_dir=str(output), write_figures=False)


def test_overwrite_recomputes_a_width_of_other_settings(smoke_run, tmp_path):
    import shutil

    output = tmp_path / "copy"
    shutil.copytree(smoke_run["output"], output)
    run = functools.partial(smoke_run["run"], output_dir=str(output), widths=[8],
                            save_kernels=False, write_figures=False)
    with pytest.raises(ValueError, match=r"learning_rate: 0.05 \(stored\) → 0.1 \(now\)"):
        run(learning_rate=0.1)
    again = run(learning_rate=0.1, overwrite=True)
    for seed in ("0", "1"):
        stored = json.loads((output / "cells" / f"width8-seed{seed}.json").read_text())
        assert stored["settings"]["learning_rate"] == 0.1
        assert again["widths"]["8"]["seeds"][seed] == kernel_velocity.summarize(
            stored["record"], 12)
    # Trained again at the other rate: the network moved differently.
    assert again["widths"]["8"]["weight_distance_from_init"] != (
        smoke_run["results"]["widths"]["8"]["weight_distance_from_init"])


def test_smoke_binary(tmp_path, run_binary):
    run_binary("kernel_evolution", tmp_path, "--gin_bindings=kernel_evolution.run.widths=[8]")
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["widths"]) == ["8"] and results["recipe"]["schedule"] == "constant"
    assert results["seeds"] == [0] and results["velocity_dt"] == 1
    assert "kernel_evolution.run.widths = [8]" in (tmp_path / "config.gin").read_text()
    # A rerun with another setting is refused, naming it, before any work.
    refused = run_binary("kernel_evolution", tmp_path,
                         "--gin_bindings=kernel_evolution.run.widths=[8]",
                         "--gin_bindings=kernel_evolution.run.momentum=0.5", check=False)
    assert refused.returncode != 0
    assert "momentum: 0.0 (stored) → 0.5 (now)" in refused.stderr


@pytest.mark.parametrize("binding, message", [
    (dict(widths=[0, 8]), r"Received: kernel_evolution.run.widths=\[0, 8\]"),
    (dict(seeds=[1, 1]), r"Received: kernel_evolution.run.seeds=\[1, 1\]"),
    (dict(model="vit"), r"Received: kernel_evolution.run.model='vit'"),
    (dict(dataset="imagenet"), r"Received: kernel_evolution.run.dataset='imagenet'"),
    (dict(num_probe=1400, num_validation=100),
     r"Expected num_probe \+ num_validation <= 1437 .*kernel_evolution.run.num_probe=1400"),
    (dict(velocity_dt=10**6), r"velocity_dt=1000000"),
])
def test_impossible_settings_are_refused_before_any_work(tmp_path, binding, message):
    with pytest.raises(ValueError, match=message):
        kernel_evolution.run(output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                             model_builders={"mlp": models.mlp}, **binding)
    assert not (tmp_path / "cells").exists()


@pytest.mark.slow  # An uninterrupted, a killed and a resumed smoke run: ~2 minutes, loaded.
def test_a_run_killed_mid_run_equals_an_uninterrupted_one(tmp_path, run_binary, kill_binary):
    """kill -9 while the second width trains, rerun: the uninterrupted run's results."""
    uninterrupted = tmp_path / "uninterrupted"
    run_binary("kernel_evolution", uninterrupted, "--gin_bindings=kernel_evolution.run."
               "write_figures=False")
    output = tmp_path / "killed"
    first = output / "cells" / "width8-seed0.json"
    second = output / "tensorboard" / "width32_seed0"
    returncode = kill_binary("kernel_evolution", output, "--gin_bindings=kernel_evolution.run."
                             "write_figures=False", when=lambda: first.exists() and second.exists())
    assert returncode == -9 and not (output / "cells" / "width32-seed0.json").exists()
    resumed = run_binary("kernel_evolution", output, "--gin_bindings=kernel_evolution.run."
                         "write_figures=False")
    assert "run 1 of 2 (width8-seed0): already finished, skipped" in resumed.stderr
    got = json.loads((output / "results.json").read_text())
    want = json.loads((uninterrupted / "results.json").read_text())
    assert_same_results(got, want, skip=("wall_seconds",))  # The only timing.
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]


def _resnet18_trainable(width, num_outputs=10, blocks=(2, 2, 2, 2), channels=3):
    """Trainable weights of experiments.models.resnet18, counted by hand (BN γ, β only)."""
    count = 9 * channels * width + 2 * width  # Stem conv (no bias) + BN.
    previous = width
    for stage, size in enumerate(blocks):
        filters = width * 2**stage
        for _ in range(size):
            count += 9 * previous * filters + 2 * filters + 9 * filters * filters + 2 * filters
            if previous != filters:
                count += previous * filters + 2 * filters  # 1×1 projection + BN.
            previous = filters
    return count + previous * num_outputs + num_outputs


# Each study-B CIFAR-10 config: its model, its widths and their trainable weights by hand.
CIFAR10_CONFIGS = {
    "cifar10_mlp.gin": ("mlp", {w: 3072 * w + w + w * w + w + w * 10 + 10
                                for w in (256, 1024, 4096)}),
    "cifar10_resnet18.gin": ("resnet18", {w: _resnet18_trainable(w) for w in (16, 32, 64)}),
}


@pytest.mark.slow  # MLP ~5 s, ResNet-18 ~2 min on the shared 2-core machine (load 6-8).
@pytest.mark.parametrize("config", sorted(CIFAR10_CONFIGS))
def test_cifar10_config_runs_end_to_end_on_mock_data(tmp_path, config):
    """The config's tfds.load("cifar10") path (mocked), its widths' models, one short run."""
    import gin
    import tensorflow_datasets as tfds

    from experiments import configurables, launcher

    model_name, parameters = CIFAR10_CONFIGS[config]
    run = launcher.configurable("kernel_evolution", kernel_evolution.run)
    gin.add_config_file_search_path(launcher.GIN_CONFIGS_DIR)
    gin.parse_config_files_and_bindings(
        [os.path.join(ROOT, "gin_configs", "kernel_evolution", config)], [])
    try:
        widths = gin.query_parameter("kernel_evolution.run.widths")
        depth = gin.query_parameter("kernel_evolution.run.depth")
        built = {w: configurables.MODELS[model_name](
            (32, 32, 3), 10, **kernel_evolution._width_kwargs(model_name, w, depth))
            for w in widths}
        gin.clear_config()  # Parsing locks the config: parse it again with the small sizes.
        gin.parse_config_files_and_bindings([os.path.join(
            ROOT, "gin_configs", "kernel_evolution", config)], [
            f"kernel_evolution.run.widths = [{min(widths)}]", "kernel_evolution.run.seeds = [0]",
            "kernel_evolution.run.num_train = 64", "kernel_evolution.run.num_test = 8",
            "kernel_evolution.run.epochs = 1", "kernel_evolution.run.batch_size = 16",
            "kernel_evolution.run.num_snapshots = 3", "kernel_evolution.run.velocity_dt = 1",
            "kernel_evolution.run.num_probe = 8", "kernel_evolution.run.num_validation = 4",
            "kernel_evolution.run.jit_compile = False",
            "kernel_evolution.run.write_figures = False"])
        with tfds.testing.mock_data(num_examples=64):
            results = run(output_dir=str(tmp_path), strategy=tf.distribute.get_strategy(),
                          model_builders=configurables.MODELS)
    finally:
        gin.clear_config()
    assert {w: int(sum(np.prod(v.shape) for v in m.trainable_weights))
            for w, m in built.items()} == parameters
    assert all(m.input_shape == (None, 32, 32, 3) for m in built.values())
    assert results["dataset"] == "cifar10" and results["finished"]
    assert list(results["widths"]) == [str(min(widths))]
    cell = results["widths"][str(min(widths))]
    assert all(np.isfinite(v) and v >= 0 for v in cell["velocity"])
