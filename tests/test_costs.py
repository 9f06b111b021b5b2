"""Tests of `keras_ntk._costs`: the block size chosen within the memory budget.

A profile is written by hand (no model): P parameters, `act` activations per
example, one scalar output. The `jacobian` block of b examples of x with itself
then holds b·(P + 2·act) numbers of per-example Jacobians and activations plus
the b² kernel block: 4·(b·(P + 2·act) + b²) bytes in float32.
"""

import pytest

from keras_ntk._costs import Profile, choose_block, format_bytes
from keras_ntk._output_axes import OutputAxes

P, ACT, N = 1000, 100, 64


def jacobian_peak(b):
    return 4 * (b * (P + 2 * ACT) + b * b)


def choose(budget, batch_size=None, order=("jacobian",)):
    profile = Profile(out_shapes=[(1,)], activations=ACT, rule_dims=[], n_params=P, n_rest=P)
    axes = [OutputAxes((1,), (-1,), ())]
    return choose_block(list(order), profile, axes, N, N, True, 4, False, batch_size,
                        budget, 0, budget)


def test_the_largest_ladder_size_whose_peak_fits_is_chosen():
    # The ladder of fixed (padded) block sizes: 64, 48, 32, 24, 16, 12, 8, ...
    assert jacobian_peak(16) == 77_824 and jacobian_peak(32) == 157_696
    assert choose(jacobian_peak(64)) == ("jacobian", 64)
    assert choose(jacobian_peak(48)) == ("jacobian", 48)
    assert choose(jacobian_peak(32)) == ("jacobian", 32)
    assert choose(jacobian_peak(32) - 1) == ("jacobian", 24)
    assert choose(jacobian_peak(16)) == ("jacobian", 16)
    assert choose(jacobian_peak(16) - 1) == ("jacobian", 12)


def test_an_explicit_block_is_kept_or_refused():
    assert choose(jacobian_peak(10), batch_size=10) == ("jacobian", 10)
    assert choose(10**9, batch_size=500) == ("jacobian", N)  # never more than N
    with pytest.raises(ValueError, match=r"blocks of 10 examples.*Received: memory_budget"):
        choose(jacobian_peak(10) - 1, batch_size=10)


def test_nothing_fits_names_the_smallest_estimate_and_the_budget():
    with pytest.raises(ValueError, match=r"'jacobian' with blocks of 1 examples needs about "
                                         r"4\.7 KiB .*above the budget of 100 B"):
        choose(100)
    assert jacobian_peak(1) == 4_804  # 4.7 KiB


def test_format_bytes():
    assert [format_bytes(n) for n in (100, 4_804, 3 * 2**20, 2**40)] == [
        "100 B", "4.7 KiB", "3.0 MiB", "1.0 TiB"]
