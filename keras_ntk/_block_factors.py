"""Kernel blocks from per-block factors: two compiled functions for every N.

A block function compiled for b1 × b2 examples serves only the N that pad to
that rung; a new rung costs a trace and an XLA compilation (seconds, 10-100×
a warm call). Past a size B the kernel is therefore computed in two steps,
each compiled once per model (or architecture) and options:

* `factors(x)` for a block of B examples: one forward/backward pass giving,
  per output, the per-example factors the kernel is a contraction of: the
  per-example weight gradients W (N, *S, P) of the rules contracted in
  per-example form and of the weights no rule covers (their Jacobian), all
  concatenated, and the (a, g) pairs of the rules contracted in factorized
  form (`_structured.contraction_form` at B × B);
* `pair(f1, f2)`: Θ of two blocks from their factors,
  Θ = Σ_w W1 W2ᵀ + Σ_factorized rules contract_structured(a1, g1, a2, g2).

The first call of a model (or architecture) and options at N ≥ MIN_SIZE
compiles both after the fused block function of its rung; every N on
another rung then reuses the same two functions: the factors of each block are
computed once and kept (when all of them fit the memory budget), and only the
contraction runs per pair of blocks. Exact: the same contractions as the
fused block functions of `ntk`, blocks padded with their last example and the
padding cut off (examples independent: inference mode, or training mode of a model
whose layers do not couple the examples of a batch; `_weights.couples_examples`).

Under a single-worker strategy (`MirroredStrategy` over the devices of one machine,
`OneDeviceStrategy`) the two functions are keyed by the strategy's devices too (shared
by architecture as without a strategy, like the fused ones: each replica passes its copy
of the weights), and compiled in replica context on every replica after the first fused
call. `_batching.run_tasks` spreads the factor tasks over the replicas (each keeps its
block's factors as tensors on its device) and then the pair tasks (a pair reads factors
on another local device: TensorFlow copies them). Under a `MultiWorkerMirroredStrategy`
with several workers they are shared by architecture too, keyed by the worker's devices
(as the fused block functions there); every worker computes every block's factors
itself (`_distribute.LocalTask`: sending them, by all-reduces of float64 buffers, cost
more than computing them), and the pairs are split between the workers like fused
blocks. Every worker must cut the same blocks, and the sizes compiled are each process's
own history: the path of a call (fused, fused then compile, factors of B) is gathered
from every worker (`_distribute.gather`) and the factors are used only when all decided
alike. TPUStrategy, other strategies and replica context keep the fused path.
"""

import collections
import logging
import math
import threading

import numpy as np
import tensorflow as tf

from keras_ntk import _batching, _distribute
from keras_ntk._costs import FACTOR_SIZES, Profile, block_estimates, estimates
from keras_ntk._jacobians import per_example_jacobians, recurrent_layers
from keras_ntk._structured import (
    Tokens, _gram, _shaped, _weight_gradients, contract_structured, contraction_form,
    structured_factors)
from keras_ntk._validation import NonFiniteError

# Block sizes B of the factor path: a call whose padded block is below MIN_SIZE keeps
# the fused block function (tiny calls: one dispatch, no factors held); above it, the
# target B is its rung capped at MAX_SIZE. A compiled B up to 2× the target is reused
# (padding up), a smaller one while the pairs of blocks number at most MAX_PAIRS. A call
# on a rung whose fused function is compiled runs it; a call that would compile anyway
# (nothing usable compiled) compiles its fused rung and the factor functions of B; only
# the other calls, on new rungs, run through factors.
# (The memory estimate of a first call, `_costs.factor_stage`, assumes these sizes.)
MIN_SIZE, MAX_SIZE = FACTOR_SIZES
MAX_PAIRS = 64

_PAIR_FUNCTIONS = collections.OrderedDict()  # (spec, axes, dtype, jit): pair function
_PAIR_LIMIT = 32
_LOCK = threading.RLock()
_LOGGER = logging.getLogger("keras_ntk")

# Strategies the factor path runs under (one machine: its factors are local tensors).
_SINGLE_WORKER = (tf.distribute.MirroredStrategy, tf.distribute.OneDeviceStrategy)


def strategy_devices():
    """None without a strategy; the devices of a single-worker strategy in scope (part of
    the keys of its factor functions and compiled sizes); False under any other strategy
    (a multi-worker one with several workers: see `worker_devices`; TPUStrategy, ...) or
    in replica context: the fused path there."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if (not tf.distribute.in_cross_replica_context() or not isinstance(strategy, _SINGLE_WORKER)
            or _distribute.multi_worker_strategy() is not None):
        return False
    return tuple(strategy.extended.worker_devices)


def worker_devices():
    """`strategy_devices()`, or under a multi-worker strategy with several workers
    ("workers", this worker's devices): part of the keys of factor functions and sizes;
    False where functions are the model's own and the factor path is off."""
    devices = strategy_devices()
    if devices is False and _distribute.multi_worker_strategy() is not None:
        strategy = tf.distribute.get_strategy()
        return ("workers",) + tuple(strategy.extended.worker_devices)
    return devices


def budget_fits(s, batch_size, vector=False):
    """`fits(p1, p2)`: whether padded blocks of p1 × p2 fit the memory budget of the
    set-up `s` with its result (`_batching.reused_sizes`), and `batch_size` if given.
    Θ(x, x) counts both block functions (`kernel_tasks` compiles the two). Under a
    multi-worker strategy nothing but the call's own rung fits: the sizes a process
    already ran at are its own history, and every worker must cut the same blocks."""
    plan = s.plan
    same = s.same and not vector
    result = sum(s.n1 * (1 if vector else s.n2) * ax.kernel_size for ax in plan.out_axes)
    result *= plan.dtype.size * (len(plan.groups) if plan.groups else 1)

    def fits(p1, p2):
        if batch_size is not None and max(p1, p2) > batch_size:
            return False
        if _distribute.multi_worker_strategy() is not None:
            return False
        _, peak = block_estimates(s.implementation, s.profile, plan.out_axes,
                                  s.n1 + p1 if same else s.n1, p1, p2, same,
                                  plan.dtype.size, vector)
        return peak + result <= s.budget

    return fits


def factor_spec(profile, out_axes, size):
    """Per output, per rule: 0 when contracted through W at size × size, else the
    vocabulary (gathers) or -1 (a factorized (a, g) pair)."""
    spec = []
    for axes in out_axes:
        per_rule = []
        for dims in profile.rule_dims:
            form, _ = contraction_form(size, size, dims, axes)
            per_rule.append(0 if form == "per_example" else (dims.a if dims.gather else -1))
        spec.append(tuple(per_rule))
    return tuple(spec)


def factor_bytes(profile, out_axes, spec, itemsize):
    """Bytes of the factors of one example (what is kept per example of x1 and x2)."""
    total = 0
    for axes, per_rule in zip(out_axes, spec):
        for dims, kind in zip(profile.rule_dims, per_rule):
            if kind == 0:
                total += axes.size * dims.g * dims.a * dims.b
            else:
                total += (dims.p if dims.gather else dims.p * dims.g * dims.a)
                total += axes.size * dims.p * dims.g * dims.b
        total += axes.size * profile.n_rest
    return total * itemsize


def layout(plan, rules):
    """None, or for per-layer kernels (groups, group of each rule): the weight groups
    as indices into `plan.weights` (static: part of the compiled functions' keys)."""
    if plan.groups is None:
        return None
    group_of = {id(w): g for g, (_, ws) in enumerate(plan.groups) for w in ws}
    return (tuple(group_of[id(w)] for w in plan.weights),
            tuple(group_of[id(rule.variables()[0])] for rule in rules))


def block_factors(plan, rules, spec, x):
    """Per output k: (W (N, *S, P) or None, ((a or token ids, g), ...)) of the block x;
    for per-layer kernels W is a tuple of one W (or None) per weight group."""
    n = int(tf.nest.flatten(x)[0].shape[0])
    covered = {id(v) for rule in rules for v in rule.variables()}
    rest = [w for w in plan.weights if id(w) not in covered]
    groups = layout(plan, rules)
    if groups is not None:
        weight_group = dict(zip((id(w) for w in plan.weights), groups[0]))
    factors = structured_factors(plan.model, x, rules, plan.training, plan.sizes,
                                 plan.dtype) if rules else []
    jac = None
    if rest:
        jac = per_example_jacobians(plan.model, x, plan.differentiable(rest), plan.training,
                                    plan.sizes)
    out = []
    for k, axes in enumerate(plan.out_axes):
        ws = [[] for _ in range(max(groups[0]) + 1)] if groups is not None else [[]]
        pairs = []
        for r, ((a, g_per_output), kind) in enumerate(zip(factors, spec[k])):
            g = g_per_output[k]
            if kind == 0:
                _, dims, gs = _shaped(a, g, axes)
                ws[groups[1][r] if groups else 0].append(
                    tf.cast(_weight_gradients(a, gs, dims, axes), plan.dtype))
            else:
                pairs.append((a.ids if isinstance(a, Tokens) else a, g))
        if jac is not None:
            jk = tf.cast(tf.reshape(jac[k], [n, *axes.shape, -1]), plan.dtype)
            if groups is None:
                ws[0].append(jk)
            else:  # the columns of each weight (in `rest` order) to its group
                start = 0
                for w in rest:
                    size = int(np.prod(w.shape))
                    ws[weight_group[id(w)]].append(jk[..., start:start + size])
                    start += size
        w = tuple((tf.concat(p, -1) if len(p) > 1 else p[0]) if p else None for p in ws)
        out.append((w if groups is not None else w[0], tuple(pairs)))
    return tuple(out)


def _grouped_pair_kernels(spec, out_axes, dtype, f1, f2, groups):
    """The group-major list [Θ_{g, k}] of per-layer kernels from two blocks' factors."""
    count = max(groups[0]) + 1
    parts = {}
    for k, axes in enumerate(out_axes):
        (w1, pairs1), (w2, pairs2) = f1[k], f2[k]
        for g in range(count):
            if w1[g] is not None:
                parts[(g, k)] = _gram(w1[g], w2[g], axes, dtype)
        pair_rules = [r for r, kind in enumerate(spec[k]) if kind != 0]
        for (a1, g1), (a2, g2), r in zip(pairs1, pairs2, pair_rules):
            kind = spec[k][r]
            if kind > 0:
                a1, a2 = Tokens(a1, kind), Tokens(a2, kind)
            part = contract_structured(a1, g1, a2, g2, axes, dtype)
            key = (groups[1][r], k)
            parts[key] = part if key not in parts else parts[key] + part
    n1 = int(next(t for t in tf.nest.flatten(f1) if t is not None).shape[0])
    n2 = int(next(t for t in tf.nest.flatten(f2) if t is not None).shape[0])
    kernels = []
    for g in range(count):
        for k, axes in enumerate(out_axes):
            kern = parts.get((g, k))
            if kern is None:
                kern = tf.zeros([n1, n2, *axes.kernel_shape], dtype)
            kernels.append(kern / axes.trace_size)
    return kernels


def _pair_kernels(spec, out_axes, dtype, f1, f2, groups=None):
    if groups is not None:
        return _grouped_pair_kernels(spec, out_axes, dtype, f1, f2, groups)
    kernels = []
    for k, axes in enumerate(out_axes):
        (w1, pairs1), (w2, pairs2) = f1[k], f2[k]
        kinds = [kind for kind in spec[k] if kind != 0]
        kern = _gram(w1, w2, axes, dtype) if w1 is not None else None
        for (a1, g1), (a2, g2), kind in zip(pairs1, pairs2, kinds):
            if kind > 0:
                a1, a2 = Tokens(a1, kind), Tokens(a2, kind)
            part = contract_structured(a1, g1, a2, g2, axes, dtype)
            kern = part if kern is None else kern + part
        if kern is None:  # no weight reaches this output
            n1 = int(tf.nest.flatten(f1)[0].shape[0])
            n2 = int(tf.nest.flatten(f2)[0].shape[0])
            kern = tf.zeros([n1, n2, *axes.kernel_shape], dtype)
        kernels.append(kern / axes.trace_size)
    return kernels


def pair_function(spec, out_axes, dtype, jit, groups=None):
    """The compiled Θ(block 1, block 2) from two blocks' factors (model-independent);
    `groups` (`layout`): per-layer kernels, group-major."""
    jit = (jit or _batching._JIT == "1") and _batching._JIT != "0"
    key = (spec, tuple((ax.shape, ax.trace, ax.diag) for ax in out_axes), dtype.name, jit,
           groups)
    with _LOCK:
        fn = _PAIR_FUNCTIONS.get(key)
        if fn is None:
            fn = _batching._JitFallback(
                lambda f1, f2: _pair_kernels(spec, out_axes, dtype, f1, f2, groups), jit)
            _PAIR_FUNCTIONS[key] = fn
            while len(_PAIR_FUNCTIONS) > _PAIR_LIMIT:
                _PAIR_FUNCTIONS.popitem(last=False)
        else:
            _PAIR_FUNCTIONS.move_to_end(key)
    return fn


def _factor_function(s, spec, rules):
    """The compiled factors of one block, shared by architecture when possible."""
    plan = s.plan
    devices = worker_devices()
    key = ("factors", s.implementation, spec, plan.dtype.name,
           tuple((ax.trace, ax.diag) for ax in plan.out_axes), plan.training,
           layout(plan, rules), devices)
    fn = plan.functions.get(key)
    if fn is not None:
        return fn
    jit = not recurrent_layers(plan.model)
    index = {id(v): i for i, v in enumerate(plan.model.variables)}
    fn = None
    # Under a strategy too (keyed by its devices): each replica passes its copy of the
    # weights (`_batching._argument` in replica context).
    if all(id(w) in index for w in plan.weights):
        def builder(state, values, x):
            return block_factors(state[0].with_values(values), state[1], spec, x)

        shared_key = key + (tuple(index[id(w)] for w in plan.weights),)
        fn = _batching.shared_compiled(plan.model, shared_key, builder, (plan, rules),
                                       jit_allowed=jit)
    if fn is None:
        own_key = key + (tuple(id(w) for w in plan.weights),)
        fn = _batching.compiled(plan.model, own_key,
                                lambda x: block_factors(plan, rules, spec, x), jit=jit)
    shared = getattr(fn, "shared", None)
    if shared is None or shared.shareable:
        plan.functions[key] = fn
    return fn


_SIZES = collections.OrderedDict()  # (architecture, options): factor sizes compiled


def _sizes_compiled(s):
    """The set of block sizes whose factor function has run for this model (or, for a
    known architecture, any model of it) and options, and ("fused", p1, p2, same) for
    the one-block rungs the fused function ran at; updated by the caller."""
    plan = s.plan
    options = (s.implementation, plan.dtype.name,
               tuple((ax.trace, ax.diag) for ax in plan.out_axes), plan.training,
               layout(plan, s.rules if s.implementation == "structured" else []))
    arch = _batching.architecture_key(plan.model)
    index = {id(v): i for i, v in enumerate(plan.model.variables)}
    devices = worker_devices()  # a strategy's functions are compiled on its devices
    if arch is None or any(id(w) not in index for w in plan.weights):
        return plan.functions.setdefault(("factor sizes", devices) + options, set())
    key = (arch, options, tuple(index[id(w)] for w in plan.weights), devices)
    with _LOCK:
        sizes = _SIZES.setdefault(key, set())
        _SIZES.move_to_end(key)
        while len(_SIZES) > _PAIR_LIMIT:
            _SIZES.popitem(last=False)
    return sizes


def choose_size(compiled_sizes, n1, n2, block):
    """The block size B of the factor path for n1 × n2 with today's block `block`, or None.

    The target is today's padded block capped at MAX_SIZE (None below MIN_SIZE). A
    compiled size up to 2× the target is reused (padding up), else the largest smaller
    compiled size whose pairs of blocks number at most MAX_PAIRS, else the target.
    """
    target = _batching.padded_size(max(n1, n2), block)
    if target < MIN_SIZE:
        return None
    target = min(target, MAX_SIZE)
    # (A size above `block`, the budget's block for this N, is checked in `factor_tasks`.)
    compiled_sizes = [b for b in compiled_sizes if isinstance(b, int)]
    larger = [b for b in compiled_sizes if target <= b <= 2 * target]
    if larger:
        return min(larger)
    smaller = [b for b in compiled_sizes if b < target
               and math.ceil(n1 / b) * math.ceil(n2 / b) <= MAX_PAIRS]
    return max(smaller) if smaller else target


def factor_tasks(s, results, batch_size, fused_tasks, place=None, tag="fused"):
    """[(fn, args, on_done)] computing Θ: through block factors, else `fused_tasks()`.

    `place(a0, a1, b0, b1, mirror)` gives the on_done of the block of rows a0:a1 and
    columns b0:b1 (default: written into `results`, `_batching.placer`); `tag` names
    the fused functions whose rungs are tracked ("vector": `ntk_vector_product`'s).

    Used for structured/jacobian kernels (training mode too, unless it couples the
    examples: `plan.coupled`, never padded), per-layer ones too, without
    `batch_size`, with no strategy, a single-worker one (`strategy_devices`) or a
    multi-worker one whose workers all decide alike (module docstring), when the factors
    of every block, one pair's working memory per local replica and the result fit the
    budget, and the fused function of this call's rung has not run (a call that compiles
    anyway runs fused and compiles the factor functions after its last block, on every
    replica). The factors of all blocks are computed first (one task each; under R
    replicas of one machine padded with tasks doing nothing to a multiple of R, so that
    no pair runs beside the factors it reads; under several workers, by every worker),
    then one task per pair of blocks.
    """
    plan = s.plan
    workers = _distribute.multi_worker_strategy()
    if (s.implementation not in ("structured", "jacobian") or plan.coupled
            or batch_size is not None
            or worker_devices() is False):
        return fused_tasks()
    strategy = _batching._strategy()  # several replicas: tasks run in replica context
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    local = len(strategy.extended.worker_devices) if workers is not None else replicas
    compiled_sizes = _sizes_compiled(s)
    rules = s.rules if s.implementation == "structured" else []
    profile = s.profile
    if not rules:
        profile = Profile(profile.out_shapes, profile.activations, [], profile.n_params,
                          profile.n_params, profile.ops)
    out_axes, itemsize = plan.out_axes, plan.dtype.size
    rung = (tag, _batching.padded_size(s.n1, s.block),
            _batching.padded_size(s.n2, s.block), s.same)

    def decide():
        """(0, 0): the fused path; (1, B): fused, then compile the factor functions of
        B; (2, B): through the factors of blocks of B."""
        if "unusable" in compiled_sizes:
            return 0, 0
        size = choose_size(compiled_sizes, s.n1, s.n2, s.block)
        if size is None or rung in compiled_sizes:  # compiled rung: fewer dispatches
            return 0, 0
        spec = factor_spec(profile, out_axes, size)
        blocks = len(_batching.block_ranges(s.n1, size))
        if not s.same:
            blocks += len(_batching.block_ranges(s.n2, size))
        held = blocks * size * factor_bytes(profile, out_axes, spec, itemsize)
        _, working = estimates(s.implementation, s.profile, out_axes, size, size, False,
                               itemsize)
        if held + local * working + sum(r.nbytes for r in results) > s.budget:
            return 0, 0
        return (1 if size not in compiled_sizes else 2), size

    mode, size = decide()
    if workers is not None:
        # Every worker must cut the same blocks, and its compiled sizes are its own
        # history: the factor path only when every worker decides alike.
        decisions = _distribute.gather(workers, [mode, size])
        if not (decisions == decisions[0]).all():
            mode, size = 0, 0
    if mode == 0:
        return fused_tasks()
    spec = factor_spec(profile, out_axes, size)
    rows = _batching.block_ranges(s.n1, size)
    cols = rows if s.same else _batching.block_ranges(s.n2, size)
    if place is None:
        def place(a0, a1, b0, b1, mirror):
            return _batching.placer(results, out_axes * (len(plan.groups or ()) or 1),
                                    a0, a1, b0, b1, mirror)
    fn = _factor_function(s, spec, rules)
    pair = pair_function(spec, out_axes, plan.dtype, jit=not recurrent_layers(plan.model),
                         groups=layout(plan, rules))
    if mode == 1:
        # Something compiles anyway: the fused function of this rung (faster for repeated
        # calls at this N), and with it, once per model (or architecture) and options,
        # the two factor functions, so that any other N later compiles nothing. They
        # compile and run once AFTER the fused blocks: with oneDNN, TensorFlow's CPU
        # allocator is a BFC pool that never returns memory, so the factors' buffers
        # allocated first stayed resident under the fused blocks' (MLP-1 jacobian, 256
        # examples: a first-call peak of 1455 MiB, 844 MiB in this order).
        x = _batching.padded_slice(s.x1, 0, min(s.n1, size), size)

        def compile_here():
            f = fn(x if strategy is None else tf.nest.map_structure(tf.convert_to_tensor, x))
            pair(f, f)

        def compile_factors():
            try:
                if strategy is None:
                    compile_here()
                else:  # traced per device: once on every replica, in replica context
                    errors = []

                    def each_replica():
                        try:
                            compile_here()
                        except Exception as error:  # noqa: BLE001 - re-raised below
                            errors.append(error)
                        return []

                    strategy.run(each_replica)
                    if errors:
                        raise errors[0]
            except NonFiniteError:  # the model's weights (checked in the shared function)
                raise
            except Exception as error:  # noqa: BLE001 - the fused result stands
                _LOGGER.debug("keras_ntk: no block factors for this model: %s", error)
                compiled_sizes.add("unusable")
                return
            compiled_sizes.update([size, rung])

        tasks = fused_tasks()
        last, args, on_done = tasks[-1]

        def place_then_compile(blocks):
            on_done(blocks)
            compile_factors()

        tasks[-1] = (last, args, place_then_compile)
        return tasks
    factors1, factors2 = [None] * len(rows), [None] * len(cols)

    def factor_task(x, store, i, a0, a1):
        def run(xb):
            store[i] = fn(xb)  # kept as tensors for the pairs
            return []
        task = (run, (_batching.padded_slice(x, a0, a1, size),), lambda out: None)
        # Several workers: each computes every block's factors itself (cheaper than
        # sending them: a round of all-reduces cost more than a block's factors here).
        return _distribute.LocalTask(task) if workers is not None else task

    tasks = [factor_task(s.x1, factors1, i, a0, a1) for i, (a0, a1) in enumerate(rows)]
    if s.same:
        factors2 = factors1
    else:
        tasks += [factor_task(s.x2, factors2, j, b0, b1) for j, (b0, b1) in enumerate(cols)]
    # Under R replicas `run_tasks` runs R tasks at a time: the pairs start a new round,
    # after every factor (a short last round would otherwise repeat a factor task).
    if workers is None:
        tasks += [(lambda: [], (), lambda out: None)] * (-len(tasks) % replicas)
    for i, (a0, a1) in enumerate(rows):
        for j, (b0, b1) in enumerate(cols):
            if s.same and j < i:
                continue
            tasks.append((lambda i=i, j=j: pair(factors1[i], factors2[j]), (),
                          place(a0, a1, b0, b1, s.same and i != j)))
    return tasks


def trace_count(*models):
    """Traces so far of the compiled functions serving `models` (their own, their
    architectures' and the block factors' pair functions), or with no model of every
    block, factor and pair function of the process; each function counted once. A
    new trace is a new compile (for tests, benchmarks and diagnostics)."""
    if models:
        functions = [f for model in models for f in _batching.block_functions(model)]
    else:
        with _batching._SHARED_LOCK:
            functions = [e.fn for e in _batching._SHARED.values()]
        for cache in list(_batching._COMPILED.values()):
            functions += [f for f in cache.values() if isinstance(f, _batching._JitFallback)]
    functions += list(_PAIR_FUNCTIONS.values())
    unique = {id(f): f for f in functions}.values()
    return sum(f._plain.experimental_get_tracing_count()
               + (f._xla.experimental_get_tracing_count() if f._xla is not None else 0)
               for f in unique)
