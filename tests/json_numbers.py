"""Comparing two results.json trees: numbers to rounding, everything else exactly.

Test modules import it (pytest puts tests/ on sys.path): a rerun in another
process may differ in the last bits of LAPACK results (threaded sums), never in
structure, labels or verdicts.
"""

import pytest


def numbers_and_rest(value, skip=(), path=""):
    """([(path, number)], [(path, other leaf)]) of a JSON tree; keys in `skip` left out."""
    if isinstance(value, dict):
        parts = [numbers_and_rest(v, skip, f"{path}.{k}") for k, v in sorted(value.items())
                 if k not in skip]
    elif isinstance(value, list):
        parts = [numbers_and_rest(v, skip, f"{path}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, value)], []
    else:
        return [], [(path, value)]
    return ([n for numbers, _ in parts for n in numbers], [r for _, rest in parts for r in rest])


def assert_same_results(got, want, skip=(), rel=1e-9, abs=1e-12):
    """Same structure and non-numeric leaves; numbers equal to `rel`/`abs`."""
    got_numbers, got_rest = numbers_and_rest(got, skip)
    want_numbers, want_rest = numbers_and_rest(want, skip)
    assert got_rest == want_rest
    assert [p for p, _ in got_numbers] == [p for p, _ in want_numbers]
    assert [v for _, v in got_numbers] == pytest.approx([v for _, v in want_numbers],
                                                        rel=rel, abs=abs)
