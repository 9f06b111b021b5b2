"""The cost model behind `implementation="auto"` and the memory budget.

A model is profiled once from a traced (never executed) call; `estimates`
gives the FLOPs and peak bytes of one block for each implementation, and
`choose_block` picks the implementation and block size with the fewest
FLOPs whose peak fits the budget.
"""

import math

import numpy as np
import tensorflow as tf

from keras_ntk._batching import bucket, ladder_sizes, padded_size
from keras_ntk._jacobians import call_flat
from keras_ntk._structured import contraction_form, forward_flops, patched, rule_dims


class Profile:
    """Static facts about a model, read from one traced (never executed) call."""

    def __init__(self, out_shapes, activations, rule_dims, n_params, n_rest, ops=0):
        self.ops = ops  # operations in the traced forward graph (tracing/compile memory)
        self.out_shapes = out_shapes  # per output, without the batch axis
        self.activations = activations  # float elements per example in one forward
        self.rule_dims = rule_dims  # [_structured.RuleDims] per structured rule
        self.n_params = n_params
        self.n_rest = n_rest  # parameters not covered by a structured rule


def _example_spec(x):
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec([1, *t.shape[1:]], t.dtype), x
    )


def model_profile(model, x, weights, rules, training):
    dims = {}
    out_shapes = []

    def forward(xs):
        with tf.GradientTape() as tape:
            with patched(rules, tape):
                ys = call_flat(model, xs, training)
            for rule in rules:
                dims[id(rule)] = rule_dims(rule)
        out_shapes[:] = [tuple(int(d) for d in y.shape[1:]) for y in ys]
        return ys

    graph = tf.function(forward, autograph=False).get_concrete_function(_example_spec(x)).graph
    activations = 0
    for op in graph.get_operations():
        if op.type in ("ReadVariableOp", "Const", "Placeholder", "VarHandleOp"):
            continue
        for t in op.outputs:
            if t.dtype.is_floating and t.shape.is_fully_defined():
                activations += int(np.prod(t.shape.as_list(), dtype=np.int64))
    covered = {id(v) for rule in rules for v in rule.variables()}
    n_params = sum(int(np.prod(w.shape)) for w in weights)
    n_rest = sum(int(np.prod(w.shape)) for w in weights if id(w) not in covered)
    return Profile(
        out_shapes, max(activations, 1), [dims[id(r)] for r in rules], n_params, n_rest,
        ops=len(graph.get_operations()),
    )


# Calibrated on the first-call peaks of benchmarks/ntk_speed.py --memory-estimates
# (VmHWM of a fresh process over a baseline with TensorFlow imported and the model built;
# MLP-1, MLP-10 full, LeNet, ResNet-18, transformer; structured and jacobian; one block
# and several; refit 2026-12-01 on 31 rows, docs/performance.md) and XLA's buffer
# assignment per block function (benchmarks/ntk_memory_breakdown.py): the terms follow
# what XLA keeps live; the coefficients (grid search) bound every row by >= 5 % with the
# smallest largest ratio (1.45).
_GRAPH_BYTES = 80 * 2**20  # tracing and XLA compilation: a fixed part ...
_GRAPH_BYTES_PER_OP = 0.14 * 2**20  # ... and a part per op of the traced forward graph
# x with itself in several blocks compiles two block functions (diagonal, off-diagonal,
# whose graph holds two passes: ResNet-18 structured 4656 and 6913 XLA instructions):
# the second costs this share of the first's tracing and compilation, and the smaller
# block's working memory is counted at `_OTHER_BLOCK` on top of the larger's (both
# functions' buffers stay resident: LeNet blocks of 512, MLP-1 jacobian blocks of 64
# were 0.86x and 0.82x under an estimate of the larger block alone).
_SECOND_FUNCTION = 0.4
_OTHER_BLOCK = 0.75
_JACOBIAN_COPIES = 2.8  # per-example Jacobians: vectorized gradients, concat, contraction
_LIVE_ACTIVATIONS = {"jacobian": 0.02}  # share of `act` live at once, per output entry
# structured: a share of `act` once per block, not per output entry. `act` (every op
# output of the traced forward, patches and reshapes included: ResNet-18 29 MiB per
# example) is far more than XLA keeps (ResNet-18's buffers at their peak: the rules'
# patches, counted below, and ~0.5 MiB of conv outputs per example); the share covers
# the part of the first call's peak outside XLA's buffer assignment that grows with the
# block (ResNet-18 736 MiB beyond its buffers, the transformer 183 MiB). Was 0.5 per
# output entry, fitted to MLP-10's peak, whose excess over the XLA buffers is the
# kernel block's copies (`_OUTPUT_COPIES`).
_STRUCTURED_LIVE = 0.2
# The kernel block beyond XLA's output buffer: the host copy placed into the result and
# the accumulation over rules (MLP-10 full, 25 MiB block: 107 MiB of XLA buffers for
# three 25 MiB kernel terms, 52 MiB more in the first call's peak).
_OUTPUT_COPIES = 2


# The first call without `batch_size` whose padded block reaches FACTOR_SIZES[0] examples
# (structured, jacobian) also compiles and runs, after the fused blocks, the two functions
# of the block-factor path (`_block_factors`) for blocks of B = min(block, FACTOR_SIZES[1])
# examples: the factors of one block (its per-example weight gradients W concatenated)
# and the kernel of a pair of blocks. With oneDNN, TensorFlow's CPU allocator is a BFC
# pool that never returns memory to the system: the later stage reuses the earlier one's
# buffers, in part. Measured (benchmarks/ntk_speed.py --memory-estimates, default path;
# each stage alone and both, 2026-12-01): the first-call peak was the larger stage plus
# about 0.2 of the tracing and compilation (the two new functions: MLP 16-22 MiB of 96,
# LeNet 25 of 122, transformer 37-42 of 198, ResNet-18 jacobian 94 of 480; counted at
# `_FACTOR_COMPILE`) and for ResNet-18 structured (128 examples: fused 1802 MiB, factors
# 2481 MiB, both 2978 MiB) a part of the smaller stage not reused (`_POOL_LOSS`).
# `choose_block` charges it whenever no `batch_size` is given, for vector products too
# (`_vector_product` goes through the block factors past 128 examples): it does not know
# whether the call keeps the fused path (BatchNorm coupling the examples in training
# mode, a TPU strategy: an upper bound there) nor whether the factor
# functions are compiled already (the block a budget picks does not change from one call
# to the next).
FACTOR_SIZES = (128, 256)
_FACTOR_COMPILE = 0.25
_POOL_LOSS = 0.15


def factor_stage(impl, profile, out_axes, b1, b2, itemsize):
    """Peak bytes of the block-factor functions' first run (`_block_factors`), or None
    when a call with blocks b1 × b2 does not compile them."""
    size = max(b1, b2)
    if impl not in ("structured", "jacobian") or size < FACTOR_SIZES[0]:
        return None
    size = min(size, FACTOR_SIZES[1])
    peak = _estimates_of(impl, profile, out_axes, size, size, True, itemsize, False)[1]
    if impl == "structured":
        # the factors returned: W of the rules contracted per example and the
        # Jacobian of the other weights, concatenated (a copy beyond the block's W)
        per_example = 0
        for ax in out_axes:
            for d in profile.rule_dims:
                if contraction_form(size, size, d, ax)[0] == "per_example":
                    per_example += ax.size * d.g * d.a * d.b
            per_example += ax.size * profile.n_rest
        peak += size * per_example * itemsize
    return peak


def graph_bytes(profile):
    """Memory of tracing and compiling the block function (first call), in bytes."""
    return _GRAPH_BYTES + _GRAPH_BYTES_PER_OP * profile.ops


def estimates(impl, profile, out_axes, n1, n2, same, itemsize, vector=False):
    """(FLOPs, peak bytes) of one block of n1 × n2 examples for `impl`.

    The cost model behind `implementation="auto"`; see `empirical_ntk`. The peak
    includes the first call's tracing and compilation (`graph_bytes`). With `same`
    (x against itself) one set of per-example factors serves both sides.
    """
    n = n1 if same else n1 + n2
    s_total = sum(ax.size for ax in out_axes)
    act = profile.activations
    kj, ka_j = _JACOBIAN_COPIES, _LIVE_ACTIVATIONS["jacobian"]
    fwd = sum(forward_flops(d) for d in profile.rule_dims) + 2 * profile.n_rest + act
    out_elems = sum(n1 * n2 * ax.kernel_size for ax in out_axes)
    if impl == "jacobian":
        flops = n * s_total * 3 * fwd + sum(
            n1 * n2 * ax.pairs * profile.n_params for ax in out_axes
        )
        elems = n * s_total * (kj * profile.n_params + ka_j * act)
        elems += (1 + _OUTPUT_COPIES) * out_elems
    elif impl == "ntvp" and vector:
        # ntk_vector_product: |S| stacked VJPs/JVPs per column (one column
        # assumed), one block of examples at a time. `act` counts every op
        # output of the forward graph, more than is live at once (measured:
        # ResNet-18 width 16, blocks of 256, 4x above the peak), so 1·act.
        flops = s_total * 3 * fwd * (n1 + n2)
        elems = s_total * (max(n1, n2) * act + 3 * profile.n_params)
    elif impl == "ntvp":
        vectors = n2 * s_total
        flops = vectors * 3 * fwd * (n1 + n2)
        elems = vectors * ((n1 + n2) * 3 * act + 2 * profile.n_params + n1 * s_total)
        elems += out_elems
    elif impl == "structured":
        # forward, then one input-cotangent pass per output entry (the per-example
        # weight gradients are in the rules' contraction costs)
        flops = n * fwd * (1 + s_total)
        # live: a share of the forward's activations, every rule's factors a (conv
        # patches: the largest buffers of ResNet-18's block function) and cotangents g,
        # each rule's contraction intermediates and the kernel block with its copies
        elems = n * _STRUCTURED_LIVE * act + (1 + _OUTPUT_COPIES) * out_elems
        for d in profile.rule_dims:
            for ax in out_axes:
                form, (rule_flops, extra) = contraction_form(n1, n2, d, ax)
                flops += rule_flops
                if same and form == "per_example":
                    # contraction_costs counts W for n1 + n2 examples; one set here
                    extra -= n1 * ax.size * d.g * d.a * d.b
                factor_a = d.p if d.gather else d.p * d.g * d.a
                elems += n * factor_a + n * ax.size * d.p * d.g * d.b + extra
        if profile.n_rest:
            flops += n * s_total * 3 * fwd + sum(
                n1 * n2 * ax.pairs * profile.n_rest for ax in out_axes
            )
            elems += n * s_total * (kj * profile.n_rest + ka_j * act)
    else:
        raise ValueError(impl)
    return float(flops), int(elems * itemsize + graph_bytes(profile))


def _estimates_of(impl, profile, out_axes, b1, b2, same, itemsize, vector):
    """`estimates`, remembered on the profile (a repeated call does not redo them)."""
    memo = profile.__dict__.setdefault("_estimates", {})
    key = (impl, tuple((ax.shape, ax.trace, ax.diag) for ax in out_axes), b1, b2, same,
           itemsize, vector)
    if key not in memo:
        memo[key] = estimates(impl, profile, out_axes, b1, b2, same, itemsize, vector=vector)
    return memo[key]


def block_estimates(impl, profile, out_axes, n1, b1, b2, same, itemsize, vector=False,
                    factors=False):
    """(FLOPs of a diagonal block, peak bytes of the largest block) of padded blocks
    b1 × b2: with `same` and several blocks, off-diagonal blocks hold 2·b1 examples
    and a second block function is compiled (`_SECOND_FUNCTION`, `_OTHER_BLOCK`).
    `factors` (no `batch_size`): the first call may also compile the block-factor
    functions (`factor_stage`, `_FACTOR_COMPILE`, `_POOL_LOSS`)."""
    flops, peak = _estimates_of(impl, profile, out_axes, b1, b2, same, itemsize, vector)
    graph = graph_bytes(profile)
    if same and n1 > b1:
        # two block functions compiled: the larger working set, a share of the
        # smaller one and a second compilation
        off = _estimates_of(impl, profile, out_axes, b1, b1, False, itemsize, vector)[1]
        diagonal, off = peak - graph, off - graph
        peak = int(max(diagonal, off) + _OTHER_BLOCK * min(diagonal, off)
                   + (1 + _SECOND_FUNCTION) * graph)
    stage = factor_stage(impl, profile, out_axes, b1, b2, itemsize) if factors else None
    if stage is not None:
        fused, stage = peak - graph, stage - graph
        peak = int(max(fused, stage) + _POOL_LOSS * min(fused, stage)
                   + (1 + _FACTOR_COMPILE) * graph)
    return flops, peak


def choose_block(order, profile, out_axes, n1, n2, same, itemsize, vector, batch_size,
                 budget, result_bytes, memory_budget):
    """(implementation, block size): the fewest estimated FLOPs among `order` within `budget`.

    Per implementation, blocks of `batch_size` examples or else of the
    ladder sizes of `_batching` (..., 12, 16, 24, 32, ...) from the one that
    holds N down to 1, each block padded to its fixed size (`padded_size`);
    the first whose peak (block working memory plus the `result_bytes` of the
    host result) fits is that implementation's candidate. Raises a ValueError
    giving the smallest estimate when nothing fits, before any computation.
    """
    # Remembered on the profile (shared by an architecture's models): a repeated call does
    # not try the ladder again (MLP-10 traced: 0.19 of kernel_setup's 0.25 ms). The terms
    # `block_estimates` reads beyond `_estimates_of` are in the key (tests change them).
    memo = profile.__dict__.setdefault("_choices", {})
    key = (tuple(order), tuple((ax.shape, ax.trace, ax.diag) for ax in out_axes), n1, n2,
           same, itemsize, vector, batch_size, budget, result_bytes,
           (_SECOND_FUNCTION, _OTHER_BLOCK, _FACTOR_COMPILE, _POOL_LOSS, FACTOR_SIZES,
            _GRAPH_BYTES, _GRAPH_BYTES_PER_OP))
    if key in memo:
        return memo[key]

    def block_sizes():
        if batch_size is not None:
            yield int(min(batch_size, bucket(max(n1, n2))))
            return
        yield from ladder_sizes(max(n1, n2))

    best = None
    tried = []
    for impl in order:
        for b in block_sizes():
            b1, b2 = padded_size(n1, b), padded_size(n2, b)
            flops, peak = block_estimates(impl, profile, out_axes, n1, b1, b2, same,
                                          itemsize, vector, factors=batch_size is None)
            blocks = math.ceil(n1 / b1) * math.ceil(n2 / b2)
            if same:
                nb = math.ceil(n1 / b1)
                blocks = nb * (nb + 1) // 2
            total_peak = peak + result_bytes
            tried.append((impl, b, total_peak))
            if total_peak <= budget:
                # The structured passes run on the whole block; the others vectorize a
                # per-example graph (pfor; a conv's filter gradient becomes a loop over
                # examples): measured 1x (transformer) to 5x (ResNet-18) slower per FLOP.
                cost = flops * blocks * (0.5 if impl == "structured" else 1.0)
                if best is None or cost < best[0]:
                    best = (cost, impl, b)
                break
    if best is None:
        smallest = min(tried, key=lambda t: t[2])
        raise ValueError(
            "The empirical NTK does not fit in the memory budget even in its smallest "
            f"block: implementation '{smallest[0]}' with blocks of {smallest[1]} "
            f"examples needs about {format_bytes(smallest[2])} (result "
            f"{format_bytes(result_bytes)} included), above the budget of "
            f"{format_bytes(budget)}. Raise `memory_budget` or lower `batch_size`. "
            f"Received: memory_budget={memory_budget}, batch_size={batch_size}"
        )
    _, implementation, block = best
    if len(memo) >= 256:  # one entry per (N, options) a profile has seen: bounded
        memo.clear()
    memo[key] = (implementation, block)
    return implementation, block


_MEMINFO = "/proc/meminfo"
_DEFAULT_BUDGET = []  # read once per process (see default_memory_budget)


def default_memory_budget():
    """A quarter of the available host memory (of 4 GiB at most with a GPU).

    Read once per process, at the first call that needs it: transient memory use
    between calls then never changes the block size or the implementation (which
    would compile new functions). Pass `memory_budget` to use another value.
    """
    if not _DEFAULT_BUDGET:
        _DEFAULT_BUDGET.append(_available_budget())
    return _DEFAULT_BUDGET[0]


def _available_budget():
    available = None
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = 8 * 2**30
    budget = available // 4
    if tf.config.list_logical_devices("GPU"):
        budget = min(budget, 4 * 2**30)
    return int(budget)


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
