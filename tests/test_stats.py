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
