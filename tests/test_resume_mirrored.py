"""Resuming a study binary under tf.distribute.MirroredStrategy (issue 16 §1).

The binaries run MirroredStrategy over the devices of their machine
(`--strategy=mirrored`); here over two logical CPUs (the hidden
`--num_cpu_devices=2`: conftest's logical CPUs do not reach a subprocess).
A run killed inside a network's fit and resumed from its BackupAndRestore
checkpoint must give the results of an uninterrupted run under the same
strategy.
"""

import json

import pytest

from study_outputs import assert_same_results

MIRRORED = ("--strategy=mirrored", "--num_cpu_devices=2")
# study A's smoke config, two epochs per fit (so that a fit can be killed after its first).
SMOKE_TWO_EPOCHS = ("--gin_bindings=linear_vs_nonlinear.run.epochs=2",)
CELLS = ["mlp-eigenfunction-k2-seed0", "mlp-binary-seed0"]


@pytest.mark.slow  # Three smoke runs of study A on two replicas: minutes on the shared machine.
def test_linear_vs_nonlinear_killed_mid_fit_under_mirrored_strategy_resumes_exactly(
        tmp_path, run_binary):
    data_dir = f"--data_dir={tmp_path / 'tfds'}"
    uninterrupted = tmp_path / "uninterrupted"
    first = run_binary("linear_vs_nonlinear", uninterrupted, data_dir, *MIRRORED,
                       *SMOKE_TWO_EPOCHS)
    assert "MirroredStrategy with 2 replica(s)" in first.stderr
    output = tmp_path / "killed"
    # The process ends abruptly (os._exit, no clean-up) after the first epoch of the
    # first cell's first fit, its BackupAndRestore checkpoint written.
    killed = run_binary("linear_vs_nonlinear", output, data_dir, *MIRRORED, *SMOKE_TWO_EPOCHS,
                        "--simulate_crash_after_epochs=1", check=False)
    assert killed.returncode == 3, killed.stderr[-3000:]
    assert (output / "cells" / CELLS[0] / "backup_network").exists()
    assert not (output / "results.json").exists()
    resumed = run_binary("linear_vs_nonlinear", output, data_dir, *MIRRORED, *SMOKE_TWO_EPOCHS)
    assert "MirroredStrategy with 2 replica(s)" in resumed.stderr
    assert "Resuming the fit from its backup" in resumed.stderr
    assert "after epoch 1" in resumed.stderr  # epoch 2 only, not epoch 1 again
    got = json.loads((output / "results.json").read_text())
    want = json.loads((uninterrupted / "results.json").read_text())
    assert [r["cell"] for r in got["runs"]] == [r["cell"] for r in want["runs"]] == CELLS
    for resumed_run, uninterrupted_run in zip(got["runs"], want["runs"]):
        # What training produced is bit-identical ...
        for key in ("test_accuracy", "train_accuracy", "weight_distance", "kernel_distance",
                    "alignment", "weight_distance_linearized_init"):
            assert resumed_run[key] == uninterrupted_run[key], (resumed_run["cell"], key)
    # ... and everything else (probe eigenvectors: LAPACK in another process) agrees to
    # rounding; results.json holds no timings.
    assert_same_results(got, want)
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]
