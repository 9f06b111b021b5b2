"""Study C (experiments/trainability.py): the smoke config end to end, resume, errors.

The binary runs in a subprocess, as users run it. Numbers are checked against
independent references: closed forms of the mean-field quantities (χ1 = σw²/2
for ReLU, q* = σb²/(1 − σw²/2)), a numpy recomputation of the condition number
and of the GD-MSE/mean-predictor accuracies from an arc-cosine recursion
written here, and the ordering that the theory predicts (κ grows with depth in
the ordered phase, the chaotic Erf NTK becomes well conditioned).
"""

import json
import math
import os
import sys

import numpy as np
import pytest

from experiments import phase_diagram, trainability
from study_outputs import assert_same_results, configured_run, make_stale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "trainability/smoke.gin"
FIGURES = tuple(f"{kind}_{activation}.png" for kind in ("condition", "trainability",
                                                       "generalization", "spread")
                for activation in ("relu", "erf")) + ("architectures.png", "finite_width.png")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, run_binary):
    output = tmp_path_factory.mktemp("trainability") / "run"
    run_binary("trainability", output)
    return output


def _diagram(results, activation):
    return next(d for d in results["phase_diagram"] if d["activation"] == activation)


def test_results_contract(smoke):
    results = json.loads((smoke / "results.json").read_text())
    assert results["study"] == "trainability"
    assert [d["activation"] for d in results["phase_diagram"]] == ["relu", "erf"]
    for diagram in results["phase_diagram"]:
        sigma, depth = diagram["sigma_w2"], diagram["depth"]
        assert depth == [0, 1, 4, 12] and all(type(d) is int for d in depth)
        kappa = np.asarray(diagram["condition_number"])
        assert kappa.shape == (len(sigma), len(depth))
        assert all(type(v) is float for row in diagram["condition_number"] for v in row)
        assert np.all(kappa >= 1) and np.all(kappa <= 1 / np.finfo(np.float64).eps)
        for key in ("chi1", "xi_1", "xi_star"):
            assert len(diagram[key]) == len(sigma)
        gd = np.asarray(diagram["gd_mse"]["test_accuracy"])
        assert gd.shape == (len(sigma), len(depth), 2)
        for values in (gd, diagram["gd_mse"]["train_accuracy"],
                       diagram["mean_predictor"]["test_accuracy"]):
            assert np.all((np.asarray(values) >= 0) & (np.asarray(values) <= 1))
    for name in ("fcn", "cnn_flatten", "cnn_gap"):
        accuracy = results["architectures"][name]["test_accuracy"]
        assert type(accuracy) is float and 0 <= accuracy <= 1
        eigenvalues = results["architectures"][name]["eigenvalues"][0]
        assert len(eigenvalues) == 24 and eigenvalues == sorted(eigenvalues, reverse=True)
    finite = results["finite_width"]
    assert [w["width"] for w in finite["widths"]] == [16, 64]
    for entry in finite["widths"]:
        assert np.isfinite(entry["centred_relative_error_mean"])
    for figure in FIGURES:
        assert (smoke / "figures" / figure).stat().st_size > 1000
    assert (smoke / "command.txt").read_text().startswith(sys.executable)
    assert "trainability.run.depths" in (smoke / "config.gin").read_text()
    assert any(name.startswith("events.out.tfevents")
               for _, _, files in os.walk(smoke / "tensorboard" / "phase_relu") for name in files)


def test_mean_field_closed_forms(smoke):
    results = json.loads((smoke / "results.json").read_text())
    relu = _diagram(results, "relu")
    np.testing.assert_allclose(relu["chi1"], [s / 2 for s in relu["sigma_w2"]], rtol=1e-12)
    assert relu["q_star"][0] == pytest.approx(0.05 / (1 - 1.0 / 2))
    assert relu["q_star"][1] is None  # σw² = 2: no finite fixed point.
    assert relu["xi_1"][0] == pytest.approx(-1 / math.log(0.5))
    assert relu["xi_1"][1] is None and relu["critical_sigma_w2"] == 2.0
    erf = _diagram(results, "erf")
    # Ordered (σw² = 0.5) and chaotic (σw² = 3) sides of χ1 = 1, c* = 1 only when ordered.
    assert erf["chi1"][0] < 1 < erf["chi1"][1]
    assert erf["c_star"][0] == 1.0 and 0 < erf["c_star"][1] < 1
    q = erf["q_star"][1]
    assert erf["chi1"][1] == pytest.approx(3.0 * 4 / (math.pi * math.sqrt(1 + 4 * q)))
    critical = erf["critical_sigma_w2"]
    assert erf["sigma_w2"][0] < critical < erf["sigma_w2"][1]
    # ξ1 on the ordered side, ξ* = −1/(log χc* − log χ1) on the chaotic side.
    assert erf["xi_1"][0] == pytest.approx(-1 / math.log(erf["chi1"][0]))
    assert erf["xi_1"][1] is None and erf["xi_star"][0] is None
    assert erf["xi_star"][1] == pytest.approx(
        -1 / (math.log(erf["chi_c_star"][1]) - math.log(erf["chi1"][1])))


def test_condition_number_follows_the_phases(smoke):
    results = json.loads((smoke / "results.json").read_text())
    relu, erf = _diagram(results, "relu"), _diagram(results, "erf")
    # Ordered phase: κ grows with depth beyond the first layers.
    for kappa in (relu["condition_number"][0], erf["condition_number"][0]):
        assert kappa[3] > kappa[2]
    # Chaotic Erf: the kernel tends to a multiple of (1 − c*) I + c* 11ᵀ, κ falls.
    assert erf["condition_number"][1][3] < erf["condition_number"][1][1]
    # ...and its mean predictor's test outputs collapse towards a constant.
    spread = erf["mean_predictor"]["test_output_spread"][1]
    assert spread[3] < spread[1]


def _copy_cells(smoke, output):
    import shutil

    shutil.copytree(smoke / "cells", output / "cells")


def test_resume_skips_finished_cells(smoke, tmp_path, run_binary):
    output = tmp_path / "resumed"
    output.mkdir()
    _copy_cells(smoke, output)
    cells = output / "cells"
    # A marked cell must be kept as it is; a removed one must be recomputed.
    kept = cells / "phase-relu-sigma_w2=1.json"  # A row: every depth of one σw².
    removed = cells / "phase-erf-sigma_w2=3.json"
    finite = cells / "finite_width-width=16-seed=0.json"
    stored = json.loads(kept.read_text())
    stored["record"]["cells"][2]["condition_number"] = 12345.0
    kept.write_text(json.dumps(stored))
    stored = json.loads(finite.read_text())
    stored["record"]["final_loss"] = -1.0
    finite.write_text(json.dumps(stored))
    expected = json.loads(removed.read_text())["record"]["cells"][3]["condition_number"]
    removed.unlink()
    result = run_binary("trainability", output)
    assert "already finished, skipped" in result.stderr
    assert "4 of 4 (erf/sigma_w2=3) done" in result.stderr
    assert result.stderr.count("done;") == 1  # Only the removed row ran.
    results = json.loads((output / "results.json").read_text())
    relu, erf = _diagram(results, "relu"), _diagram(results, "erf")
    assert relu["condition_number"][0][2] == 12345.0
    assert erf["condition_number"][1][3] == pytest.approx(expected, rel=1e-9)
    assert results["finite_width"]["widths"][0]["final_train_loss"] == [-1.0]


_TIMINGS = ("seconds", "kernel_seconds", "kernel_seconds_total", "seconds_this_run")


@pytest.mark.slow  # A killed and a resumed smoke run: about a minute on the shared machine.
def test_a_run_killed_mid_run_equals_an_uninterrupted_one(smoke, tmp_path, run_binary,
                                                          kill_binary):
    """kill -9 after the second of four phase rows, rerun: the uninterrupted run's results."""
    output = tmp_path / "killed"
    rows = lambda: list((output / "cells").glob("phase-*.json"))  # noqa: E731
    returncode = kill_binary("trainability", output, when=lambda: len(rows()) >= 2)
    finished = len(rows())
    assert returncode == -9 and 2 <= finished < 4  # Killed inside part 1.
    assert not (output / "results.json").exists()
    resumed = run_binary("trainability", output)
    # The rows finished before the kill are kept; the rest of the grid is computed.
    assert resumed.stderr.count("already finished, skipped") == finished
    got = json.loads((output / "results.json").read_text())
    want = json.loads((smoke / "results.json").read_text())
    assert_same_results(got, want, skip=_TIMINGS)
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]


def test_other_settings_in_the_same_directory_are_refused(smoke, tmp_path, run_binary):
    output = tmp_path / "other"
    output.mkdir()
    _copy_cells(smoke, output)
    result = run_binary("trainability", output, "--gin_bindings=trainability.run.sigma_b2 = 0.1",
                        check=False)
    assert result.returncode != 0
    assert "sigma_b2: 0.05 (stored) → 0.1 (now)" in result.stderr
    assert "use a new output_dir" in result.stderr and "--overwrite" in result.stderr
    # Another finite-width setting leaves parts 1-3 valid: they are kept, part 4 is refused.
    result = run_binary("trainability", output,
                        "--gin_bindings=trainability.run.finite_steps = 6", check=False)
    assert result.returncode != 0 and "steps: 5 (stored) → 6 (now)" in result.stderr
    assert result.stderr.count("already finished, skipped") == 4 + 3  # Rows + architectures.


def test_overwrite_recomputes_the_cells_of_other_settings(smoke, tmp_path):
    """In-process (the binary's --overwrite is passed by the launcher: test_launcher)."""
    import gin
    import tensorflow as tf

    from experiments import launcher

    output = tmp_path / "overwritten"
    output.mkdir()
    _copy_cells(smoke, output)
    run = launcher.configurable("trainability", trainability.run)
    gin.add_config_file_search_path(launcher.GIN_CONFIGS_DIR)
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin_configs", SMOKE)],
                                        ["trainability.run.finite_steps = 6",
                                         "trainability.run.write_figures = False"])
    try:
        results = run(output_dir=str(output), strategy=tf.distribute.get_strategy(),
                      overwrite=True)
    finally:
        gin.clear_config()
    stored = json.loads((output / "cells" / "finite_width-width=16-seed=0.json").read_text())
    assert stored["settings"]["steps"] == 6
    assert results["finite_width"]["steps"] == 6
    reference = json.loads((smoke / "results.json").read_text())
    # Parts 1-3 were kept (their settings did not change): the same numbers.
    assert results["phase_diagram"] == reference["phase_diagram"]
    # One more gradient step lowers the training loss of the finite network.
    assert (results["finite_width"]["widths"][0]["final_train_loss"][0]
            < reference["finite_width"]["widths"][0]["final_train_loss"][0])


def test_a_stale_cell_of_a_later_part_is_refused_before_any_work(smoke, tmp_path, monkeypatch):
    """Every part's stored cells are checked before the first phase row is computed."""
    import tensorflow as tf

    output = tmp_path / "stale"
    output.mkdir()
    _copy_cells(smoke, output)
    make_stale(output / "cells", "phase-relu-sigma_w2=1", "finite_width-width=16-seed=0",
               "steps", 6)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before every cell was checked")

    monkeypatch.setattr(phase_diagram, "phase_row", no_work)
    with configured_run("trainability", trainability.run, SMOKE,
                        ["trainability.run.write_figures = False"]) as run:
        with pytest.raises(ValueError, match=r"Cell 'finite_width-width=16-seed=0'.*steps: 6 "
                                             r"\(stored\) → 5 \(now\)"):
            run(output_dir=str(output), strategy=tf.distribute.get_strategy())
    assert not (output / "results.json").exists()


@pytest.mark.parametrize("override, message", [
    (dict(relu_sigma_w2=(1.0, 3.0)), "no chaotic phase"),
    (dict(learning_rate_fraction=1.5), "learning_rate_fraction"),
    (dict(finite_learning_rate_fraction=1.0), "finite_learning_rate_fraction"),
    (dict(architectures=("resnet",)), "architectures"),
    (dict(depths=(4, 1)), "trainability.run.depths"),
    (dict(heldout="train"), "trainability.run.heldout"),
    (dict(num_train=-5), "trainability.run.num_train"),
    (dict(num_train=5000), "trainability.run.num_train .*digits has \\(1437\\)"),
    (dict(architecture_num_test=0), "trainability.run.architecture_num_test"),
    (dict(finite_widths=(64, -1)), "trainability.run.finite_widths"),
    (dict(sigma_b2=-0.1), "trainability.run.sigma_b2"),
])
def test_bad_settings_raise_before_work(tmp_path, override, message):
    kwargs = dict(relu_sigma_w2=(1.0,), erf_sigma_w2=(1.0,), architectures=("fcn",))
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        trainability.run(output_dir=str(tmp_path), strategy=None, **kwargs)
    assert not os.listdir(tmp_path)  # Nothing written.


def test_cifar10_config_on_mock_data(tmp_path):
    """cifar10.gin reads CIFAR-10 through tfds (mocked here: no download), 32×32×3 inputs."""
    import gin
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from experiments import launcher

    run = launcher.configurable("trainability", trainability.run)
    gin.add_config_file_search_path(os.path.join(ROOT, "gin_configs"))
    gin.parse_config_files_and_bindings(
        [os.path.join(ROOT, "gin_configs", "trainability", "cifar10.gin")],
        ["trainability.run.num_train = 12", "trainability.run.num_test = 6",
         "trainability.run.relu_sigma_w2 = [2.0]", "trainability.run.erf_sigma_w2 = [3.0]",
         "trainability.run.depths = [1, 2]", "trainability.run.times = [1]",
         # CNN-GAP on 32×32 keeps (32·32)² numbers per pair: left to the accelerator run.
         "trainability.run.architectures = ['fcn', 'cnn_flatten']",
         "trainability.run.architecture_depths = [1]",
         "trainability.run.architecture_num_train = 8",
         "trainability.run.architecture_num_test = 4",
         "trainability.run.finite_widths = [8]", "trainability.run.finite_seeds = [0]",
         "trainability.run.finite_num_train = 8", "trainability.run.finite_steps = 1",
         "trainability.run.write_figures = False"],
    )
    try:
        with tfds.testing.mock_data(num_examples=24):
            results = run(
                output_dir=str(tmp_path), strategy=tf.distribute.get_strategy())
    finally:
        gin.clear_config()
    assert results["dataset"] == "cifar10"
    assert (results["num_train"], results["num_test"]) == (12, 6)
    assert results["architecture_setup"]["num_train"] == 8
    assert set(results["architectures"]) == {"fcn", "cnn_flatten"}
    for diagram in results["phase_diagram"]:
        assert np.asarray(diagram["condition_number"]).shape == (1, 2)
