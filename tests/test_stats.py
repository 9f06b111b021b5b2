"""experiments/stats.py against independent references (scipy, closed forms, simulation)."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import stats


def _table(a_only, b_only, both, neither, rng):
    """Correctness arrays realising a 2×2 table, shuffled."""
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, bool)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, bool)
    order = rng.permutation(len(a))
    return a[order], b[order]


def test_mcnemar_matches_scipy_binomtest_on_2x2_tables():
    rng = np.random.default_rng(0)
    tables = [(0, 0, 5, 5), (0, 5, 3, 0), (3, 10, 100, 20), (7, 7, 50, 1), (1, 0, 0, 0),
              (40, 61, 200, 30)]
    tables += [tuple(rng.integers(0, 60, 4)) for _ in range(30)]
    for a_only, b_only, both, neither in tables:
        a, b = _table(a_only, b_only, both, neither, rng)
        result = stats.mcnemar_exact(a, b)
        assert (result.a_only, result.b_only, result.n) == (a_only, b_only, len(a))
        if a_only + b_only == 0:
            assert result.p_value == 1.0
            continue
        reference = scipy_stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
        np.testing.assert_allclose(result.p_value, reference, rtol=1e-12)
        np.testing.assert_allclose(result.difference, (a.mean() - b.mean()), atol=1e-15)


def test_pairwise_mcnemar_tests_every_pair_under_each_condition():
    rng = np.random.default_rng(1)
    correct = {name: [rng.random(40) < p for p in (0.6, 0.8)]
               for name in ("x", "y", "z")}
    correct["z"][1] = correct["y"][1].copy()  # Never disagree: nothing is detectable.
    tests = stats.pairwise_mcnemar(correct, [2, 8], alpha=0.05, power=0.8)
    assert [(t["a"], t["b"], t["depth"]) for t in tests] == [
        ("x", "y", 2), ("x", "y", 8), ("x", "z", 2), ("x", "z", 8), ("y", "z", 2), ("y", "z", 8)]
    for t in tests:
        a = correct[t["a"]][[2, 8].index(t["depth"])]
        b = correct[t["b"]][[2, 8].index(t["depth"])]
        a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
        assert (t["a_only_correct"], t["b_only_correct"], t["n"]) == (a_only, b_only, len(a))
        np.testing.assert_allclose(t["accuracy_difference"], a.mean() - b.mean(), atol=1e-15)
        if a_only + b_only == 0:
            assert t["p_value"] == 1.0 and t["detectable_difference"] is None
            continue
        np.testing.assert_allclose(
            t["p_value"], scipy_stats.binomtest(a_only, a_only + b_only, 0.5).pvalue, rtol=1e-12)
        assert t["detectable_difference"] == stats.mcnemar_detectable_difference(
            len(a), (a_only + b_only) / len(a), alpha=0.05, power=0.8)
    assert tests[-1]["detectable_difference"] is None


def test_exact_binomial_by_hand():
    # 0 of 5 discordant favour A: 2 · (1/32).
    assert stats.binomial_two_sided_half(0, 5) == 2 / 32
    # 1 of 6: 2 · (1 + 6)/64.
    assert stats.binomial_two_sided_half(1, 6) == 14 / 64
    # Symmetric: 3 of 6 gives 1.
    assert stats.binomial_two_sided_half(3, 6) == 1.0
    # Large n in exact arithmetic agrees with scipy's float tail.
    np.testing.assert_allclose(stats.binomial_two_sided_half(4_700, 10_000),
                               scipy_stats.binomtest(4_700, 10_000).pvalue, rtol=1e-9)
    with pytest.raises(ValueError, match="Received: successes=4, trials=3"):
        stats.binomial_two_sided_half(4, 3)


def test_mcnemar_over_seeds_pools_discordant_counts():
    rng = np.random.default_rng(1)
    seeds = [(5, 1, 80, 14), (4, 2, 82, 12), (1, 3, 85, 11)]
    arrays = [_table(*t, rng) for t in seeds]
    over = stats.mcnemar_over_seeds([a for a, _ in arrays], [b for _, b in arrays])
    assert (over["pooled"].a_only, over["pooled"].b_only) == (10, 6)
    assert over["pooled"].n == 300
    np.testing.assert_allclose(over["pooled"].p_value, scipy_stats.binomtest(10, 16).pvalue)
    np.testing.assert_allclose([r.p_value for r in over["per_seed"]],
                               [scipy_stats.binomtest(a, a + b).pvalue for a, b, _, _ in seeds])
    # Seeds as seeds: the mean of per-seed accuracy differences.
    np.testing.assert_allclose(over["difference"], np.mean([(a - b) / 100 for a, b, _, _ in seeds]))
    assert over["seeds_agreeing"] == 2
    with pytest.raises(ValueError, match="same, nonzero number of seeds"):
        stats.mcnemar_over_seeds([arrays[0][0]], [])


def test_detectable_difference_has_the_stated_power_by_simulation():
    """At the returned δ the exact McNemar test rejects in ≈80% of simulated runs."""
    n, discordance = 1080, 0.1
    delta = stats.mcnemar_detectable_difference(n, discordance)
    # The small-δ form (z_{α/2} + z_β)·√(p_d/n) is within a few percent.
    np.testing.assert_allclose(delta, (1.959964 + 0.841621) * math.sqrt(discordance / n),
                               rtol=0.03)
    rng = np.random.default_rng(2)
    probabilities = [(discordance + delta) / 2, (discordance - delta) / 2, 1 - discordance]
    rejections = 0
    trials = 3000
    for counts in rng.multinomial(n, probabilities, size=trials):
        rejections += scipy_stats.binomtest(counts[0], counts[0] + counts[1]).pvalue < 0.05
    assert abs(rejections / trials - 0.8) < 0.04
    assert stats.mcnemar_detectable_difference(100, 0.0) == math.inf
    # More examples detect smaller differences.
    assert stats.mcnemar_detectable_difference(4 * n, discordance) < delta / 1.9


def test_compare_paired_outcomes():
    rng = np.random.default_rng(3)
    # A clearly better in every seed.
    strong = [_table(30, 2, 300, 28, rng) for _ in range(3)]
    result = stats.compare_paired([a for a, _ in strong], [b for _, b in strong])
    assert result["outcome"] == "a" and result["p_value"] < 1e-10
    assert result["seeds_agreeing"] == 3 and result["n"] == 1080
    reversed_result = stats.compare_paired([b for _, b in strong], [a for a, _ in strong])
    assert reversed_result["outcome"] == "b"
    # Equal discordant counts: not significant. Few discordant pairs on many
    # examples: power to see 2 points, so a tie.
    few = [_table(3, 3, 900, 94, rng) for _ in range(3)]
    assert stats.compare_paired([a for a, _ in few], [b for _, b in few])["outcome"] == "tie"
    # Many discordant pairs on few examples: no power, inconclusive.
    many = [_table(20, 20, 40, 20, rng) for _ in range(3)]
    result = stats.compare_paired([a for a, _ in many], [b for _, b in many])
    assert result["outcome"] == "inconclusive" and result["detectable_difference"] > 0.02


def test_paired_bootstrap_interval_matches_the_normal_standard_error():
    """For acc(A) − acc(B) on one seed the bootstrap SE is sd(d_i)/√n."""
    rng = np.random.default_rng(4)
    n = 2000
    a = rng.random(n) < 0.8
    b = np.where(rng.random(n) < 0.85, a, ~a)  # B agrees with A on 85%.
    correct = np.stack([a, b])[None]  # (1 seed, 2 models, n)
    result = stats.paired_bootstrap(correct, lambda acc: acc[:, 0].mean() - acc[:, 1].mean(),
                                    num_resamples=4000, seed=0)
    d = a.astype(float) - b.astype(float)
    np.testing.assert_allclose(result.estimate, d.mean())
    se = d.std() / math.sqrt(n)
    half_width = (result.interval[1] - result.interval[0]) / 2
    np.testing.assert_allclose(half_width, 1.96 * se, rtol=0.08)
    # Its p-value is close to McNemar's (both test the same paired difference).
    mcnemar = stats.mcnemar_exact(a, b).p_value
    assert 0.5 < result.p_value / mcnemar < 2 or (result.p_value < 0.002 and mcnemar < 0.002)


def test_paired_bootstrap_same_indices_for_every_seed_and_model():
    """Agrees with a naive loop drawing the same indices (one draw per resample)."""
    rng = np.random.default_rng(5)
    correct = rng.random((3, 3, 50)) < 0.7
    result = stats.paired_bootstrap(correct, stats.gap_difference, num_resamples=200, seed=7)
    draws = np.random.default_rng(7)
    naive = []
    for _ in range(200):
        index = draws.integers(0, 50, 50)
        naive.append(stats.gap_difference(correct[:, :, index].mean(axis=2)))
    np.testing.assert_allclose(result.interval, stats.bootstrap_interval(naive))
    np.testing.assert_allclose(result.p_value, stats.bootstrap_p_value(naive))


def test_gap_difference_by_hand_and_tracking_is_detected():
    # Seeds' accuracies [net, lin θT, lin θ0]: means .75, .74, .87.
    accuracies = [[0.74, 0.73, 0.86], [0.76, 0.75, 0.88]]
    np.testing.assert_allclose(stats.gap_difference(accuracies), 0.01 - 0.12)
    # Synthetic: lin θT equals the network on all but 2% of examples, lin θ0
    # is right where the network is wrong on 15%: the gap difference is
    # negative with an interval below 0.
    rng = np.random.default_rng(6)
    seeds = []
    for _ in range(3):
        network = rng.random(360) < 0.75
        final = np.where(rng.random(360) < 0.02, ~network, network)
        initial = network | (rng.random(360) < 0.6)
        seeds.append(np.stack([network, final, initial]))
    result = stats.paired_bootstrap(np.stack(seeds), stats.gap_difference, num_resamples=2000)
    assert result.estimate < -0.1 and result.interval[1] < 0 and result.p_value < 0.01


def test_bootstrap_p_value_by_hand():
    samples = np.array([-1.0, 0.5, 1.0, 2.0, 3.0])
    # One sample ≤ 0: 2·(1 + 1)/6.
    np.testing.assert_allclose(stats.bootstrap_p_value(samples), 4 / 6)
    np.testing.assert_allclose(stats.bootstrap_p_value(np.ones(99)), 2 / 100)
    np.testing.assert_allclose(stats.bootstrap_interval(np.arange(101.0), 0.9), [5.0, 95.0])


# ---------------------------------------------------------------- power laws


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_fit_exponent_recovers_a_noisy_power_law(alpha):
    rng = np.random.RandomState(1)
    n = np.array([50, 91, 165, 299, 544, 987])
    values = 2.0 * n[:, None] ** -alpha * np.exp(0.1 * rng.normal(size=(len(n), 5)))
    fit = stats.fit_exponent(n, values, num_bootstrap=500)
    low, high = fit["alpha_interval"]
    assert abs(fit["alpha"] - alpha) < 0.05
    assert low < alpha < high and high - low < 0.2
    assert fit["sizes_used"] == n.tolist()
    # The point estimate is numpy's least-squares line through log(mean over seeds).
    slope = np.polyfit(np.log(n), np.log(values.mean(1)), 1)[0]
    np.testing.assert_allclose(fit["alpha"], -slope, rtol=1e-10)


def test_fit_exponent_exact_and_zero_errors():
    n = np.array([10.0, 100.0, 1000.0])
    exact = stats.fit_exponent(n, np.tile(n[:, None] ** -0.5, (1, 4)), num_bootstrap=50)
    np.testing.assert_allclose(exact["alpha"], 0.5, rtol=1e-10)
    np.testing.assert_allclose(exact["alpha_interval"], [0.5, 0.5], rtol=1e-10)
    np.testing.assert_allclose(exact["intercept"], 0.0, atol=1e-10)
    # All seeds at zero error at the largest n: dropped without a floor...
    values = np.array([[0.2, 0.3], [0.05, 0.04], [0.0, 0.0]])
    dropped = stats.fit_exponent(n, values, num_bootstrap=50)
    assert dropped["sizes_used"] == [10, 100]
    np.testing.assert_allclose(dropped["alpha"], -np.log10(0.045 / 0.25), rtol=1e-10)
    # ... or floored (half a test error of a 360-example test set).
    floored = stats.fit_exponent(n, values, floor=0.5 / 360, num_bootstrap=50)
    assert floored["sizes_used"] == [10, 100, 1000]
    assert np.isfinite(floored["alpha"]) and floored["alpha"] > dropped["alpha"]
    # Missing seeds (NaN) are ignored; fewer than two sizes give None.
    assert stats.fit_exponent(n, [[0.1, np.nan], [np.nan, np.nan], [0, 0]])["alpha"] is None


def _synthetic_errors(n, alpha, seeds, examples, rng, plateau_below=None):
    """0/1 test errors: P(error) = 0.6·(n/n_ref)^−α × a per-example difficulty × a seed effect.

    Below `plateau_below` the error stays at its value there (not a power law).
    """
    effective = np.maximum(n, plateau_below or 0)
    rate = 0.6 * (effective / effective[0]) ** -alpha
    difficulty = rng.uniform(0.5, 1.5, size=examples)  # mean 1, varies between examples
    seed_effect = np.exp(0.1 * rng.normal(size=(len(n), seeds)))
    p = np.clip(rate[:, None, None] * seed_effect[:, :, None] * difficulty, 0, 1)
    return (rng.uniform(size=p.shape) < p).astype(np.float64)


def test_windowed_fit_recovers_alpha_with_test_example_noise():
    rng = np.random.default_rng(3)
    n = np.geomspace(64, 16000, 9).round()
    errors = _synthetic_errors(n, 0.45, seeds=4, examples=2000, rng=rng, plateau_below=400)
    window = (400, None)  # where the curve is a power law
    fit = stats.fit_exponent(n, errors, window=window, floor=0.5 / 2000, num_bootstrap=1000)
    low, high = fit["alpha_interval"]
    assert low < 0.45 < high, fit
    assert high - low < 0.2
    assert fit["sizes_used"] == [int(v) for v in n if v >= 400]
    # The same data fitted over every size (plateau included) is biased out of its interval.
    everything = stats.fit_exponent(n, errors, floor=0.5 / 2000, num_bootstrap=1000)
    assert everything["alpha_interval"][1] < 0.45
    # Resampling seeds only ignores the test-example noise: a narrower interval.
    seeds_only = stats.fit_exponent(n, errors, window=window, num_bootstrap=1000,
                                    resample_examples=False)
    assert (seeds_only["alpha_interval"][1] - seeds_only["alpha_interval"][0]) < high - low
    # Per-example values reduce to the per-seed means for the point estimate.
    per_seed = stats.fit_exponent(n, errors.mean(2), window=window, num_bootstrap=10)
    np.testing.assert_allclose(per_seed["alpha"], fit["alpha"], rtol=1e-12)


def test_fit_exponent_window_and_missing_seeds_at_the_top():
    n = np.array([100.0, 200.0, 400.0, 800.0, 1600.0])
    values = np.tile((n ** -0.7)[:, None], (1, 5))
    values[-2:, 3:] = np.nan  # only three seeds at the top sizes
    fit = stats.fit_exponent(n, values, window=(200, 800), num_bootstrap=100)
    assert fit["sizes_used"] == [200, 400, 800] and fit["window"] == [200, 800]
    np.testing.assert_allclose(fit["alpha"], 0.7, rtol=1e-10)
    np.testing.assert_allclose(fit["alpha_interval"], [0.7, 0.7], rtol=1e-10)
    with pytest.raises(ValueError, match="window"):
        stats.fit_exponent(n, values, window=(800, 200))


def test_local_exponent_reads_the_slope_at_the_largest_sizes():
    n = np.geomspace(100, 10000, 7)
    # A slope of 1 up to n = 1000, then 0.3 (a bending curve).
    curve = np.where(n <= 1000, n ** -1.0, 1000 ** -0.7 * n ** -0.3)
    values = curve[:, None] * np.ones((1, 3))
    values[-1] = np.nan  # the largest size not run: the local slope uses the 3 before it
    local = stats.local_exponent(n, values, num_largest=3, num_bootstrap=50)
    np.testing.assert_allclose(local["alpha"], 0.3, rtol=1e-10)
    assert local["sizes_used"] == [int(v) for v in n[-4:-1]]


def test_paired_exponent_difference():
    rng = np.random.RandomState(2)
    n = np.array([50, 100, 200, 400, 800])
    # Seed effects shared by both methods (same subsets) cancel in a paired comparison.
    shared = np.exp(0.3 * rng.normal(size=(len(n), 6)))
    a = n[:, None] ** -0.9 * shared * np.exp(0.02 * rng.normal(size=shared.shape))
    b = 0.5 * n[:, None] ** -0.6 * shared * np.exp(0.02 * rng.normal(size=shared.shape))
    paired = stats.paired_exponent_difference(n, a, b, num_bootstrap=500)
    assert abs(paired["difference"] - 0.3) < 0.05
    low, high = paired["interval"]
    assert low < 0.3 < high and low > 0.2
    # The difference of the separate point estimates, narrower than their separate intervals.
    separate = [stats.fit_exponent(n, v, num_bootstrap=500) for v in (a, b)]
    np.testing.assert_allclose(paired["difference"],
                               separate[0]["alpha"] - separate[1]["alpha"], rtol=1e-10)
    assert high - low < separate[0]["alpha_interval"][1] - separate[0]["alpha_interval"][0]
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_exponent_difference(n, a, b[:, :3])


def test_paired_difference_with_shared_test_examples():
    rng = np.random.default_rng(5)
    n = np.geomspace(100, 6400, 7).round()
    # Two methods erring on the same hard examples (shared difficulty), α 0.6 and 0.4.
    difficulty = rng.uniform(0.5, 1.5, size=3000)
    uniforms = rng.uniform(size=(len(n), 3, 3000))  # common randomness: positively correlated

    def errors(alpha):
        rate = 0.5 * (n / n[0]) ** -alpha
        return (uniforms < np.clip(rate[:, None, None] * difficulty, 0, 1)).astype(float)

    paired = stats.paired_exponent_difference(n, errors(0.6), errors(0.4), num_bootstrap=500)
    low, high = paired["interval"]
    assert low < 0.2 < high and low > 0.1, paired


def test_size_seed_examples_places_each_cell_file_and_example_means_skip_missing():
    """Per-example files laid out by hand: a network cell's row, a kernel cell's rows named by
    n (a size off the grid dropped), an older kernel file with a row per grid size."""
    sizes = [10, 20, 40]
    files = {
        "network-seed0-n20": {"correct": np.array([1.0, 0.0, 1.0, 1.0])},
        "kernel-seed1": {"n": np.array([10, 40, 80]),
                         "correct": np.array([[0.0] * 4, [1.0] * 4, [0.5] * 4])},
        "old-seed2": {"correct": np.arange(12.0).reshape(3, 4)},
    }
    sources = [(("network-seed0-n20", 1), 0), (("kernel-seed1", None), 1),
               (("old-seed2", None), 2)]
    values = stats.size_seed_examples(files.__getitem__, sources, sizes, 3, 4, "correct")
    expected = np.full((3, 3, 4), np.nan)
    expected[1, 0] = [1, 0, 1, 1]
    expected[0, 1], expected[2, 1] = 0.0, 1.0
    expected[:, 2] = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(values, expected)
    assert stats.example_means(values) == [[None, 0.0, 1.5], [0.75, None, 5.5],
                                           [None, 1.0, 9.5]]
    with pytest.raises(ValueError, match="one row per grid size"):
        stats.size_seed_examples({"bad": {"correct": np.zeros((2, 4))}}.__getitem__,
                                 [(("bad", None), 0)], sizes, 1, 4, "correct")
