"""Paired statistics over the same test examples, seeds aggregated as seeds; power-law fits.

Two models scored on the same test examples are compared example by example,
not as two independent proportions:

* `mcnemar_exact(a_correct, b_correct)`: the exact McNemar test. Of the
  discordant examples (one model right, the other wrong), under H0 each is
  equally likely to favour either model, so the count favouring A is
  Binomial(b + c, 1/2); the two-sided p-value is
  min(1, 2·P(X ≤ min(b, c))), which is what `scipy.stats.binomtest(b, b + c)`
  returns for p = 1/2 (computed here in exact integer arithmetic).
* `mcnemar_over_seeds`: per-seed tests plus a pooled test on the discordant
  counts summed over seeds (stated in the result).
* `paired_bootstrap(correct, statistic)`: resamples test examples (the same
  indices for every seed and model, so pairing is kept), evaluates the
  statistic on per-seed accuracies averaged over seeds, and returns the
  estimate, a percentile interval and a two-sided p-value for "statistic = 0".
  `gap_difference` is the statistic of study A's tracking rule.
* `mcnemar_detectable_difference`: the smallest accuracy difference the
  McNemar test detects at level α with the given power, for n pairs and a
  discordance rate; `compare_paired` uses it to call a non-significant
  comparison a "tie" (it had the power to see a difference of `margin`) or
  "inconclusive" (it had not); `pairwise_mcnemar` tests every pair of models
  under each condition (study C's architectures at each depth).

Seeds as seeds: accuracies are computed per seed over that seed's test
predictions, then averaged over seeds; test examples are never pooled across
seeds as if they were more examples.
"""

import collections
import math
from fractions import Fraction

import numpy as np

McNemarResult = collections.namedtuple(
    "McNemarResult", ["p_value", "a_only", "b_only", "n", "difference"])
McNemarResult.__doc__ = """Exact McNemar test of two models on the same n examples.

p_value: two-sided exact binomial p on the discordant pairs. a_only: examples
only A got right. b_only: only B. difference: (a_only − b_only)/n, the
accuracy difference acc(A) − acc(B).
"""

BootstrapResult = collections.namedtuple(
    "BootstrapResult", ["estimate", "interval", "p_value", "num_resamples", "confidence"])


def _as_correct(values, name):
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"Expected a 1-D array of per-example correctness. "
                         f"Received: {name} with shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"Expected {name} to hold 0/1 or booleans. "
                         f"Received: {name} with values {np.unique(array)[:5]}")
    return array.astype(bool)


def binomial_two_sided_half(successes, trials):
    """Exact two-sided p-value of `successes` in `trials` under Binomial(trials, 1/2).

    p = min(1, 2·Σ_{i ≤ min(s, t−s)} C(t, i) / 2^t), in exact integer
    arithmetic (no floating-point tail sums).
    """
    successes, trials = int(successes), int(trials)
    if not 0 <= successes <= trials:
        raise ValueError(f"Expected 0 <= successes <= trials. "
                         f"Received: successes={successes}, trials={trials}")
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, i) for i in range(min(successes, trials - successes) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**trials)))


def mcnemar_exact(a_correct, b_correct):
    """Exact McNemar test of models A and B on the same test examples.

    Args:
        a_correct, b_correct: (n,) booleans or 0/1, example i correct for A / B.

    Returns:
        `McNemarResult(p_value, a_only, b_only, n, difference)`.
    """
    a = _as_correct(a_correct, "a_correct")
    b = _as_correct(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(f"Expected a_correct and b_correct on the same examples. "
                         f"Received: shapes {a.shape} and {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return McNemarResult(binomial_two_sided_half(a_only, a_only + b_only), a_only, b_only,
                         len(a), (a_only - b_only) / max(len(a), 1))


def mcnemar_over_seeds(a_correct_per_seed, b_correct_per_seed):
    """McNemar per seed, and pooled over seeds.

    The pooled test is the exact binomial test on the discordant counts summed
    over seeds. It treats every seed's discordant pairs as independent; seeds
    share the test examples, so an example that flips in every seed counts
    once per seed (read the per-seed p-values and `seeds_agreeing` next to it).

    Args:
        a_correct_per_seed, b_correct_per_seed: sequences (one entry per seed)
            of per-example correctness on the same test examples.

    Returns:
        A dict: `per_seed` (list of McNemarResult), `pooled` (McNemarResult
        on summed counts, n = examples × seeds), `difference` (mean over seeds
        of acc(A) − acc(B)), `seeds_agreeing` (seeds whose difference has the
        sign of the mean difference).
    """
    if len(a_correct_per_seed) != len(b_correct_per_seed) or not len(a_correct_per_seed):
        raise ValueError(f"Expected the same, nonzero number of seeds for A and B. Received: "
                         f"{len(a_correct_per_seed)} and {len(b_correct_per_seed)} seeds")
    per_seed = [mcnemar_exact(a, b) for a, b in zip(a_correct_per_seed, b_correct_per_seed)]
    a_only = sum(r.a_only for r in per_seed)
    b_only = sum(r.b_only for r in per_seed)
    n = sum(r.n for r in per_seed)
    difference = float(np.mean([r.difference for r in per_seed]))
    pooled = McNemarResult(binomial_two_sided_half(a_only, a_only + b_only), a_only, b_only,
                           n, difference)
    agreeing = sum(np.sign(r.difference) == np.sign(difference) for r in per_seed)
    return {"per_seed": per_seed, "pooled": pooled, "difference": difference,
            "seeds_agreeing": int(agreeing)}


def _normal_quantile(q):
    from scipy import stats

    return float(stats.norm.ppf(q))


def mcnemar_detectable_difference(n, discordance, *, alpha=0.05, power=0.8):
    """Smallest |acc(A) − acc(B)| McNemar detects with probability `power`.

    Normal approximation (Connor, 1987): with n pairs, discordance rate
    p_d = (b + c)/n and difference δ = (b − c)/n, the test at two-sided level
    α has power 1 − β when
        √n·δ = z_{1−α/2}·√p_d + z_{1−β}·√(p_d − δ²).
    Solved for δ by bisection on (0, √p_d]. The discordance rate should be the
    observed one (or an assumed one before any data).

    Args:
        n: number of paired examples (examples × seeds for a pooled test).
        discordance: p_d in (0, 1].
        alpha, power: the test's level and the wanted power.

    Returns:
        δ in (0, 1], or `inf` when no difference is detectable (p_d = 0 means
        the models never disagreed: any difference is 0 and nothing can be
        detected; n too small).
    """
    if n <= 0 or not 0 <= discordance <= 1:
        raise ValueError(f"Expected n > 0 and 0 <= discordance <= 1. "
                         f"Received: n={n}, discordance={discordance}")
    if discordance == 0:
        return math.inf
    z_alpha, z_beta = _normal_quantile(1 - alpha / 2), _normal_quantile(power)

    def excess(delta):
        return (math.sqrt(n) * delta - z_alpha * math.sqrt(discordance)
                - z_beta * math.sqrt(max(discordance - delta * delta, 0.0)))

    high = math.sqrt(discordance)
    if excess(high) < 0:
        return math.inf
    low = 0.0
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if excess(middle) < 0 else (low, middle)
    return high


def pairwise_mcnemar(correct, conditions, *, condition="depth", alpha=0.05, power=0.8):
    """Exact McNemar test of every pair of models under each condition, with its power.

    `detectable_difference`: the accuracy difference the test detects with
    probability `power` at level `alpha`, given the number of test examples
    and the observed rate of disagreement (`mcnemar_detectable_difference`;
    None when the two never disagree: no difference is detectable).

    Args:
        correct: {model: [per condition, per test example: correct?]}.
        conditions: the conditions (e.g. depths), in the order of the lists.
        condition: the key naming a condition in each result.

    Returns:
        [{"a", "b", condition, "n", "accuracy_difference", "a_only_correct",
        "b_only_correct", "p_value", "detectable_difference", "alpha",
        "power"}] for every pair a before b in `correct`'s order.
    """
    names = list(correct)
    tests = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for k, value in enumerate(conditions):
                result = mcnemar_exact(correct[a][k], correct[b][k])
                detectable = mcnemar_detectable_difference(
                    result.n, (result.a_only + result.b_only) / result.n, alpha=alpha,
                    power=power)
                tests.append({
                    "a": a, "b": b, condition: value, "n": int(result.n),
                    "accuracy_difference": float(result.difference),
                    "a_only_correct": int(result.a_only), "b_only_correct": int(result.b_only),
                    "p_value": float(result.p_value),
                    "detectable_difference": detectable if math.isfinite(detectable) else None,
                    "alpha": alpha, "power": power,
                })
    return tests


def compare_paired(a_correct_per_seed, b_correct_per_seed, *, alpha=0.05, power=0.8,
                   margin=0.02):
    """Win / loss / tie / inconclusive of A against B, by exact McNemar over seeds.

    Rule: the pooled McNemar p < α → "a" or "b" (the direction of the summed
    discordant counts). Otherwise "tie" when the test had `power` to detect a
    difference of `margin` (the detectable difference at the observed
    discordance is ≤ margin), else "inconclusive".

    Returns:
        A dict: `outcome`, `p_value` (pooled), `p_values_per_seed`,
        `difference` (mean over seeds of acc(A) − acc(B)), `a_only`, `b_only`
        (summed), `n` (examples × seeds), `seeds_agreeing`, `num_seeds`,
        `detectable_difference`, `alpha`, `power`, `margin`, `test`.
    """
    over = mcnemar_over_seeds(a_correct_per_seed, b_correct_per_seed)
    pooled = over["pooled"]
    discordance = (pooled.a_only + pooled.b_only) / pooled.n
    detectable = mcnemar_detectable_difference(pooled.n, max(discordance, 1.0 / pooled.n),
                                               alpha=alpha, power=power)
    if pooled.p_value < alpha:
        outcome = "a" if pooled.a_only > pooled.b_only else "b"
    else:
        outcome = "tie" if detectable <= margin else "inconclusive"
    return {
        "outcome": outcome,
        "p_value": pooled.p_value,
        "p_values_per_seed": [r.p_value for r in over["per_seed"]],
        "difference": over["difference"],
        "a_only": pooled.a_only,
        "b_only": pooled.b_only,
        "n": pooled.n,
        "seeds_agreeing": over["seeds_agreeing"],
        "num_seeds": len(over["per_seed"]),
        "detectable_difference": float(detectable),
        "alpha": alpha, "power": power, "margin": margin,
        "test": "exact McNemar, discordant counts summed over seeds",
    }


def bootstrap_interval(samples, confidence=0.95):
    """Percentile interval [q_{(1−c)/2}, q_{(1+c)/2}] of bootstrap samples."""
    samples = np.asarray(samples, dtype=np.float64)
    tail = 100 * (1 - confidence) / 2
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def bootstrap_p_value(samples, null=0.0):
    """Two-sided bootstrap p-value of H0: statistic = null.

    p = min(1, 2·min(1 + #{s ≤ null}, 1 + #{s ≥ null}) / (B + 1)): the
    smallest α at which the percentile interval excludes `null` (with the +1
    correction, so p is never 0).
    """
    samples = np.asarray(samples, dtype=np.float64)
    below = 1 + np.sum(samples <= null)
    above = 1 + np.sum(samples >= null)
    return float(min(1.0, 2 * min(below, above) / (len(samples) + 1)))


def gap_difference(accuracies):
    """Study A's tracking statistic from (seeds, 3) accuracies [net, lin θT, lin θ0].

    |acc(lin θT) − acc(net)| − |acc(lin θ0) − acc(net)| with each accuracy the
    mean over seeds; negative: the linearization at θT is closer to the
    network than the one at θ0.
    """
    network, final, initial = np.mean(np.asarray(accuracies, np.float64), axis=0)
    return abs(final - network) - abs(initial - network)


def paired_bootstrap(correct, statistic, *, num_resamples=10000, confidence=0.95, seed=0):
    """Paired bootstrap over test examples within seeds, seeds aggregated as seeds.

    Each resample draws n test-example indices with replacement and uses the
    same indices for every seed and model (the test set is shared, so the
    pairing between models and the correlation between seeds are kept);
    per-seed, per-model accuracies on the resample go to `statistic`.

    Args:
        correct: (seeds, models, n) booleans or 0/1: seed s, model m, example i.
        statistic: function of a (seeds, models) array of accuracies to a float
            (e.g. `gap_difference`; it averages over seeds itself).
        num_resamples: bootstrap resamples B.
        confidence: of the percentile interval.
        seed: of the resampling.

    Returns:
        `BootstrapResult(estimate, interval, p_value, num_resamples,
        confidence)`: the statistic on the data, the percentile interval, and
        `bootstrap_p_value` of statistic = 0.
    """
    correct = np.asarray(correct)
    if correct.ndim != 3 or correct.shape[2] == 0:
        raise ValueError(f"Expected correctness of shape (seeds, models, examples). "
                         f"Received: shape {correct.shape}")
    correct = correct.astype(np.float64)
    n = correct.shape[2]
    estimate = float(statistic(correct.mean(axis=2)))
    rng = np.random.default_rng(seed)
    samples = np.empty(num_resamples)
    chunk = max(1, int(2**22 // max(correct.shape[0] * correct.shape[1] * n, 1)))
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        # Counts of each example in each resample: accuracies as weighted means.
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                           for _ in range(stop - start)]).astype(np.float64)
        accuracies = np.einsum("smn,bn->bsm", correct, counts) / n
        samples[start:stop] = [statistic(a) for a in accuracies]
    return BootstrapResult(estimate, bootstrap_interval(samples, confidence),
                           bootstrap_p_value(samples), num_resamples, confidence)


# ---------------------------------------------------------------- power laws (study B)
# A quantity measured at sizes n_k on seeds s and test examples t, v[k, s, t]
# (a test example's 0/1 error or its loss), is summarized by the mean over
# seeds of each seed's mean over examples, m_k, and fitted as m_k ∝ n_k^−α by
# least squares of log m_k on log n_k over the sizes inside a stated window.
# Intervals come from a bootstrap that resamples seeds AND test examples:
# one draw of seed indices and one of example indices per resample, shared by
# every size (a seed's subsets are nested in n and the test set is the same at
# every n) and, for paired differences, by both methods.


def size_seed_examples(load, sources, sizes, num_seeds, num_test, key):
    """(K, S, T) per-example values of one method from its cells' files (NaN: missing).

    `load(cell_id)` reads a cell's per-example arrays (an .npz); `sources`:
    ((cell id, size row or None), seed column). A file without a row names
    its rows by `n` (values at sizes outside `sizes` are left out); files
    written before that hold a row per size of `sizes`.
    """
    out = np.full((len(sizes), num_seeds, num_test), np.nan)
    for (cell_id, row), column in sources:
        arrays = load(cell_id)
        if row is not None:
            out[row, column] = arrays[key]
        elif "n" in arrays:
            for n, values in zip(arrays["n"], arrays[key]):
                if int(n) in sizes:
                    out[sizes.index(int(n)), column] = values
        elif len(arrays[key]) == len(sizes):
            out[:, column] = arrays[key]
        else:
            raise ValueError(
                f"Expected the per-example file of cell {cell_id!r} to hold one row per grid "
                f"size ({len(sizes)}). Received: rows={len(arrays[key])}")
    return out


def example_means(values):
    """(K, S) means over test examples of (K, S, T) values as lists (None: not all finite)."""
    means = np.where(np.all(np.isfinite(values), axis=2), values.mean(axis=2), np.nan)
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in means]


def _as_size_seed_example(values, n, name):
    values = np.asarray(values, np.float64)
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim != 3 or values.shape[0] != len(n) or values.shape[2] == 0:
        raise ValueError(
            f"Expected {name} of shape (len(n), seeds) or (len(n), seeds, test examples). "
            f"Received: {name}.shape={values.shape}, len(n)={len(n)}"
        )
    return values


def _window_mask(n, window):
    if window is None:
        return np.ones(len(n), bool)
    low, high = window
    low = -np.inf if low is None else low
    high = np.inf if high is None else high
    if low > high:
        raise ValueError(f"Expected window (low, high) with low <= high. Received: window={window}")
    return (n >= low) & (n <= high)


def _size_means(values, seed_weights, example_weights):
    """(K, B) means over seeds (weights (S, B)) of per-seed example means (weights (T, B)).

    A (size, seed) with no finite values (a seed not run at that size) is
    left out of that size's mean; a size with none left gives NaN.
    """
    present = np.all(np.isfinite(values), axis=2)  # (K, S)
    filled = np.where(np.isfinite(values), values, 0.0)
    per_seed = np.einsum("kst,tb->ksb", filled, example_weights) / example_weights.sum(0)
    weights = present[:, :, None] * seed_weights[None]  # (K, S, B)
    total = weights.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights * per_seed).sum(1) / total, np.nan)


def _slopes(log_n, means, usable):
    """Least-squares −slope and intercept of log(means) on log n per column, over `usable`."""
    counts = usable.sum(0)
    x = np.where(usable, log_n[:, None], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(usable, np.log(np.where(usable, means, 1.0)), 0.0)
        x_mean, y_mean = x.sum(0) / counts, y.sum(0) / counts
        dx = np.where(usable, log_n[:, None] - x_mean, 0.0)
        slope = (dx * (y - y_mean)).sum(0) / (dx * dx).sum(0)
    slope = np.where(counts >= 2, slope, np.nan)
    return -slope, y_mean - slope * x_mean


def _bootstrap_weights(rng, num_seeds, num_examples, num_bootstrap, resample_examples):
    seeds = np.stack([np.bincount(rng.integers(0, num_seeds, num_seeds), minlength=num_seeds)
                      for _ in range(num_bootstrap)], axis=1).astype(np.float64)
    if resample_examples and num_examples > 1:
        examples = np.stack([np.bincount(rng.integers(0, num_examples, num_examples),
                                         minlength=num_examples)
                             for _ in range(num_bootstrap)], axis=1).astype(np.float64)
    else:
        examples = np.ones((num_examples, num_bootstrap))
    return seeds, examples


def _usable(means, floor, in_window):
    if floor > 0:
        means = np.where(np.isfinite(means), np.maximum(means, floor), means)
    return means, np.isfinite(means) & (means > 0) & in_window[:, None]


def fit_exponent(n, values, *, window=None, floor=0.0, num_bootstrap=2000, confidence=0.95,
                 seed=0, resample_examples=True):
    """Fits mean value ∝ n^−α over a window of sizes, with a seeds × examples bootstrap.

    The point estimate is the least-squares slope of log m_k on log n_k over
    the sizes n_k inside `window` whose mean m_k (over seeds of per-seed means
    over test examples) is usable. Means at or below `floor` are raised to it
    when it is positive (e.g. half a test error, for zero errors) and dropped
    otherwise. The interval: `num_bootstrap` resamples of the seeds and of
    the test examples (each shared by all sizes), refitted on the sizes usable
    in the point estimate; the central `confidence` percentile interval.

    Args:
        n: the sizes, shape (K,).
        values: (K, S) per size and seed, or (K, S, T) per size, seed and test
            example; NaN marks a (size, seed) not run.
        window: (low, high) sizes included in the fit (None ends: open);
            None: every size.
        floor: the smallest value a mean may take (0: drop non-positive means).
        num_bootstrap: bootstrap resamples.
        confidence: the interval's coverage.
        seed: seed of the resampling.
        resample_examples: also resample test examples (with (K, S, T) values).

    Returns:
        dict(alpha, alpha_interval [lo, hi], intercept, sizes_used, window,
        num_bootstrap); alpha None when fewer than two sizes are usable.
    """
    n = np.asarray(n, np.float64)
    values = _as_size_seed_example(values, n, "values")
    in_window = _window_mask(n, window)
    ones = (np.ones((values.shape[1], 1)), np.ones((values.shape[2], 1)))
    means, keep = _usable(_size_means(values, *ones), floor, in_window)
    keep = keep[:, 0]
    result = dict(alpha=None, alpha_interval=[None, None], intercept=None,
                  sizes_used=[int(v) for v in n[keep]],
                  window=None if window is None else [window[0], window[1]],
                  num_bootstrap=int(num_bootstrap))
    if keep.sum() < 2:
        return result
    log_n = np.log(n)
    alpha, intercept = _slopes(log_n, means, keep[:, None])
    rng = np.random.default_rng(seed)
    seed_weights, example_weights = _bootstrap_weights(
        rng, values.shape[1], values.shape[2], num_bootstrap, resample_examples)
    boot, ok = _usable(_size_means(values, seed_weights, example_weights), floor, in_window)
    alphas, _ = _slopes(log_n, boot, ok & keep[:, None])
    alphas = alphas[np.isfinite(alphas)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(alphas, [tail, 100 - tail])
    result.update(alpha=float(alpha[0]), intercept=float(intercept[0]),
                  alpha_interval=[float(low), float(high)])
    return result


def local_exponent(n, values, *, num_largest=3, **kwargs):
    """`fit_exponent` over the `num_largest` largest sizes that have values (the local slope).

    Returns:
        `fit_exponent`'s dict, its `window` the sizes spanned.
    """
    n = np.asarray(n, np.float64)
    measured = _as_size_seed_example(values, n, "values")
    has = np.any(np.all(np.isfinite(measured), axis=2), axis=1)
    sizes = n[has][-num_largest:]
    if len(sizes) < 2:
        return fit_exponent(n, values, window=(np.inf, np.inf), **kwargs)
    return fit_exponent(n, values, window=(float(sizes[0]), float(sizes[-1])), **kwargs)


def paired_exponent_difference(n, values_a, values_b, *, window=None, floor=0.0,
                               num_bootstrap=2000, confidence=0.95, seed=0,
                               resample_examples=True):
    """α_a − α_b of two methods measured on the same seeds and test examples.

    Seeds pair the methods (same θ0 and training subsets) and so do the test
    examples: each resample draws one set of seed indices and one of example
    indices and uses them for both methods at every size. A size is used
    where both methods have a usable mean inside `window`. Only compare
    exponents of the same quantity (never a cross-entropy against an MSE).

    Args:
        n: the sizes, shape (K,).
        values_a, values_b: (K, S) or (K, S, T), the same seeds and examples.
        window, floor, num_bootstrap, confidence, seed, resample_examples: as
            in `fit_exponent`.

    Returns:
        dict(difference, interval [lo, hi], sizes_used); None entries when
        fewer than two sizes are usable.
    """
    n = np.asarray(n, np.float64)
    a = _as_size_seed_example(values_a, n, "values_a")
    b = _as_size_seed_example(values_b, n, "values_b")
    if a.shape != b.shape:
        raise ValueError(
            "Expected values_a and values_b of the same shape (len(n), seeds[, examples]). "
            f"Received: values_a.shape={a.shape}, values_b.shape={b.shape}"
        )
    in_window = _window_mask(n, window)
    log_n = np.log(n)

    def differences(seed_weights, example_weights, keep=None):
        means = [_usable(_size_means(v, seed_weights, example_weights), floor, in_window)
                 for v in (a, b)]
        ok = means[0][1] & means[1][1]
        if keep is not None:
            ok &= keep[:, None]
        return _slopes(log_n, means[0][0], ok)[0] - _slopes(log_n, means[1][0], ok)[0], ok

    point, ok = differences(np.ones((a.shape[1], 1)), np.ones((a.shape[2], 1)))
    keep = ok[:, 0]
    if keep.sum() < 2:
        return dict(difference=None, interval=[None, None], sizes_used=[])
    rng = np.random.default_rng(seed)
    draws, _ = differences(*_bootstrap_weights(rng, a.shape[1], a.shape[2], num_bootstrap,
                                               resample_examples), keep)
    draws = draws[np.isfinite(draws)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return dict(difference=float(point[0]), interval=[float(low), float(high)],
                sizes_used=[int(v) for v in n[keep]])


def scaling_fits(n, errors, losses, *, window=None, floor=0.0, local_points=3,
                 num_bootstrap=2000):
    """A method's power laws: error and loss exponents over `window` and over the largest sizes.

    Args:
        n: the sizes, shape (K,).
        errors, losses: (K, S, T) per size, seed and test example (NaN: not run).
        window: the fit window (`fit_exponent`).
        floor: the error floor (half a test error); losses are not floored.
        local_points: the local exponents use this many largest sizes.
        num_bootstrap: resamples of seeds and test examples.

    Returns:
        dict of the results.json entries: alpha, alpha_interval, alpha_loss,
        alpha_loss_interval, fit_sizes_error, fit_sizes_loss, intercept,
        intercept_loss, local_alpha, local_alpha_interval, local_alpha_sizes,
        local_alpha_loss, local_alpha_loss_interval.
    """
    error = fit_exponent(n, errors, window=window, floor=floor, num_bootstrap=num_bootstrap)
    loss = fit_exponent(n, losses, window=window, num_bootstrap=num_bootstrap)
    error_local = local_exponent(n, errors, num_largest=local_points, floor=floor,
                                 num_bootstrap=num_bootstrap)
    loss_local = local_exponent(n, losses, num_largest=local_points, num_bootstrap=num_bootstrap)
    return {
        "alpha": error["alpha"], "alpha_interval": error["alpha_interval"],
        "alpha_loss": loss["alpha"], "alpha_loss_interval": loss["alpha_interval"],
        "fit_sizes_error": error["sizes_used"], "fit_sizes_loss": loss["sizes_used"],
        "intercept": error["intercept"], "intercept_loss": loss["intercept"],
        "local_alpha": error_local["alpha"],
        "local_alpha_interval": error_local["alpha_interval"],
        "local_alpha_sizes": error_local["sizes_used"],
        "local_alpha_loss": loss_local["alpha"],
        "local_alpha_loss_interval": loss_local["alpha_interval"],
    }


def exponent_comparisons(n, reference, others, *, floor=0.0, compare_loss=True,
                         num_bootstrap=2000):
    """Paired α_reference − α_method for every other method, over that method's window.

    Args:
        n: the sizes, shape (K,).
        reference: dict(test_error, test_loss) of (K, S, T) arrays (the network).
        others: name → dict(test_error, test_loss, window), the same seeds and examples.
        floor: the error floor.
        compare_loss: also the loss exponents (only when both are the same loss).
        num_bootstrap: resamples of seeds and test examples.

    Returns:
        name → dict(alpha[, alpha_loss]) of `paired_exponent_difference` results.
    """
    out = {}
    for name, method in others.items():
        window = method["window"]
        entry = {"alpha": paired_exponent_difference(
            n, reference["test_error"], method["test_error"], window=window, floor=floor,
            num_bootstrap=num_bootstrap)}
        if compare_loss:
            entry["alpha_loss"] = paired_exponent_difference(
                n, reference["test_loss"], method["test_loss"], window=window,
                num_bootstrap=num_bootstrap)
        out[name] = entry
    return out
