"""Tests of experiments/phase_diagram.py: study C's analysis of infinite-width NTKs.

References: an arc-cosine NTK recursion written here in numpy, gradient flow by the
matrix exponential (scipy), closed-form targets, and the depth scale ξ* of
`keras_ntk.mean_field` that the spread of the mean predictor must follow.
"""

import math

import numpy as np
import pytest

from experiments import phase_diagram


def _reference_relu_ntk(x, depth, sigma_w2, sigma_b2):
    """The arc-cosine NTK recursion in numpy (independent of keras_ntk.infinite)."""
    k = x @ x.T / x.shape[1]
    k = sigma_w2 * k + sigma_b2
    theta = k.copy()
    for _ in range(depth):
        d = np.sqrt(np.diag(k))
        c = np.clip(k / np.outer(d, d), -1, 1)
        angle = np.arccos(c)
        k_new = np.outer(d, d) / (2 * np.pi) * (np.sin(angle) + (np.pi - angle) * c)
        derivative = (np.pi - angle) / (2 * np.pi)
        k = sigma_w2 * k_new + sigma_b2
        theta = k + sigma_w2 * theta * derivative
    return theta


def test_phase_row_matches_a_numpy_reference():
    import scipy.linalg

    rng = np.random.RandomState(0)
    x = rng.normal(size=(30, 24))  # 24 features: the depth-0 (linear) kernel has full rank.
    labels = rng.randint(0, 3, size=30)
    n = 20
    depths = [0, 2, 3]
    row = phase_diagram.phase_row("relu", 1.5, 0.05, depths, x[:n], x[n:], labels[:n],
                                 labels[n:], 3, [1.0, 10.0], 0.5)
    for depth, cell in zip(depths, row["cells"]):
        theta = _reference_relu_ntk(x, depth, 1.5, 0.05)
        k, k_test = theta[:n, :n], theta[n:, :n]
        eigenvalues = np.linalg.eigvalsh(k)
        assert cell["condition_number"] == pytest.approx(eigenvalues[-1] / eigenvalues[0],
                                                         rel=1e-6)
        # Gradient flow from f0 = 0 on raw one-hot targets, by the matrix exponential.
        y = np.eye(3)[labels[:n]]
        rate = 0.5 * 2 * y.size / eigenvalues[-1]
        for i, t in enumerate((1.0, 10.0)):
            decay = scipy.linalg.expm(-rate * t / y.size * k)
            f_train = y - decay @ y
            f_test = k_test @ np.linalg.solve(k, f_train)
            assert cell["train_loss"][i] == pytest.approx(
                np.sum((f_train - y) ** 2) / (2 * y.size), rel=1e-6)
            assert cell["gd_test_accuracy"][i] == pytest.approx(
                np.mean(np.argmax(f_test, 1) == labels[n:]))
        mean = k_test @ np.linalg.solve(k, y)
        assert cell["mean_predictor"]["test_accuracy"] == pytest.approx(
            np.mean(np.argmax(mean, 1) == labels[n:]))
        centred = y - y.mean(0)
        mean = k_test @ np.linalg.solve(k, centred)
        test_targets = np.eye(3)[labels[n:]] - y.mean(0)
        assert cell["mean_predictor"]["test_output_spread"] == pytest.approx(
            np.linalg.norm(mean - mean.mean(0))
            / np.linalg.norm(test_targets - test_targets.mean(0)), rel=1e-6)


def test_targets_raw_for_the_heatmap_centred_by_the_training_mean_for_the_spread():
    # Imbalanced: 7 of class 0, 2 of class 1, 1 of class 2 (1/C would be the wrong mean).
    train = np.array([0] * 7 + [1, 1, 2])
    raw = phase_diagram.heatmap_targets(train, 3)
    np.testing.assert_array_equal(raw, np.eye(3)[train])
    centred = phase_diagram.centred_targets(train, 3, train)
    np.testing.assert_allclose(centred.sum(axis=0), 0, atol=1e-15)
    np.testing.assert_allclose(centred[0], [1 - 0.7, -0.2, -0.1])
    test = np.array([2, 1])
    np.testing.assert_allclose(phase_diagram.centred_targets(test, 3, train),
                               [[-0.7, -0.2, 0.9], [-0.7, 0.8, -0.1]])
    # A constant kernel predicts the training mean: the centred spread analysis sees
    # nothing (0), the raw heatmap sees one class for every input (the majority, 0).
    k = np.ones((10, 10)) + 1e-3 * np.eye(10)
    k_test = np.ones((2, 10))
    cell = phase_diagram.phase_depth(k, k_test, 1.0, train, test, 3, [1.0], 1.0)
    assert cell["mean_predictor"]["test_accuracy"] == 0.0  # Both predicted as class 0.
    assert cell["mean_predictor"]["test_output_spread"] < 1e-12


def test_efold_length_fits_the_deepest_depths_above_noise():
    depths = np.arange(0, 40, 2)
    spread = 3.0 * np.exp(-depths / 2.5)
    variation = np.where(depths <= 30, 1e-3, 1e-15)  # Beyond 30: float64 noise.
    spread[depths > 30] = 1.0  # Whatever rounding gives there is ignored.
    length, used = phase_diagram.efold_length(depths, list(spread), list(variation))
    assert used == [24, 26, 28, 30]
    assert length == pytest.approx(2.5, rel=1e-9)


@pytest.mark.parametrize("sigma_w2", [2.5, 3.0])
def test_spread_decays_on_the_depth_scale_xi_star(sigma_w2):
    # Erf, σb² = 0.18, chaotic phase: the spread of P(Θ)Y on centred targets, fitted over
    # the deepest depths above float64 noise, falls e-fold every ξ* layers (within 25%).
    from experiments import data as data_lib
    from keras_ntk import mean_field

    data = data_lib.load_dataset("digits", num_train=64, num_test=64)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64)
    depths = list(range(0, 61, 5))
    row = phase_diagram.phase_row("erf", sigma_w2, 0.18, depths, flat(data.train.x),
                                 flat(data.test.x), data.train.y, data.test.y, 10, [1.0], 1.0)
    spread = [c["mean_predictor"]["test_output_spread"] for c in row["cells"]]
    variation = [c["kernel_variation"] for c in row["cells"]]
    length, used = phase_diagram.efold_length(depths, spread, variation)
    xi_star = mean_field.xi_star("erf", sigma_w2, 0.18)
    assert len(used) == 4 and used[-1] >= 50
    assert length == pytest.approx(xi_star, rel=0.25)
    # −1/log χc*, the scale the study used before, is off by far more.
    assert abs(-1 / math.log(mean_field.chi_c_star("erf", sigma_w2, 0.18)) - length) > length


def test_spectrum_summary_flags_the_float64_bound():
    singular = np.ones((5, 5))  # Rank one: λmin is rounding noise.
    _, summary = phase_diagram.spectrum_summary(singular)
    assert summary["condition_at_float64_bound"]
    assert summary["condition_number"] == pytest.approx(1 / np.finfo(np.float64).eps, rel=1e-6)
    _, summary = phase_diagram.spectrum_summary(np.diag([1.0, 2.0, 4.0]))
    assert not summary["condition_at_float64_bound"] and summary["condition_number"] == 4.0
