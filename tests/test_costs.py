"""Tests of `keras_ntk._costs`: the block size chosen within the memory budget.

A profile is written by hand (no model): P parameters, `act` activations per
example, one scalar output, no traced ops. The `jacobian` block of n examples then
holds n·(2.8·P + 0.02·act) numbers (per-example Jacobians about 2.8 times, 2 % of
the activations live at once: the calibration of docs/performance.md) plus the b²
kernel block three times (XLA's output, the accumulation, the host copy), in float32,
plus 80 MiB of tracing and compilation; n = b for a single block of x with itself.
Several blocks compile two block functions: the off-diagonal block (2b examples), 75 %
of the diagonal one's working memory and 1.4 × 80 MiB.
"""

import keras
import numpy as np
import pytest

import keras_ntk
from keras_ntk import ntk as ntk_module
from keras_ntk._costs import (
    Profile, block_estimates, choose_block, estimates, format_bytes, graph_bytes)
from keras_ntk._output_axes import OutputAxes
from keras_ntk._structured import RuleDims
from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    assert_close, inputs_for, mlp, plain_graphs, reference)

P, ACT, N = 200_000, 100, 64


GRAPH = 80 * 2**20


def one_block(n, b):
    return int(4 * (n * (2.8 * P + 0.02 * ACT) + 3 * b * b) + GRAPH)


def jacobian_peak(b):
    if b >= N:
        return one_block(b, b)
    diagonal, off = one_block(b, b) - GRAPH, one_block(2 * b, b) - GRAPH
    return int(off + 0.75 * diagonal + 1.4 * GRAPH)


def choose(budget, batch_size=None, order=("jacobian",)):
    profile = Profile(out_shapes=[(1,)], activations=ACT, rule_dims=[], n_params=P, n_rest=P)
    axes = [OutputAxes((1,), (-1,), ())]
    return choose_block(list(order), profile, axes, N, N, True, 4, False, batch_size,
                        budget, 0, budget)


def test_the_largest_ladder_size_whose_peak_fits_is_chosen():
    # The ladder of fixed (padded) block sizes: 64, 48, 32, 24, 16, 12, 8, ...
    assert jacobian_peak(64) - GRAPH == 4 * (64 * 560_002 + 3 * 64 * 64) == 143_409_664
    assert choose(jacobian_peak(64)) == ("jacobian", 64)
    # Blocks of 48, 32 or 24 need two or three blocks per side: an off-diagonal block of
    # 96, 64 or 48 examples, most of a diagonal one and a second block function, more
    # than one block of 64, which is then chosen.
    assert jacobian_peak(48) > jacobian_peak(32) > jacobian_peak(24) > jacobian_peak(64)
    for b in (48, 32, 24):
        assert choose(jacobian_peak(b)) == ("jacobian", 64)
    assert jacobian_peak(16) < jacobian_peak(64) - 1
    assert choose(jacobian_peak(64) - 1) == ("jacobian", 16)
    assert choose(jacobian_peak(16)) == ("jacobian", 16)
    assert choose(jacobian_peak(16) - 1) == ("jacobian", 12)


def test_an_explicit_block_is_kept_or_refused():
    assert choose(jacobian_peak(10), batch_size=10) == ("jacobian", 10)
    assert choose(10**9, batch_size=500) == ("jacobian", N)  # never more than N
    with pytest.raises(ValueError, match=r"blocks of 10 examples.*Received: memory_budget"):
        choose(jacobian_peak(10) - 1, batch_size=10)


def test_nothing_fits_names_the_smallest_estimate_and_the_budget():
    with pytest.raises(ValueError, match=r"'jacobian' with blocks of 1 examples needs about "
                                         r"117\.9 MiB .*above the budget of 100 B"):
        choose(100)
    assert jacobian_peak(1) == 123_600_555  # 117.9 MiB: 112 MiB for two block functions


def test_structured_activations_are_counted_once_and_the_kernel_block_three_times():
    # No rule, nothing outside the rules: the block holds 20 % of the activations of its
    # n examples (whatever the number S of output entries) plus the n² kernel entries three
    # times (XLA's output, the accumulation, the host copy); the FLOPs are n·act·(1 + S).
    profile = Profile(out_shapes=[(10,)], activations=ACT, rule_dims=[], n_params=0, n_rest=0)
    full = [OutputAxes((10,), (), ())]  # S = 10, a 10 × 10 kernel per pair
    traced = [OutputAxes((10,), (-1,), ())]  # S = 10 entries traced: one number per pair
    flops, peak = estimates("structured", profile, full, 8, 8, True, 4)
    assert flops == 8 * 100 * 11 and peak == pytest.approx(4 * (8 * 20 + 3 * 64 * 100) + GRAPH,
                                                          abs=4)
    flops, peak = estimates("structured", profile, traced, 8, 8, True, 4)
    assert flops == 8 * 100 * 11 and peak == pytest.approx(4 * (8 * 20 + 3 * 64) + GRAPH, abs=4)
    one = [OutputAxes((1,), (-1,), ())]
    flops, peak = estimates("structured", profile, one, 4, 6, False, 4)
    assert flops == 10 * 100 * 2 and peak == pytest.approx(4 * (10 * 20 + 3 * 24) + GRAPH, abs=4)


def test_structured_per_example_gradients_serve_both_sides_of_x_with_itself():
    # One rule contracted per example (LeNet's first conv: 64 positions, 10 inputs, 6
    # outputs, 60 weights). Block of 8 examples of x with itself: the patches a (8·64·10)
    # and cotangents g (8·64·6) of 8 examples, ONE set of per-example gradients W (8·60),
    # the 8² kernel entries of the rule and 3·8² of the block, 20 % of 8·act.
    rule = RuleDims(p=64, g=1, a=10, b=6, gather=False)
    profile = Profile(out_shapes=[(1,)], activations=ACT, rule_dims=[rule], n_params=60,
                      n_rest=0)
    one = [OutputAxes((1,), (-1,), ())]
    _, peak = estimates("structured", profile, one, 8, 8, True, 4)
    assert peak == pytest.approx(
        4 * (8 * 640 + 8 * 384 + 8 * 60 + 64 + 3 * 64 + 0.2 * 8 * ACT) + GRAPH, abs=4)
    # Two blocks of 4 (x against x2): factors and W of 4 + 4 examples, 4 × 4 entries.
    _, peak = estimates("structured", profile, one, 4, 4, False, 4)
    assert peak == pytest.approx(
        4 * (8 * 640 + 8 * 384 + 8 * 60 + 16 + 3 * 16 + 0.2 * 8 * ACT) + GRAPH, abs=4)


def test_several_blocks_of_x_with_itself_compile_a_second_function():
    profile = Profile(out_shapes=[(1,)], activations=ACT, rule_dims=[], n_params=P, n_rest=P)
    one = [OutputAxes((1,), (-1,), ())]
    for impl in ("jacobian", "structured"):
        _, single = block_estimates(impl, profile, one, 32, 32, 32, True, 4)
        assert single == estimates(impl, profile, one, 32, 32, True, 4)[1]
        _, several = block_estimates(impl, profile, one, 64, 32, 32, True, 4)
        off_diagonal = estimates(impl, profile, one, 32, 32, False, 4)[1]
        # the off-diagonal block, 75 % of the diagonal one, 1.4 × the compilation
        assert several == int(off_diagonal - GRAPH + 0.75 * (single - GRAPH) + 1.4 * GRAPH)
        assert several > off_diagonal > single


def test_a_first_call_without_batch_size_adds_the_block_factor_functions():
    # From padded blocks of 128 examples (no batch_size: `choose_block`), the first call
    # also compiles and runs the block-factor functions for blocks of min(block, 256): the
    # larger of the two working sets, 15 % of the smaller one (the memory pool's
    # partial reuse) and 1.25 × the tracing and compilation.
    one = [OutputAxes((1,), (-1,), ())]
    jac = Profile(out_shapes=[(1,)], activations=ACT, rule_dims=[], n_params=P, n_rest=P)
    # jacobian: the factors are the block's per-example Jacobians (already counted)
    _, plain = block_estimates("jacobian", jac, one, 256, 256, 256, True, 4)
    _, first = block_estimates("jacobian", jac, one, 256, 256, 256, True, 4, factors=True)
    assert plain == one_block(256, 256)
    assert first == int(1.15 * (plain - GRAPH) + 1.25 * GRAPH)
    # below 128 examples nothing more is compiled
    assert block_estimates("jacobian", jac, one, 96, 96, 96, True, 4, factors=True)[1] == \
        one_block(96, 96)
    # a block of 512: the factors of blocks of 256 (the smaller working set)
    _, plain = block_estimates("jacobian", jac, one, 512, 512, 512, True, 4)
    _, first = block_estimates("jacobian", jac, one, 512, 512, 512, True, 4, factors=True)
    assert first == int(plain - GRAPH + 0.15 * (one_block(256, 256) - GRAPH) + 1.25 * GRAPH)
    # structured, one rule contracted per example (60 weights, 10 outputs): the factor
    # stage returns W (256 · 10 · 60 numbers) on top of the block's working memory
    rule = RuleDims(p=64, g=1, a=10, b=6, gather=False)
    ten = [OutputAxes((10,), (), ())]
    profile = Profile(out_shapes=[(10,)], activations=ACT, rule_dims=[rule], n_params=60,
                      n_rest=0)
    _, plain = block_estimates("structured", profile, ten, 256, 256, 256, True, 4)
    _, first = block_estimates("structured", profile, ten, 256, 256, 256, True, 4,
                               factors=True)
    stage = plain + 4 * 256 * 10 * 60
    assert first == int(stage - GRAPH + 0.15 * (plain - GRAPH) + 1.25 * GRAPH)
    # choose_block charges it without batch_size only: a budget of one block of 256
    budget = one_block(256, 256)
    kwargs = dict(budget=budget, result_bytes=0, memory_budget=budget)
    assert choose_block(["jacobian"], jac, one, 256, 256, True, 4, False, 256,
                        **kwargs) == ("jacobian", 256)
    assert choose_block(["jacobian"], jac, one, 256, 256, True, 4, False, None,
                        **kwargs) == ("jacobian", 64)  # not 192 or 128 (factors), nor 96
    assert block_estimates("jacobian", jac, one, 256, 96, 96, True, 4)[1] > budget


def test_a_first_vector_product_counts_its_pairs_of_blocks_and_the_block_factors():
    # ntk_vector_product runs pairs of blocks (x1 against itself as against any x2) and,
    # past 128 examples, the block factors too: its first call is charged for both.
    one = [OutputAxes((1,), (-1,), ())]
    jac = Profile(out_shapes=[(1,)], activations=ACT, rule_dims=[], n_params=P, n_rest=P)
    _, plain = block_estimates("jacobian", jac, one, 256, 256, 256, False, 4, True)
    _, first = block_estimates("jacobian", jac, one, 256, 256, 256, False, 4, True,
                               factors=True)
    assert plain == one_block(512, 256)  # two sides of 256 examples
    assert first == int(plain - GRAPH + 0.15 * (one_block(256, 256) - GRAPH) + 1.25 * GRAPH)
    # choose_block with same=False, as kernel_setup calls it for a vector product: a
    # budget of one diagonal block of 256 holds a pair of blocks of 96 at most
    budget = one_block(256, 256)
    kwargs = dict(budget=budget, result_bytes=0, memory_budget=budget)
    assert choose_block(["jacobian"], jac, one, 256, 256, False, 4, True, None,
                        **kwargs) == ("jacobian", 96)


def test_a_remembered_block_choice_follows_the_estimate_terms(monkeypatch):
    # choose_block remembers its answer on the profile; a term of the estimate it reads
    # outside the memoized per-block estimates changes the answer, not a stale one.
    from keras_ntk import _costs

    jac = Profile(out_shapes=[(1,)], activations=ACT, rule_dims=[], n_params=P, n_rest=P)
    one = [OutputAxes((1,), (-1,), ())]
    kwargs = dict(budget=2**30, result_bytes=0, memory_budget=2**30)
    first = choose_block(["jacobian"], jac, one, 1000, 1000, True, 4, False, None, **kwargs)
    assert first == ("jacobian", 128)  # several blocks: two block functions compiled
    assert choose_block(["jacobian"], jac, one, 1000, 1000, True, 4, False, None,
                        **kwargs) == first
    monkeypatch.setattr(_costs, "_SECOND_FUNCTION", 5.0)  # the second compilation costlier
    assert choose_block(["jacobian"], jac, one, 1000, 1000, True, 4, False, None,
                        **kwargs) == ("jacobian", 64)


def test_format_bytes():
    assert [format_bytes(n) for n in (100, 4_804, 3 * 2**20, 2**40)] == [
        "100 B", "4.7 KiB", "3.0 MiB", "1.0 TiB"]


# ----------------------------------------------------------------- through empirical_ntk


@pytest.mark.usefixtures("plain_graphs")
def test_a_vector_product_of_x_with_itself_is_planned_as_pairs_of_blocks(monkeypatch):
    # `_vector_product` runs the two-block function on x1 against itself: its memory
    # is that of a pair of blocks (same=False), not of a diagonal block of Θ(x, x).
    model, x = mlp(), inputs_for("mlp", 16)
    seen = []

    def spy(order, profile, out_axes, n1, n2, same, *args):
        seen.append(same)
        return choose_block(order, profile, out_axes, n1, n2, same, *args)

    monkeypatch.setattr(ntk_module, "choose_block", spy)
    keras_ntk.ntk_vector_product(model, x, None, np.ones(16, "float32"))
    keras_ntk.empirical_ntk(model, x)
    assert seen == [False, True]


@pytest.mark.usefixtures("plain_graphs")
def test_memory_budget_error_is_raised_before_any_work(monkeypatch):
    model = mlp()
    x = inputs_for("mlp", 64)
    ran = []
    monkeypatch.setattr(ntk_module, "run_tasks", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"memory budget.*above the budget of 1000 B"):
        keras_ntk.empirical_ntk(model, x, memory_budget=1000)
    assert not ran
    # An explicit block that is too large for the budget is refused as well.
    with pytest.raises(ValueError, match="budget"):
        keras_ntk.empirical_ntk(model, x, batch_size=64, memory_budget=20_000)
    assert not ran


@pytest.mark.usefixtures("plain_graphs")
def test_memory_budget_picks_blocks_and_stays_exact(monkeypatch):
    from keras_ntk import _costs

    # For this tiny model one block is smaller than the second block function's
    # compilation that several blocks of x with itself add: not charged here.
    monkeypatch.setattr(_costs, "_SECOND_FUNCTION", 0.0)
    model = mlp()
    x = inputs_for("mlp", 40)
    budget = graph_bytes(ntk_module.kernel_setup(
        model, x, None, (-1,), (), "auto", None, None, False, None).profile) + 60_000
    setup = ntk_module.kernel_setup(model, x, None, (-1,), (), "auto", None, budget, False, None)
    assert setup.block < 40  # the budget forced blocks
    assert_close(keras_ntk.empirical_ntk(model, x, memory_budget=budget), reference(model, x))


@pytest.mark.usefixtures("plain_graphs")
def test_auto_picks_structured_for_dense_models_and_jacobian_otherwise():
    model = mlp()
    x = inputs_for("mlp", 8)
    assert ntk_module.kernel_setup(model, x, None, (-1,), (), "auto", None, None, False,
                                   None).implementation == "structured"
    # PReLU and GroupNormalization have no structured rule.
    no_rules = keras.Sequential([keras.Input((5,)), keras.layers.PReLU(),
                                 keras.layers.Reshape((5, 1)),
                                 keras.layers.GroupNormalization(groups=1),
                                 keras.layers.Flatten()])
    assert ntk_module.kernel_setup(no_rules, x, None, (-1,), (), "auto", None, None, False,
                                   None).implementation == "jacobian"
    assert_close(keras_ntk.empirical_ntk(no_rules, x), reference(no_rules, x))


def test_default_budget_is_a_quarter_of_memavailable_read_once(monkeypatch, tmp_path):
    from keras_ntk import _costs

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(_costs, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(_costs, "_DEFAULT_BUDGET", [])
    assert _costs.default_memory_budget() == 8_000_000 * 1024 // 4
    # Memory use between calls does not move the budget (nor the blocks) of this process.
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1000000 kB\n")
    assert _costs.default_memory_budget() == 2_048_000_000
    monkeypatch.setattr(_costs, "_DEFAULT_BUDGET", [])
    assert _costs.default_memory_budget() == 256_000_000
