"""Empirical neural tangent kernel of any Keras model.

The empirical NTK of a model f with trainable weights θ is

    Θ(x1, x2) = Σ_θ ∂f(x1)/∂θ · ∂f(x2)/∂θᵀ = J(x1) J(x2)ᵀ.

This module computes it exactly, in blocks of x1 × x2 whose working memory stays
within a budget, with three implementations behind one switch (`jacobian`,
`ntvp`, `structured`) and a cost model that picks one (`auto`). Shapes follow
neural-tangents: output axes listed in `trace_axes` are averaged, axes listed
in `diagonal_axes` are kept once, every other output axis appears twice.

This module holds the plan (validated arguments, the weights, the
implementation and block size) and the kernel of one block for each
implementation; the pieces it builds on live in modules of their own
(docs/architecture.md draws them):

* `_output_axes`: the trace/diagonal conventions as einsum subscripts (numpy);
* `_jacobians`: per-example Jacobians and their contraction;
* `_structured`: the structured layer rules and the Keras layer patching;
* `_costs`: the cost model of `implementation="auto"` and the memory budget;
* `_batching`: blocks, the compiled-function cache and replica placement;
* `_vector_product`: the product Θ·v of `ntk_vector_product`;
* `nngp`: the empirical NNGP (re-exported here).
"""

import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_ntk import _block_factors, _distribute, _validation
from keras_ntk._batching import (
    compiled, kernel_tasks, model_cache, num_examples, run_tasks, shared_compiled, shared_value,
    slice_examples, to_host)
from keras_ntk._batching import frozen_state as _frozen_state
from keras_ntk._costs import choose_block, default_memory_budget, model_profile
from keras_ntk._jacobians import (
    call_flat, contract_jacobians, full_batch_jacobians, jvps, per_example_jacobians,
    recurrent_layers)
from keras_ntk._output_axes import OutputAxes, reduce_full_kernel
from keras_ntk._structured import (
    contract_rules, contract_structured, structured_factors, structured_rules)
from keras_ntk._vector_product import vector_product
from keras_ntk._weights import couples_examples, select_weights, weight_groups
from keras_ntk.nngp import empirical_nngp

# Re-exported: `keras_ntk.ntk` has always offered these names.
__all__ = ["empirical_nngp", "empirical_ntk", "ntk_vector_product", "reduce_full_kernel"]

_IMPLEMENTATIONS = ("auto", "jacobian", "ntvp", "structured")
_ZERO = tf.UnconnectedGradients.ZERO
_NON_FINITE_REASON = (
    "the model's outputs or their gradients overflow or are undefined at some input (e.g. "
    "log(0), exp of a large value, float16 range); compute in dtype='float64' or check the "
    "model at those inputs")


def _group_columns(groups, weights):
    """Per group, the flat column indices of its weights in `weights` concatenated."""
    offsets, start = {}, 0
    for w in weights:
        size = int(np.prod(w.shape, dtype=np.int64))
        offsets[id(w)] = np.arange(start, start + size, dtype=np.int64)
        start += size
    out = []
    for _, ws in groups:
        cols = [offsets[id(w)] for w in ws if id(w) in offsets]
        out.append(np.concatenate(cols) if cols else np.zeros(0, np.int64))
    return out


# ----------------------------------------------------------------- block functions


class _Plan:
    """Everything about a (model, options) pair that does not depend on values."""

    def __init__(self, model, weights, out_axes, training, dtype, coupled, groups=None):
        self.groups = groups  # [(name, [weights])] for per-layer kernels, else None
        # Held weakly: the compiled functions cached for `model` close over the
        # plan, and a cache value holding its key strongly would never free it.
        self._model = weakref.ref(model)
        self.weights = weights
        self.out_axes = out_axes
        self.sizes = [ax.size for ax in out_axes]
        self.training = training
        self.dtype = dtype
        self.coupled = coupled
        self.values = None  # {id(variable): tensor} inside a function shared by architecture
        self.functions = {}  # (implementation, same, under a strategy): block function

    def differentiable(self, weights):
        """The tensors the kernel differentiates for `weights` (the variables themselves,
        or the arguments that replace them in a function shared by architecture)."""
        if self.values is None:
            return weights
        return [self.values[id(w)] for w in weights]

    def with_values(self, values):
        view = object.__new__(_Plan)
        view.__dict__.update(self.__dict__)
        view.values = values
        return view

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError(
                "The model of this compiled kernel function no longer exists. Received: a "
                "call after the model was freed"
            )
        return model


def _concat(x1, x2):
    return tf.nest.map_structure(lambda a, b: tf.concat([a, b], 0), x1, x2)


def _batch_size_of(x):
    return int(tf.nest.flatten(x)[0].shape[0])


def _jacobian_block(plan, x1, x2):
    same = x2 is None
    x = x1 if same else _concat(x1, x2)
    n1 = _batch_size_of(x1)
    if plan.coupled:
        j1 = full_batch_jacobians(plan.model, x1, plan.weights, plan.training, plan.sizes)
        j2 = j1 if same else full_batch_jacobians(
            plan.model, x2, plan.weights, plan.training, plan.sizes
        )
    else:
        j = per_example_jacobians(plan.model, x, plan.differentiable(plan.weights),
                                  plan.training, plan.sizes)
        j1 = [t[:n1] for t in j]
        j2 = j1 if same else [t[n1:] for t in j]
    if plan.groups is not None:
        return _grouped_jacobian_kernels(plan, plan.weights, j1, j2, same, {})
    kernels = []
    for k, axes in enumerate(plan.out_axes):
        jk1 = tf.reshape(j1[k], [-1, *axes.shape, j1[k].shape[-1]])
        jk2 = tf.reshape(j2[k], [-1, *axes.shape, j2[k].shape[-1]])
        kernels.append(contract_jacobians(jk1, jk2, axes, plan.dtype) / axes.trace_size)
    return kernels


def _grouped_jacobian_kernels(plan, weights, j1, j2, same, kernels):
    """Adds each weight group's Θ (from Jacobian columns) into kernels[(g, k)].

    Returns the flat list [Θ_{g, k}] (group-major) of unnormalized sums plus
    what `kernels` held, each divided by the traced size.
    """
    columns = _group_columns(plan.groups, weights)
    for g, cols in enumerate(columns):
        if cols.size == 0:
            continue
        for k, axes in enumerate(plan.out_axes):
            jk1 = tf.gather(j1[k], cols, axis=-1)
            jk2 = jk1 if same else tf.gather(j2[k], cols, axis=-1)
            jk1 = tf.reshape(jk1, [-1, *axes.shape, cols.size])
            jk2 = tf.reshape(jk2, [-1, *axes.shape, cols.size])
            kernels[(g, k)] = kernels.get((g, k), 0.0) + contract_jacobians(
                jk1, jk2, axes, plan.dtype)
    n1 = tf.shape(j1[0])[0]
    return _grouped_output(plan, kernels, n1, n1 if same else tf.shape(j2[0])[0])


def _grouped_output(plan, kernels, n1, n2):
    """The flat group-major list of per-group kernels (zeros where none)."""
    out = []
    for g in range(len(plan.groups)):
        for k, axes in enumerate(plan.out_axes):
            kern = kernels.get((g, k))
            if kern is None:
                shape = tf.concat([tf.cast(tf.stack([n1, n2]), tf.int32),
                                   tf.constant(list(axes.kernel_shape), tf.int32)], 0)
                kern = tf.zeros(shape, plan.dtype)
            out.append(kern / axes.trace_size)
    return out


def _structured_block(plan, rules, x1, x2):
    same = x2 is None
    x = x1 if same else _concat(x1, x2)
    n1 = _batch_size_of(x1)
    covered = {id(v) for rule in rules for v in rule.variables()}
    rest = [w for w in plan.weights if id(w) not in covered]
    factors = structured_factors(
        plan.model, x, rules, plan.training, plan.sizes, plan.dtype, heads=True)
    if plan.groups is not None:
        group_of = {id(w): g for g, (_, ws) in enumerate(plan.groups) for w in ws}
        grouped = {}
        for rule, (a, g_per_output) in zip(rules, factors):
            g = group_of[id(rule.variables()[0])]
            a1 = a[:n1]
            a2 = a1 if same else a[n1:]
            for k, axes in enumerate(plan.out_axes):
                gk = g_per_output[k]
                g1 = gk[:n1]
                g2 = g1 if same else gk[n1:]
                grouped[(g, k)] = grouped.get((g, k), 0.0) + contract_structured(
                    a1, g1, a2, g2, axes, plan.dtype, rule.has_bias_column())
        n_1 = tf.shape(tf.nest.flatten(x1)[0])[0]
        n_2 = n_1 if same else tf.shape(tf.nest.flatten(x2)[0])[0]
        if not rest:
            return _grouped_output(plan, grouped, n_1, n_2)
        j = per_example_jacobians(plan.model, x, plan.differentiable(rest), plan.training,
                                  plan.sizes)
        j1 = [t[:n1] for t in j]
        j2 = j1 if same else [t[n1:] for t in j]
        return _grouped_jacobian_kernels(plan, rest, j1, j2, same, grouped)
    kernels = [0.0] * len(plan.out_axes)
    for k, axes in enumerate(plan.out_axes):
        # Per rule (a1, g1, a2, g2, bias column?), x2's factors the same objects when same.
        sides = []
        for rule, (a, g_per_output) in zip(rules, factors):
            a1, g1 = (a, g_per_output[k]) if same else (a[:n1], g_per_output[k][:n1])
            a2, g2 = (a1, g1) if same else (a[n1:], g_per_output[k][n1:])
            sides.append((a1, g1, a2, g2, rule.has_bias_column()))
        if sides:  # every rule's contribution, fused (_structured.contract_rules)
            kernels[k] = contract_rules(sides, axes, plan.dtype)
    if rest:
        j = per_example_jacobians(plan.model, x, plan.differentiable(rest), plan.training,
                                  plan.sizes)
        for k, axes in enumerate(plan.out_axes):
            jk = tf.reshape(j[k], [-1, *axes.shape, j[k].shape[-1]])
            jk1 = jk[:n1]
            jk2 = jk1 if same else jk[n1:]
            kernels[k] += contract_jacobians(jk1, jk2, axes, plan.dtype)
    out = []
    for k, axes in enumerate(plan.out_axes):
        kern = kernels[k]
        if isinstance(kern, float):  # no weight reaches this output
            n2 = n1 if same else _batch_size_of(x2)
            kern = tf.zeros([n1, n2, *axes.kernel_shape], plan.dtype)
        out.append(kern / axes.trace_size)
    return out


def _ntvp_products(plan, x1, x2, cotangents):
    """Θ(x1, x2)·w for a batch of cotangents w on f(x2): returns J(x1) J(x2)ᵀ w.

    `cotangents`: one tensor (V, N2, *S_k) per output; returns one (V, N1, *S_k)
    per output. VJPs then JVPs (forward accumulator), vectorized over V.
    """
    weights = plan.weights
    primals = [w.value if hasattr(w, "value") else w for w in weights]

    def one(cot):
        with tf.GradientTape() as tape:
            y2 = call_flat(plan.model, x2, plan.training)
        # each output's own dtype (layers may compute in another dtype than the model's)
        cot = [tf.cast(c, y.dtype) for c, y in zip(cot, y2)]
        u = tape.gradient(y2, weights, output_gradients=cot, unconnected_gradients=_ZERO)
        return jvps(plan.model, x1, plan.training, primals, u)

    return tf.vectorized_map(one, cotangents, fallback_to_while_loop=True)


def _ntvp_block(plan, x1, x2):
    """The kernel block from NTK-vector products with the basis of f(x2) outputs."""
    x2 = x1 if x2 is None else x2
    n1, n2 = _batch_size_of(x1), _batch_size_of(x2)
    kernels = []
    for k, axes in enumerate(plan.out_axes):
        basis = tf.eye(n2 * axes.size, dtype=plan.model_dtype)
        cots = [
            tf.zeros([n2 * axes.size, n2, *ax.shape], plan.model_dtype)
            for ax in plan.out_axes
        ]
        cots[k] = tf.reshape(basis, [n2 * axes.size, n2, *axes.shape])
        prods = _ntvp_products(plan, x1, x2, cots)[k]  # (n2*S, n1, *S)
        full = tf.reshape(prods, [n2, *axes.shape, n1, *axes.shape])
        full = tf.cast(full, plan.dtype)
        nd = len(axes.shape)
        perm = list(range(nd + 1, 2 * nd + 2)) + list(range(nd + 1))
        full = tf.transpose(full, perm)  # (n1, *S, n2, *S)
        kern = tf.einsum(f"n{axes.sub1}m{axes.sub2}->nm{axes.out}", full)
        kernels.append(kern / axes.trace_size)
    return kernels


# ----------------------------------------------------------------- set-up shared by the API


class KernelSetup:
    """Validated arguments, the plan, the implementation and the block size."""


def _plan_key(setup_key, trace_axes, diagonal_axes, dtype, per_layer):
    """The cache key of a plan, or None for options that cannot be hashed."""
    frozen = lambda axes: tuple(axes) if isinstance(axes, (list, tuple)) else axes  # noqa: E731
    key = ("plan", setup_key, frozen(trace_axes), frozen(diagonal_axes), dtype, bool(per_layer))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _new_plan(model, weights, profile, trace_axes, diagonal_axes, training, dtype, coupled,
              per_layer):
    out_axes = [OutputAxes(shape, trace_axes, diagonal_axes) for shape in profile.out_shapes]
    if dtype is None:
        dtype = keras.backend.standardize_dtype(model.dtype if hasattr(model, "dtype") else "float32")
    try:
        dtype = tf.as_dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or not dtype.is_floating:
        raise ValueError(
            f"Expected `dtype` to be a floating dtype such as 'float32' or 'float64'. "
            f"Received: dtype={dtype}"
        )
    groups = weight_groups(model, weights) if per_layer else None
    plan = _Plan(model, weights, out_axes, training, dtype, coupled, groups)
    plan.model_dtype = tf.as_dtype(keras.backend.standardize_dtype(
        getattr(model, "compute_dtype", "float32")))
    return plan


def kernel_setup(model, x1, x2, trace_axes, diagonal_axes, implementation, batch_size,
                 memory_budget, training, dtype, vector=False, variables=None,
                 per_layer=False, check_weights=True):
    """A `KernelSetup` for the arguments of `empirical_ntk` (vector=True: of
    `ntk_vector_product`): what is computed, by which implementation, in blocks
    of how many examples (`.implementation`, `.block`). Raises the ValueError of the
    memory budget (and with `check_weights` of non-finite `.weights`) before any work.
    """
    # (`trainable_weights` walks every layer: read once, 12 µs of a warm MLP call each.)
    if not callable(model) or not (isinstance(model, keras.layers.Layer)
                                   or hasattr(model, "trainable_weights")):
        raise TypeError(
            f"Expected `model` to be a Keras model or layer. Received: model={model}"
        )
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"Expected `implementation` to be one of {_IMPLEMENTATIONS}. "
            f"Received: implementation={implementation}"
        )
    _validation.check_int(batch_size, "batch_size", 1, allow_none=True)
    _validation.check_number(memory_budget, "memory_budget", 0, strict_minimum=True,
                             allow_none=True)
    _validation.check_float_dtype(dtype)
    s = KernelSetup()
    s.x1 = to_host(x1, "x1")
    s.x2 = to_host(x2, "x2")
    s.same = x2 is None
    s.n1 = num_examples(s.x1, "x1")
    s.n2 = s.n1 if s.same else num_examples(s.x2, "x2")
    _validation.check_matching_inputs(s.x1, s.x2)
    _validation.check_finite(s.x1, "x1")
    _validation.check_finite(s.x2, "x2")
    trainable = model.trainable_weights if getattr(model, "built", True) else []
    if not trainable:
        model(slice_examples(s.x1, 0, 1), training=False)  # builds a subclassed model
        trainable = model.trainable_weights
    if not trainable:
        raise ValueError(
            f"Expected `model` to have trainable weights. Received: model={model.name} "
            "with none"
        )
    s.weights = weights = select_weights(model, variables, trainable)
    if check_weights:
        _validation.check_finite_weights(weights)
    training = bool(training)
    coupled = training and couples_examples(model)
    # Rules and the traced profile depend only on the model, the weights and
    # the per-example input signature: cache them so repeated calls are cheap.
    cache_key = (
        "setup", training, coupled, tuple(id(w) for w in weights),
        tuple((tuple(t.shape[1:]), t.dtype.str) for t in tf.nest.flatten(s.x1)),
    )
    per_model = model_cache(model)
    if cache_key not in per_model:
        rules = [] if coupled else structured_rules(model, weights)
        # The profile (shapes and counts only) is shared by the models of an
        # architecture: a new model of a known architecture is not traced.
        per_model[cache_key] = (rules, shared_value(
            model, cache_key[:3] + cache_key[4:], weights,
            lambda: model_profile(model, s.x1, weights, rules, training)))
    rules, profile = per_model[cache_key]
    # The plan (options too) is cached: a repeated call only validates and picks the block.
    plan_key = _plan_key(cache_key, trace_axes, diagonal_axes, dtype, per_layer)
    plan = per_model.get(plan_key) if plan_key is not None else None
    if plan is None:
        plan = _new_plan(model, weights, profile, trace_axes, diagonal_axes, training, dtype,
                         coupled, per_layer)
        if plan_key is not None:
            per_model[plan_key] = plan
    out_axes, dtype, groups = plan.out_axes, plan.dtype, plan.groups
    itemsize = dtype.size
    budget = (_distribute.common_budget(default_memory_budget()) if memory_budget is None
              else int(memory_budget))
    result_bytes = sum(s.n1 * (1 if vector else s.n2) * ax.kernel_size for ax in out_axes)
    result_bytes *= itemsize * (len(groups) if groups else 1)

    candidates = ["jacobian", "ntvp"]
    if rules and not coupled:
        candidates.insert(0, "structured")
    if implementation == "auto":
        order = candidates
    elif implementation == "structured" and not rules:
        order = ["jacobian"]  # nothing structured in this model: the rule is the Jacobian
    elif implementation == "structured" and coupled:
        order = ["jacobian"]
    else:
        order = [implementation]

    # A vector product runs pairs of blocks (`_vector_product`): x1 against itself too.
    s.implementation, s.block = choose_block(
        order, profile, out_axes, s.n1, s.n2, s.same and not vector, itemsize, vector,
        batch_size, budget, result_bytes, memory_budget)
    if coupled and (s.block < s.n1 or s.block < s.n2):
        raise ValueError(
            "With training=True, BatchNormalization couples the examples of a batch, "
            "so the kernel cannot be computed in blocks; the whole of x1 and x2 must fit "
            f"in one block (needs {s.n1}×{s.n2}, got blocks of {s.block}). Use "
            "training=False (the default) or a larger memory_budget/batch_size. "
            f"Received: training={training}"
        )
    s.plan, s.rules, s.profile, s.out_axes, s.budget = plan, rules, profile, out_axes, budget
    return s


def _block_function(s, same):
    """The compiled block function, cached on the plan (a shared one once proved shareable)."""
    key = (s.implementation, same, tf.distribute.has_strategy())
    fn = s.plan.functions.get(key)
    if fn is None:
        fn = _new_block_function(s, same)
        shared = getattr(fn, "shared", None)
        if shared is None or shared.shareable:
            s.plan.functions[key] = fn
    return fn


def _new_block_function(s, same):
    plan, rules = s.plan, s.rules
    shared = _shared_block_function(s, same)
    if shared is not None:
        return shared
    key = (
        s.implementation, same, plan.training, plan.dtype.name,
        tuple((ax.trace, ax.diag) for ax in plan.out_axes),
        tuple(id(w) for w in plan.weights),
        None if plan.groups is None else tuple(tuple(id(w) for w in ws) for _, ws in plan.groups),
    )
    if s.implementation == "structured":
        impl = lambda x1, x2=None: _structured_block(plan, rules, x1, x2)  # noqa: E731
    elif s.implementation == "jacobian":
        impl = lambda x1, x2=None: _jacobian_block(plan, x1, x2)  # noqa: E731
    else:
        impl = lambda x1, x2=None: _ntvp_block(plan, x1, x2)  # noqa: E731
    # XLA compiled an unrolled LSTM's kernel (16 steps) in 67-87 s against 16-19 s of
    # tracing for a plain graph, which then ran faster (benchmarks/recurrent_ntk.py).
    jit = not recurrent_layers(plan.model)
    if same:
        return compiled(plan.model, key, lambda x1: impl(x1), jit=jit)
    return compiled(plan.model, key, lambda x1, x2: impl(x1, x2), jit=jit)


def _shared_block_function(s, same):
    """The block function shared by every model of this architecture (weights as
    arguments; `_batching.shared_compiled`; per-layer kernels keyed by their groups of
    weights as indices), or None: training mode, "ntvp", models of unknown architecture
    and strategies other than `MirroredStrategy`, `OneDeviceStrategy` and a multi-worker
    one (`_block_factors.worker_devices`; there each replica passes its copy of the
    weights) keep functions of their own."""
    plan = s.plan
    if (plan.training or s.implementation == "ntvp"
            or _block_factors.worker_devices() is False):
        return None
    index = {id(v): i for i, v in enumerate(plan.model.variables)}
    if any(id(w) not in index for w in plan.weights):
        return None
    key = (
        "shared", s.implementation, same, plan.dtype.name,
        tuple((ax.trace, ax.diag) for ax in plan.out_axes),
        tuple(index[id(w)] for w in plan.weights),
        None if plan.groups is None else tuple(
            tuple(index[id(w)] for w in ws) for _, ws in plan.groups),
    )
    implementation = s.implementation

    def builder(state, values, x1, x2=None):
        view, rules = state[0].with_values(values), state[1]
        if implementation == "structured":
            return _structured_block(view, rules, x1, x2)
        return _jacobian_block(view, x1, x2)

    return shared_compiled(plan.model, key, builder, (plan, s.rules),
                           jit_allowed=not recurrent_layers(plan.model))


def _pack_outputs(model, arrays):
    """Returns one array per model output in the structure of the model's outputs."""
    if len(arrays) == 1:
        return arrays[0]
    return list(arrays)


# ----------------------------------------------------------------- public API


def empirical_ntk(model, x1, x2=None, *, trace_axes=(-1,), diagonal_axes=(),
                  implementation="auto", batch_size=None, memory_budget=None,
                  training=False, dtype=None, verbose=0, variables=None, per_layer=False):
    """Empirical neural tangent kernel Θ(x1, x2) of a Keras model.

    With θ the model's trainable weights and f(x) its output,

        Θ(x1, x2) = Σ_θ ∂f(x1)/∂θ · ∂f(x2)/∂θᵀ = J(x1) J(x2)ᵀ.

    For an output of shape (N, d1, ..., dk) the kernel follows neural-tangents:
    the batch axes come first (N1, N2); output axes in `trace_axes` are summed
    along the diagonal and divided by their size (averaged); axes in
    `diagonal_axes` keep only the diagonal and appear once; every other output
    axis appears twice (the x1 index, then the x2 index), in order. So a model
    with O logits gives an N1×N2 kernel equal to the logit-average with the
    default `trace_axes=(-1,)`, and N1×N2×O×O with `trace_axes=()`. A model
    with several outputs gives a list with one kernel per output (no cross
    terms between outputs). A Keras `Linearize` wrapper has the kernel of the
    wrapped model at θ0 (its trainable weights are the offsets δ).

    Implementations (N examples, S outputs per example, P parameters):

    * `"structured"` (fastest): one forward pass in which every supported
      layer (`Dense`, `Conv1D`/`Conv2D`, `DepthwiseConv1D`/`2D`, `EinsumDense`,
      `Embedding`, `BatchNormalization` in inference mode, `LayerNormalization`;
      see `keras_ntk._structured`) records its input and a zero probe added to its
      pre-activation, and one backward pass of the batch-summed output per
      output entry (vectorized) that gives each example's cotangent g at each
      such layer (examples are independent in inference mode). The layer's
      per-example weight gradient is Σ_p a_p ⊗ g_p, so for a Dense layer
      Θ_layer = (A1 A2ᵀ + 1) ⊙ (G1 G2ᵀ) costs N1 N2 (d_in + d_out S) and no
      per-example gradient is ever formed; for convolutions the (patch,
      cotangent) pairs are contracted either in that factorized form
      (N1 N2 P_pos² (a + b S) FLOPs) or through per-example weight gradients
      (N S P_pos a b + N1 N2 S a b), whichever is cheaper per layer. Weights not
      covered by a rule (Conv3D, GroupNormalization, recurrent
      and custom layers, a `Linearize` wrapper's δ) use the per-example Jacobian for those weights only.
    * `"jacobian"`: per-example Jacobians (N S P numbers), vectorized over the
      examples, contracted over the weights: N1 N2 S² P FLOPs.
    * `"ntvp"`: products J(x1) (J(x2)ᵀ w) (a VJP then a JVP) for the N2 S basis
      cotangents w: never forms J; the slowest, useful when P is huge.
    * `"auto"`: the implementation with the fewest estimated FLOPs among those
      whose estimated peak memory fits `memory_budget` (structured when the model
      has layers with a structured rule, otherwise jacobian, ntvp when nothing else fits).

    Recurrent layers (LSTM, GRU, SimpleRNN, also in `Bidirectional`) are traced
    unrolled over their time steps and run as plain graphs (docs/ntk.md).

    Memory: the kernel is computed in blocks of x1 × x2 examples; the block size
    is `batch_size`, or else the largest power-of-two fraction of N whose
    estimated peak (block working memory plus the host result) fits
    `memory_budget`. If even one block cannot fit, a ValueError giving the
    estimate and the budget is raised before any computation. With `x2=None`
    only the blocks on and above the diagonal are computed. Under a
    `tf.distribute.Strategy` scope the blocks are spread over the replicas.
    Compiled block functions are cached per model and options (no retracing).

    Args:
        model: a Keras model or layer (Sequential, functional, subclassed or
            `keras_ntk.Linearize`), built or buildable by calling it on `x1`.
        x1: inputs, an array (or a structure of arrays for a multi-input
            model) with N1 examples on the leading axis.
        x2: inputs with N2 examples, or None for x1 (symmetry is exploited).
        trace_axes: output axes (batch axis 0 counted, negative allowed) to
            average over. Default: the last axis.
        diagonal_axes: output axes on which only the diagonal is kept.
        implementation: "auto", "jacobian", "ntvp" or "structured".
        batch_size: block size in examples; None picks it from the budget.
        memory_budget: bytes allowed for one block's working memory plus the
            result; None means a quarter of the available host memory.
        training: the mode the model runs in. With True and BatchNormalization
            the examples of a batch are coupled: the kernel is then that of
            f(x1) and f(x2) evaluated as two whole batches and blocks are
            refused.
        dtype: dtype of the contractions and of the result (e.g. "float64");
            default the model's dtype.
        verbose: 1 shows a `keras.utils.Progbar` over blocks.
        variables: the weights θ the kernel is taken with respect to: None
            for all trainable weights, or a list of trainable Keras Variables,
            nested layers or layer names (see `keras_ntk.Linearize`'s
            argument of the same name). E.g. `variables=["head"]` gives the
            kernel of the last layer alone, J_head J_headᵀ (a linear probe).
        per_layer: True returns the split Θ = Σ_l Θ_l over layers: a dict
            {layer name: kernel of that layer's trainable weights} (the
            innermost layer holding each selected weight; names of nested
            layers that clash are replaced by the weight path's layer part).
            The structured and jacobian implementations get every Θ_l from the
            same passes as Θ (memory: one result per layer); "ntvp" computes one
            kernel per layer.

    Returns:
        A numpy array of shape (N1, N2, *kernel axes), or a list of them for a
        model with several outputs; with `per_layer=True` a dict of those by
        layer name, in the order of the model's trainable weights.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(32, "relu"),
                              keras.layers.Dense(3)])
    x = np.random.normal(size=(10, 4)).astype("float32")
    k = keras_ntk.empirical_ntk(model, x)                     # (10, 10)
    k_full = keras_ntk.empirical_ntk(model, x, trace_axes=())  # (10, 10, 3, 3)
    k_head = keras_ntk.empirical_ntk(model, x, variables=[model.layers[-1]])
    parts = keras_ntk.empirical_ntk(model, x, per_layer=True)  # {name: (10, 10)}
    # sum(parts.values()) == k
    ```
    """
    s = kernel_setup(model, x1, x2, trace_axes, diagonal_axes, implementation, batch_size,
                     memory_budget, training, dtype, variables=variables, per_layer=per_layer,
                     check_weights=False)
    groups = s.plan.groups
    if groups is not None and s.implementation == "ntvp":
        # The NTK-vector products have no per-layer pieces: one kernel per group.
        return {
            name: empirical_ntk(
                model, x1, x2, trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                implementation="ntvp", batch_size=batch_size, memory_budget=memory_budget,
                training=training, dtype=dtype, verbose=verbose, variables=ws)
            for name, ws in groups
        }
    np_dtype = s.plan.dtype.as_numpy_dtype
    out_axes = s.out_axes * (len(groups) if groups is not None else 1)
    results = [np.zeros((s.n1, s.n2, *ax.kernel_shape), np_dtype) for ax in out_axes]
    used = []  # the fused path's block functions (appended as kernel_tasks gets them)
    tasks = _block_factors.factor_tasks(s, results, batch_size, lambda: kernel_tasks(
        lambda same: used.append(_block_function(s, same)) or used[-1], results, out_axes,
        s.x1, s.x2, s.n1, s.n2, s.block, pad=not s.plan.coupled,  # past a size: 2 for any N
        fits=_block_factors.budget_fits(s, batch_size)))  # or a size already compiled
    if not used or not all(getattr(fn, "shared", None) for fn in used):
        _validation.check_finite_weights(s.weights)  # else checked in every shared call
    with _frozen_state(model, s.plan.training):
        run_tasks(tasks, verbose)
    for result in results:
        _validation.check_finite_result(result, "The empirical NTK", _NON_FINITE_REASON)
    if groups is None:
        return _pack_outputs(model, results)
    per_output = len(s.out_axes)
    return {
        name: _pack_outputs(model, results[g * per_output:(g + 1) * per_output])
        for g, (name, _) in enumerate(groups)
    }


def ntk_vector_product(model, x1, x2, v, *, trace_axes=(-1,), diagonal_axes=(),
                       implementation="auto", batch_size=None, memory_budget=None,
                       training=False, dtype=None, verbose=0, variables=None):
    """The product Θ(x1, x2)·v of the empirical NTK with a vector, Θ never formed whole.

    With Θ shaped as `empirical_ntk` returns it, the product sums over the
    x2 side: (Θv)[n1, ...] = Σ_{n2, paired x2 axes} Θ[n1, n2, ...] v[n2, ...].
    `v` has shape (N2, *kept axes) where the kept axes are the output axes that
    are not traced, in order (a diagonal axis is shared by v and the result,
    not summed), optionally with one more trailing axis of columns (several
    vectors at once). The result has shape (N1, *kept axes[, columns]).

    `implementation="ntvp"` computes J(x1)(J(x2)ᵀ w) with one VJP and one JVP per
    column and traced/diagonal entry, never forming J or Θ; the other
    implementations (and "auto") compute Θ one block at a time with that
    implementation and multiply the block by the matching rows of v, so only a
    block is ever held. Blocks and the memory budget are as in `empirical_ntk`.

    Args:
        model: a Keras model or layer, as in `empirical_ntk`.
        x1: inputs with N1 examples.
        x2: inputs with N2 examples, or None for x1.
        v: array (N2, *kept axes) or (N2, *kept axes, columns); a list with
            one such array per output for a model with several outputs.
        trace_axes, diagonal_axes, implementation, batch_size: as in `empirical_ntk`.
        memory_budget, training, dtype, verbose, variables: as in `empirical_ntk`.

    Returns:
        A numpy array (N1, *kept axes[, columns]), or a list per output.

    Example:

    ```python
    v = np.random.normal(size=(10,))
    kv = keras_ntk.ntk_vector_product(model, x, None, v)  # == empirical_ntk(model, x) @ v
    ```
    """
    _validation.check_finite(v, "v")
    s = kernel_setup(model, x1, x2, trace_axes, diagonal_axes, implementation, batch_size,
                     memory_budget, training, dtype, vector=True, variables=variables)
    results = vector_product(s, v, implementation == "ntvp",
                             lambda same: _block_function(s, same), verbose, batch_size)
    for result in results:
        _validation.check_finite_result(result, "The NTK-vector product", _NON_FINITE_REASON)
    return _pack_outputs(model, results)
