"""Tests of `keras_ntk._jacobians`: per-example Jacobians contracted into the kernel.

Through `empirical_ntk(implementation="jacobian")`, against the naive float64
`GradientTape.jacobian` kernel of tests/ntk_reference.py.
"""

import pytest

from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    assert_matches_naive_jacobian, model_cases, plain_graphs)

pytestmark = pytest.mark.usefixtures("plain_graphs")


@pytest.mark.parametrize("name", model_cases("jacobian"))
def test_jacobian_implementation_matches_naive_jacobian(name):
    assert_matches_naive_jacobian(name, "jacobian")
