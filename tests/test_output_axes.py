"""Tests of `keras_ntk._output_axes`: the trace/diagonal conventions, in numpy.

References are written out per case by hand (explicit einsums over named
axes), independent of the subscripts `OutputAxes` generates.
"""

import numpy as np
import pytest

import keras_ntk
from keras_ntk._output_axes import (
    OutputAxes, cotangents_from_vector, reduce_full_kernel, swap_pairs, vector_from_products)
from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    IMPLEMENTATIONS, assert_close, conv_map, inputs_for, mlp, plain_graphs, reference,
    slow_unless)

A, B, W = 3, 4, 5  # output shape (A, B) per example, W weights


def jacobians(n, seed):
    return np.random.default_rng(seed).normal(size=(n, A, B, W))


def full_kernel(j1, j2):
    """Θ_full[n, a, b, m, a', b'] = Σ_w J1[n, a, b, w] J2[m, a', b', w]."""
    return np.einsum("nabw,mcdw->nabmcd", j1, j2)


# (trace_axes, diagonal_axes, hand-written reduction of the full kernel, kept shape of v)
CASES = {
    "all_paired": ((), (), lambda f: np.einsum("nabmcd->nmacbd", f), (A, B)),
    "trace_last": ((-1,), (), lambda f: np.einsum("nabmcb->nmac", f) / B, (A,)),
    "trace_1_diag_2": ((1,), (2,), lambda f: np.einsum("nabmab->nmb", f) / A, (B,)),
    "diag_1": ((), (1,), lambda f: np.einsum("nabmad->nmabd", f), (A, B)),
    "trace_all": ((1, 2), (), lambda f: np.einsum("nabmab->nm", f) / (A * B), ()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reduce_full_kernel_matches_the_hand_written_reduction(case):
    trace_axes, diagonal_axes, reduce_by_hand, kept = CASES[case]
    axes = OutputAxes((A, B), trace_axes, diagonal_axes)
    full = full_kernel(jacobians(4, 0), jacobians(3, 1))
    expected = reduce_by_hand(full)
    np.testing.assert_allclose(reduce_full_kernel(full, axes), expected, rtol=1e-12)
    assert axes.kernel_shape == expected.shape[2:]
    assert axes.vec_shape == kept


@pytest.mark.parametrize("case", sorted(CASES))
def test_swap_pairs_gives_the_kernel_with_x1_and_x2_exchanged(case):
    trace_axes, diagonal_axes, reduce_by_hand, _ = CASES[case]
    axes = OutputAxes((A, B), trace_axes, diagonal_axes)
    j1, j2 = jacobians(4, 0), jacobians(3, 1)
    np.testing.assert_allclose(swap_pairs(reduce_by_hand(full_kernel(j1, j2)), axes),
                               reduce_by_hand(full_kernel(j2, j1)), rtol=1e-12)


# Θv summed over x2 by hand: paired axes of x2 are contracted, diagonal axes shared.
PRODUCTS = {
    "all_paired": "nmacbd,mcdz->nabz",
    "trace_last": "nmac,mcz->naz",
    "trace_1_diag_2": "nmb,mbz->nbz",
    "diag_1": "nmabd,madz->nabz",
    "trace_all": "nm,mz->nz",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vector_round_trip_through_cotangents_gives_kernel_times_vector(case):
    """What ntk_vector_product(implementation="ntvp") does: v → cotangents w on f(x2),
    products J(x1) J(x2)ᵀ w, then back to (Θv)[n1, kept axes]."""
    trace_axes, diagonal_axes, reduce_by_hand, kept = CASES[case]
    axes = OutputAxes((A, B), trace_axes, diagonal_axes)
    j1, j2 = jacobians(4, 0), jacobians(3, 1)
    columns = 2
    v = np.random.default_rng(2).normal(size=(3, *kept, columns))
    w = cotangents_from_vector(v, axes)  # (V, N2, A, B)
    products = np.einsum("nabmcd,vmcd->vnab", full_kernel(j1, j2), w)
    expected = np.einsum(PRODUCTS[case], reduce_by_hand(full_kernel(j1, j2)), v)
    np.testing.assert_allclose(vector_from_products(products, axes, columns), expected,
                               rtol=1e-10, atol=1e-12)


def test_axes_errors_name_what_was_received():
    with pytest.raises(ValueError, match=r"Received: trace_axes=\(3,\)"):
        OutputAxes((A, B), (3,), ())
    with pytest.raises(ValueError, match="batch axis 0"):
        OutputAxes((A, B), (), (0,))
    with pytest.raises(ValueError, match="both traced and diagonal"):
        OutputAxes((A, B), (1,), (-2,))
    with pytest.raises(TypeError, match="Received: diagonal_axes=1.5"):
        OutputAxes((A, B), (), 1.5)
    # A string is not a tuple of ints (it was int()'s bare ValueError).
    with pytest.raises(TypeError, match="Received: trace_axes=x"):
        OutputAxes((A, B), "x", ())
    with pytest.raises(TypeError, match="Received: trace_axes=1"):
        OutputAxes((A, B), "1", ())


# ----------------------------------------------------------------- through empirical_ntk


AXES_CASES = [((), (), (6, 6, 3, 3)), ((), (-1,), (6, 6, 3)), ((1,), (), (6, 6))]


@pytest.mark.usefixtures("plain_graphs")
@pytest.mark.parametrize(
    "implementation,trace_axes,diagonal_axes,shape",
    [slow_unless(i == "structured" or (i == "jacobian" and c[1]) or (i == "ntvp" and c[0] == ()
                                                                    and not c[1]), i, *c)
     for i in IMPLEMENTATIONS for c in AXES_CASES],
)
def test_output_axis_conventions_on_mlp(implementation, trace_axes, diagonal_axes, shape):
    model = mlp()
    x = inputs_for("mlp", 6)
    expected = reference(model, x, None, trace_axes, diagonal_axes)
    actual = keras_ntk.empirical_ntk(model, x, trace_axes=trace_axes,
                                     diagonal_axes=diagonal_axes,
                                     implementation=implementation)
    assert actual.shape == shape
    assert_close(actual, expected)


@pytest.mark.usefixtures("plain_graphs")
@pytest.mark.parametrize(
    "implementation", [slow_unless(i != "jacobian", i) for i in IMPLEMENTATIONS])
def test_spatial_output_with_trace_and_diagonal_axes(implementation):
    # Output (N, 4, 4, 2): channels traced, rows diagonal, columns paired.
    model = conv_map()
    x1, x2 = inputs_for("conv_map", 3), inputs_for("conv_map", 2, seed=1)
    expected = reference(model, x1, x2, trace_axes=(3,), diagonal_axes=(1,))
    actual = keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(3,), diagonal_axes=(1,),
                                     implementation=implementation)
    assert actual.shape == (3, 2, 4, 4, 4)
    assert_close(actual, expected)
