"""Tests of keras_ntk.mean_field against closed forms (ReLU), Gauss–Hermite
quadrature of the expectations, and float64 numpy iterations of the q- and
c-maps (slopes by finite differences, decay rates read off the iteration)."""
import math

import numpy as np
import pytest
import scipy.special

from keras_ntk import mean_field


_Z, _W = np.polynomial.hermite_e.hermegauss(100)
_W = _W / _W.sum()
_Z1, _Z2 = np.meshgrid(_Z, _Z, indexing="ij")
_W2 = np.outer(_W, _W)


def _gauss(fn, q, c=None):
    """E[fn(u)] (or E[fn(u, v)], correlation c) for variance q, Gauss–Hermite."""
    if c is None:
        return float(np.sum(_W * fn(math.sqrt(q) * _Z)))
    u = math.sqrt(q) * _Z1
    v = math.sqrt(q) * (c * _Z1 + math.sqrt(max(1 - c * c, 0.0)) * _Z2)
    return float(np.sum(_W2 * fn(u, v)))


def _erf_prime(z):
    return 2 / math.sqrt(math.pi) * np.exp(-z * z)


def _numpy_q_star(w2, b2, layers=400):
    """The variance map iterated in float64 by quadrature (no closed form)."""
    q = 1.0
    for _ in range(layers):
        q = w2 * _gauss(lambda u: scipy.special.erf(u) ** 2, q) + b2
    return q


def _numpy_c_map(w2, b2, q):
    return lambda c: (w2 * _gauss(lambda u, v: scipy.special.erf(u) * scipy.special.erf(v),
                                  q, c) + b2) / q


@pytest.mark.parametrize("w2,b2", [(1.0, 0.05), (2.5, 0.05), (4.0, 0.3)])
def test_erf_by_quadrature(w2, b2):
    q = mean_field.q_star("erf", w2, b2)
    np.testing.assert_allclose(q, w2 * _gauss(lambda u: scipy.special.erf(u) ** 2, q) + b2,
                               rtol=1e-7)
    chi = mean_field.chi1("erf", w2, b2)
    np.testing.assert_allclose(chi, w2 * _gauss(lambda u: _erf_prime(u) ** 2, q), rtol=1e-6)
    c = mean_field.c_star("erf", w2, b2)
    if chi <= 1:
        assert c == 1.0
    else:
        assert c < 1
        np.testing.assert_allclose(_numpy_c_map(w2, b2, q)(c), c, rtol=1e-7)
    expected = w2 * _gauss(lambda u, v: _erf_prime(u) * _erf_prime(v), q, min(c, 1.0))
    np.testing.assert_allclose(mean_field.chi_c_star("erf", w2, b2), expected, rtol=1e-5)


@pytest.mark.parametrize("w2,b2", [(0.8, 0.18), (2.0, 0.18), (3.0, 0.05)])
def test_erf_against_float64_numpy_maps(w2, b2):
    # q* by iterating the variance map; χ1 and χc* as finite-difference slopes of
    # the correlation map; the depth scales from those numbers.
    q = _numpy_q_star(w2, b2)
    np.testing.assert_allclose(mean_field.q_star("erf", w2, b2), q, rtol=1e-7)
    c_map = _numpy_c_map(w2, b2, q)
    h = 1e-5
    chi_1 = (c_map(1.0) - c_map(1.0 - h)) / h  # One-sided at the boundary c = 1.
    np.testing.assert_allclose(mean_field.chi1("erf", w2, b2), chi_1, rtol=1e-4)
    c, previous = 0.0, 1.0
    while abs(c - previous) > 1e-15:  # Converges at the rate χc* < 1.
        c, previous = c_map(c), c
    chaotic = chi_1 > 1
    if chaotic:
        np.testing.assert_allclose(mean_field.c_star("erf", w2, b2), c, rtol=1e-7)
        chi_c = (c_map(c + h) - c_map(c - h)) / (2 * h)
        np.testing.assert_allclose(mean_field.chi_c_star("erf", w2, b2), chi_c, rtol=1e-6)
        xi_star = -1.0 / (math.log(chi_c) - math.log(chi_1))
        np.testing.assert_allclose(mean_field.xi_star("erf", w2, b2), xi_star, rtol=1e-3)
        # ξ* is not the correlation depth scale −1/log χc*.
        assert abs(mean_field.xi_star("erf", w2, b2) + 1 / math.log(chi_c)) > 0.5
        assert mean_field.xi_1("erf", w2, b2) == math.inf
    else:
        np.testing.assert_allclose(mean_field.xi_1("erf", w2, b2), -1 / math.log(chi_1),
                                   rtol=1e-3)
        assert mean_field.xi_star("erf", w2, b2) == math.inf


def test_chi_c_star_is_the_decay_rate_of_the_correlation_map():
    # |c^l − c*| shrinks by χc* per layer (notebook: "Depth scales for signal propagation").
    w2, b2 = 2.5, 0.05
    q = _numpy_q_star(w2, b2)
    c_map = _numpy_c_map(w2, b2, q)
    c_star = mean_field.c_star("erf", w2, b2)
    c, gaps = 0.5, []
    for _ in range(80):
        c = c_map(c)
        gaps.append(abs(c - c_star))
    ratio = gaps[-1] / gaps[-2]
    np.testing.assert_allclose(ratio, mean_field.chi_c_star("erf", w2, b2), rtol=1e-3)


def test_relu_closed_forms():
    for w2 in (0.5, 1.0, 1.5, 1.9):
        assert mean_field.chi1("relu", w2, 0.05) == w2 / 2
        assert mean_field.q_star("relu", w2, 0.05) == pytest.approx(0.05 / (1 - w2 / 2))
        assert mean_field.c_star("relu", w2, 0.05) == 1.0
        assert mean_field.chi_c_star("relu", w2, 0.05) == pytest.approx(w2 / 2)
        assert mean_field.xi_1("relu", w2, 0.05) == pytest.approx(-1 / math.log(w2 / 2))
        assert mean_field.xi_star("relu", w2, 0.05) == math.inf
    assert mean_field.q_star("relu", 2.5, 0.05) == math.inf
    assert math.isnan(mean_field.c_star("relu", 3.0, 0.05))
    assert math.isnan(mean_field.xi_star("relu", 3.0, 0.05))
    assert mean_field.critical_sigma_w2("relu", 0.3) == 2.0


def test_relu_q_star_by_iteration():
    q = 1.0
    for _ in range(500):
        q = 1.5 * _gauss(lambda u: np.maximum(u, 0) ** 2, q) + 0.05
    np.testing.assert_allclose(mean_field.q_star("relu", 1.5, 0.05), q, rtol=1e-10)


def test_critical_line():
    # neural-tangents' notebook for the paper: W_critical = 1.76 at σb² = 0.18.
    critical = mean_field.critical_sigma_w2("erf", 0.18)
    assert critical == pytest.approx(1.76, abs=0.015)
    assert mean_field.chi1("erf", critical, 0.18) == pytest.approx(1.0, abs=1e-9)
    assert mean_field.chi1("erf", critical * 0.99, 0.18) < 1 < mean_field.chi1(
        "erf", critical * 1.01, 0.18)


@pytest.mark.parametrize("call", [
    lambda: mean_field.chi1("tanh", 1.0, 0.0),
    lambda: mean_field.q_star("erf", -1.0, 0.0),
    lambda: mean_field.c_star("erf", 1.0, float("nan")),
    lambda: mean_field.xi_star("erf", "2", 0.1),
])
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError, match="Received:"):
        call()
