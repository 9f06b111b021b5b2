"""Tests of experiments/entk.py: the eNTK measurements of study A.

References: alignment, kernel distance and norms written out with numpy; the
eigenpairs and a_j of `Kernels` are checked against a naive float64 Jacobian in
tests/test_experiments.py (through study A's initial state, dense and Lanczos).
"""

import numpy as np
import pytest

from experiments import entk


def test_kernel_change_against_the_formulas():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    k0, kt = a @ a.T, b @ b.T + a @ a.T
    y = np.array([1.0, -1, 1, 1, -1, -1])
    change = entk.kernel_change(k0, kt, y)
    for name, k in (("init", k0), ("final", kt)):
        np.testing.assert_allclose(change["alignment"][name],
                                   y @ k @ y / (np.linalg.norm(k) * (y @ y)), rtol=1e-12)
        centering = np.eye(6) - 1 / 6
        kc, yc = centering @ k @ centering, centering @ y
        np.testing.assert_allclose(change["alignment_centered"][name],
                                   yc @ kc @ yc / (np.linalg.norm(kc) * (yc @ yc)), rtol=1e-10)
        assert change["trace"][name] == pytest.approx(np.trace(k), rel=1e-14)
    np.testing.assert_allclose(
        change["kernel_distance"],
        1 - np.sum(k0 * kt) / (np.linalg.norm(k0) * np.linalg.norm(kt)), rtol=1e-12)
    # One class: the centred alignment is undefined (None), the plain one is not.
    one_class = entk.kernel_change(k0, kt, np.ones(6))
    assert one_class["alignment_centered"] == {"init": None, "final": None}
    assert one_class["alignment"]["init"] == pytest.approx(
        np.sum(k0) / (np.linalg.norm(k0) * 6), rel=1e-12)


def test_weights_norm_and_solver_choice():
    assert entk.weights_norm([np.full((2, 2), 1.0), np.array([2.0])]) == pytest.approx(
        np.sqrt(4 + 4))
    assert entk.resolve_solver("auto", entk.DENSE_LIMIT) == "dense"
    assert entk.resolve_solver("auto", entk.DENSE_LIMIT + 1) == "lanczos"
    assert entk.resolve_solver("lanczos", 10) == "lanczos"
    with pytest.raises(ValueError, match="Received: solver='qr'"):
        entk.resolve_solver("qr", 10)


def test_weight_change_against_hand_computed_distances():
    theta0 = [np.array([[1.0, 2.0]], np.float32), np.array([2.0], np.float32)]
    theta_t = [np.array([[4.0, 2.0]], np.float32), np.array([6.0], np.float32)]
    # θT − θ0 = (3, 0, 4): ‖θT − θ0‖ = 5; ‖θ0‖ = √(1 + 4 + 4) = 3.
    assert entk.weight_change(theta0, theta_t) == pytest.approx(
        {"weight_distance": 5.0, "weight_distance_squared": 25.0,
         "relative_weight_distance": 5.0 / 3.0})
