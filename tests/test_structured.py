"""Tests of `keras_ntk._structured`: the structured Dense/Conv2D rules.

Through `empirical_ntk(implementation="structured")`, against the naive float64
`GradientTape.jacobian` kernel of tests/ntk_reference.py.
"""

import pytest

from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    assert_matches_naive_jacobian, model_cases, plain_graphs)

pytestmark = pytest.mark.usefixtures("plain_graphs")


@pytest.mark.parametrize("name", model_cases("structured"))
def test_structured_implementation_matches_naive_jacobian(name):
    assert_matches_naive_jacobian(name, "structured")
