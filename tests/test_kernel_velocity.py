"""Tests of experiments/kernel_velocity.py: snapshot times, tail fits, verdicts, seed means.

References: slopes of synthetic power laws, means and standard errors with numpy.
"""

import numpy as np
import pytest

from experiments import kernel_velocity


def test_log_spaced_steps():
    steps = kernel_velocity.log_spaced_steps(2300, 25)
    assert steps[0] == 1 and steps[-1] == 2300 and steps == sorted(set(steps))
    ratios = np.diff(np.log(steps[8:]))
    np.testing.assert_allclose(ratios, np.log(2300) / 24, rtol=0.1)
    with pytest.raises(ValueError, match="Received: total_steps=0"):
        kernel_velocity.log_spaced_steps(0, 5)


@pytest.mark.parametrize("slope", [-1.5, -1.0, -0.5, 0.0])
def test_tail_slope_and_verdict(slope):
    rng = np.random.RandomState(0)
    steps = np.array(kernel_velocity.log_spaced_steps(5000, 30))
    values = 3.0 * steps ** slope * np.exp(0.05 * rng.normal(size=len(steps)))
    # Early snapshots follow another law: only the tail (step >= 500) counts.
    values[steps < 500] = 1.0
    fitted, error = kernel_velocity.tail_slope(steps, values, start=500)
    assert abs(fitted - slope) < 3 * error and 0 < error < 0.1
    # The reference slope and standard error of ordinary least squares (scipy).
    from scipy import stats
    tail = steps >= 500
    reference = stats.linregress(np.log(steps[tail]), np.log(values[tail]))
    np.testing.assert_allclose([fitted, error], [reference.slope, reference.stderr], rtol=1e-8)
    verdict = kernel_velocity.velocity_verdict(fitted, error)
    assert verdict.startswith({-1.5: "decays faster than 1/t", -1.0: "decays like 1/t",
                               -0.5: "decays slower", 0.0: "plateaus"}[slope])
    assert kernel_velocity.tail_slope(steps, values, start=10**6) == (None, None)
    assert kernel_velocity.velocity_verdict(None).startswith("undetermined")


def test_paired_snapshot_steps():
    times, snapshots = kernel_velocity.paired_snapshot_steps(12, 8, 1)
    assert times == [1, 3, 6, 8, 11]
    assert snapshots == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]
    times, snapshots = kernel_velocity.paired_snapshot_steps(5000, 30, 10)
    assert times[0] == 1 and times[-1] == 4990 and min(np.diff(times)) > 10
    assert set(snapshots) == set(times) | {t + 10 for t in times}
    with pytest.raises(ValueError, match="velocity_dt=12"):
        kernel_velocity.paired_snapshot_steps(12, 8, 12)


def test_aggregate_seeds_mean_series_and_slope_standard_error():
    steps = [1, 10, 100, 300, 1000]
    cells = {}
    for seed, slope in (("0", -0.8), ("1", -1.0), ("2", -1.3)):
        velocity = [2.0 * t ** slope for t in steps]
        cell = {"steps": steps, "epochs": [1, 1, 2, 3, 9], "velocity_dt": 10,
                "velocity": velocity, "velocity_relative": velocity,
                "distance_from_init": [0.1, 0.2, 0.3, 0.35, 0.4], "alignment": [0.5] * 5,
                "weight_distance_from_init": [0.0] * 5, "ntk_trace": [1.0] * 5,
                "kernel_regression_test_error": [0.2] * 5, "network_test_error": [None] * 5,
                "kernel_regression_test_error_init": 0.3, "final_train_loss": 0.01}
        cells[seed] = kernel_velocity.summarize(cell, 1000)
    out = kernel_velocity.aggregate_seeds(cells)
    slopes = [-0.8, -1.0, -1.3]
    np.testing.assert_allclose(out["velocity_relative_tail_slope"], np.mean(slopes), rtol=1e-10)
    np.testing.assert_allclose(out["velocity_relative_tail_slope_se"],
                               np.std(slopes, ddof=1) / np.sqrt(3), rtol=1e-10)
    np.testing.assert_allclose(out["velocity"], np.mean(
        [[2.0 * t ** s for t in steps] for s in slopes], axis=0), rtol=1e-12)
    assert out["network_test_error"] == [None] * 5 and out["num_seeds"] == 3
    assert out["velocity_verdict"].startswith("decays like 1/t")
