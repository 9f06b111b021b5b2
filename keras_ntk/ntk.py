"""Empirical neural tangent kernel of any Keras model.

The empirical NTK of a model f with trainable weights θ is

    Θ(x1, x2) = Σ_θ ∂f(x1)/∂θ · ∂f(x2)/∂θᵀ = J(x1) J(x2)ᵀ.

This module computes it exactly, in blocks of x1 × x2 whose working memory stays
within a budget, with three implementations behind one switch (`jacobian`,
`ntvp`, `structured`) and a cost model that picks one (`auto`). Shapes follow
neural-tangents: output axes listed in `trace_axes` are averaged, axes listed
in `diagonal_axes` are kept once, every other output axis appears twice.
"""

import collections
import contextlib
import math
import os
import threading
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_ntk._weights import iter_layers, select_weights

_IMPLEMENTATIONS = ("auto", "jacobian", "ntvp", "structured")
_ZERO = tf.UnconnectedGradients.ZERO

# Letters for einsum subscripts: output axes of f(x1) use the lower-case set,
# the paired axes of f(x2) the upper-case set; n, m are the two batch axes.
# (a, b, p, q, z are taken by the weight and position axes of the contractions.)
_AXES_1 = "cdefghijkl"
_AXES_2 = "CDEFGHIJKL"

# Patching `layer.call` is process-global state: serialize it across threads
# (MirroredStrategy runs replicas in threads that may trace concurrently).
_PATCH_LOCK = threading.RLock()

# Compiled block functions, per model and options, so that repeated calls
# (a callback computing the kernel every epoch) do not retrace.
_COMPILED = weakref.WeakKeyDictionary()

# XLA compilation of the block functions. "auto": try XLA, fall back to plain
# graphs when XLA cannot compile a model. Overridable for debugging through
# the environment variable KERAS_NTK_JIT=0/1.
_JIT = os.environ.get("KERAS_NTK_JIT", "auto")


# ----------------------------------------------------------------- axes


def _canonical_axes(axes, ndim, name):
    """Normalizes output axes (batch axis 0 included in the count)."""
    try:
        axes = tuple(int(a) for a in axes)
    except TypeError:
        raise TypeError(
            f"Expected `{name}` to be a tuple of ints. Received: {name}={axes}"
        ) from None
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"Expected every axis of `{name}` to index an output of rank "
                f"{ndim}. Received: {name}={axes}"
            )
        a %= ndim
        if a == 0:
            if ndim == 1:
                # A rank-1 output (N,) has no axis to trace: the default
                # trace_axes=(-1,) must still work on it.
                continue
            raise ValueError(
                f"The batch axis 0 cannot be traced or kept diagonal. "
                f"Received: {name}={axes}"
            )
        out.append(a)
    return tuple(sorted(set(out)))


class _OutputAxes:
    """How the non-batch axes of one output enter the kernel."""

    def __init__(self, shape, trace_axes, diagonal_axes):
        self.shape = tuple(int(d) for d in shape)  # without the batch axis
        ndim = len(self.shape) + 1
        self.trace = _canonical_axes(trace_axes, ndim, "trace_axes")
        self.diag = _canonical_axes(diagonal_axes, ndim, "diagonal_axes")
        both = set(self.trace) & set(self.diag)
        if both:
            raise ValueError(
                "An axis cannot be both traced and diagonal. Received: "
                f"trace_axes={trace_axes}, diagonal_axes={diagonal_axes}"
            )
        s1 = s2 = out = ""
        kernel_shape = []
        self.trace_size = 1
        self.pairs = 1  # number of (s1, s2) output index pairs contracted per (n, m)
        for i, size in enumerate(self.shape):
            axis = i + 1
            s1 += _AXES_1[i]
            if axis in self.trace:
                s2 += _AXES_1[i]
                self.trace_size *= size
                self.pairs *= size
            elif axis in self.diag:
                s2 += _AXES_1[i]
                out += _AXES_1[i]
                kernel_shape.append(size)
                self.pairs *= size
            else:
                s2 += _AXES_2[i]
                out += _AXES_1[i] + _AXES_2[i]
                kernel_shape += [size, size]
                self.pairs *= size * size
        self.sub1, self.sub2, self.out = s1, s2, out
        self.kernel_shape = tuple(kernel_shape)  # per (n, m) entry
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.kernel_size = int(np.prod(self.kernel_shape, dtype=np.int64))
        # Vector conventions of ntk_vector_product: v[n2, kept axes of x2].
        self.vec_sub2 = "".join(
            _AXES_1[i] if (i + 1) in self.diag else _AXES_2[i]
            for i in range(len(self.shape))
            if (i + 1) not in self.trace
        )
        self.vec_sub1 = "".join(
            _AXES_1[i] for i in range(len(self.shape)) if (i + 1) not in self.trace
        )
        self.vec_shape = tuple(
            size for i, size in enumerate(self.shape) if (i + 1) not in self.trace
        )


def _contract_jacobians(j1, j2, axes, dtype):
    """Θ from per-example factors laid out as (N, *S, W): Σ_w j1 j2."""
    j1 = tf.cast(tf.reshape(j1, tf.concat([tf.shape(j1)[: 1 + len(axes.shape)], [-1]], 0)), dtype)
    j2 = tf.cast(tf.reshape(j2, tf.concat([tf.shape(j2)[: 1 + len(axes.shape)], [-1]], 0)), dtype)
    return tf.einsum(
        f"n{axes.sub1}z,m{axes.sub2}z->nm{axes.out}", j1, j2
    )


def reduce_full_kernel(full, axes_info):
    """Applies trace/diagonal conventions to a full (N1, *S, N2, *S) kernel (numpy)."""
    k = np.einsum(
        f"n{axes_info.sub1}m{axes_info.sub2}->nm{axes_info.out}", full
    )
    return k / axes_info.trace_size


# ----------------------------------------------------------------- model walking


def _sublayers(layer):
    return list(iter_layers(layer))


def _couples_examples(model):
    """Whether some layer mixes examples of a batch in training mode."""
    return any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in _sublayers(model)
    )


def _weight_groups(model, weights):
    """[(name, [weights])]: `weights` grouped by the innermost layer holding them.

    Groups come in the order of their first weight in `weights`; a group is
    named by its layer's name (made unique with the weight's path prefix when
    two nested layers share a name).
    """
    owner = {}
    for layer in iter_layers(model):
        # Pre-order: a child comes after its parents, so the last layer seen
        # holding a weight is the innermost one.
        for w in layer.trainable_weights:
            owner[id(w)] = layer
    groups = {}
    for w in weights:
        layer = owner.get(id(w), model)
        groups.setdefault(id(layer), (layer, []))[1].append(w)
    names = [layer.name for layer, _ in groups.values()]
    out = []
    for layer, ws in groups.values():
        name = layer.name
        if names.count(name) > 1:
            path = getattr(ws[0], "path", "") or ""
            name = path.rsplit("/", 1)[0] if "/" in path else f"{name}_{id(layer)}"
        out.append((name, ws))
    return out


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


class _Rule:
    """A structured rule: a layer whose per-example weight gradient is Σ_p a_p ⊗ g_p.

    `a_p` are the layer's input patches (with a constant 1 appended when the
    layer has a bias, so the bias gradient Σ_p g_p comes out of the same
    factors) and `g_p` the cotangents at its pre-activations.
    """

    def __init__(self, layer):
        self.layer = layer
        self.calls = []  # [(inputs, probe)] recorded per call

    def variables(self):
        v = [self.layer.kernel]
        if self.layer.use_bias:
            v.append(self.layer.bias)
        return v

    def patched_call(self, tape):
        layer = self.layer

        def call(inputs, *args, **kwargs):
            z = self.preactivation(inputs)
            probe = tf.zeros_like(z)
            tape.watch(probe)
            self.calls.append((inputs, probe))
            return layer.activation(z + probe)

        return call

    def patches(self, inputs):
        raise NotImplementedError

    def factors(self, dtype):
        """(A, probes) with A: (N, P, a) for every recorded call."""
        out = []
        for inputs, probe in self.calls:
            a = self.patches(inputs)
            a = tf.cast(a, dtype)
            if self.layer.use_bias:
                a = tf.concat([a, tf.ones_like(a[..., :1])], -1)
            out.append((a, probe))
        return out


class _DenseRule(_Rule):
    @staticmethod
    def supports(layer):
        return (
            type(layer) is keras.layers.Dense
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
        )

    def preactivation(self, inputs):
        z = tf.matmul(tf.convert_to_tensor(inputs), tf.convert_to_tensor(self.layer.kernel)) \
            if len(inputs.shape) == 2 else keras.ops.matmul(inputs, self.layer.kernel)
        if self.layer.use_bias:
            z = z + self.layer.bias
        return z

    def patches(self, inputs):
        d = int(inputs.shape[-1])
        n = tf.shape(inputs)[0]
        return tf.reshape(inputs, [n, -1, d])


class _Conv2DRule(_Rule):
    @staticmethod
    def supports(layer):
        return (
            type(layer) is keras.layers.Conv2D
            and layer.groups == 1
            and layer.data_format == "channels_last"
            and layer.padding in ("valid", "same")
            and getattr(layer, "quantization_mode", None) is None
        )

    def preactivation(self, inputs):
        z = self.layer.convolution_op(inputs, self.layer.kernel)
        if self.layer.use_bias:
            z = z + self.layer.bias
        return z

    def patches(self, inputs):
        kh, kw = self.layer.kernel_size
        sh, sw = self.layer.strides
        dh, dw = self.layer.dilation_rate
        p = tf.image.extract_patches(
            inputs,
            sizes=[1, kh, kw, 1],
            strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1],
            padding=self.layer.padding.upper(),
        )
        return tf.reshape(p, [tf.shape(p)[0], -1, int(p.shape[-1])])


_RULES = (_DenseRule, _Conv2DRule)


def _structured_rules(model, weights):
    """Rules for the supported layers whose variables are all in `weights`."""
    ids = {id(w) for w in weights}
    rules = []
    for layer in _sublayers(model):
        for rule_cls in _RULES:
            if rule_cls.supports(layer):
                rule = rule_cls(layer)
                if all(id(v) in ids for v in rule.variables()):
                    rules.append(rule)
                break
    return rules


@contextlib.contextmanager
def _patched(rules, tape):
    """Temporarily replaces each rule's layer `call` by the recording version."""
    with _PATCH_LOCK:
        saved = []
        try:
            for rule in rules:
                rule.calls = []
                had = "call" in rule.layer.__dict__
                saved.append((rule.layer, had, rule.layer.__dict__.get("call")))
                object.__setattr__(rule.layer, "call", rule.patched_call(tape))
            yield
        finally:
            for layer, had, old in saved:
                if had:
                    object.__setattr__(layer, "call", old)
                else:
                    object.__delattr__(layer, "call")


# ----------------------------------------------------------------- factors


def _call_flat(model, x, training):
    return [tf.convert_to_tensor(y) for y in tf.nest.flatten(model(x, training=training))]


def _jacobian(tape, target, sources):
    """`tape.jacobian` with zeros for unconnected sources.

    (pfor fails on `unconnected_gradients=ZERO` in TF 2.21, so the zeros are
    filled in afterwards.)
    """
    jac = tape.jacobian(target, sources)
    return [
        tf.zeros(tf.concat([tf.shape(target), tf.shape(s)], 0), target.dtype)
        if j is None else j
        for j, s in zip(jac, sources)
    ]


def _per_example_jacobians(model, x, weights, training, sizes):
    """Per-example Jacobians J[n, s, w] of all outputs w.r.t. `weights`, vectorized.

    Returns one (N, S_k, W) tensor per output k, W = Σ |w| (weights flattened
    and concatenated).
    """
    total = sum(sizes)

    def one(xi):
        xi = tf.nest.map_structure(lambda t: t[None], xi)
        with tf.GradientTape() as tape:
            ys = _call_flat(model, xi, training)
            flat = tf.concat([tf.reshape(y, [-1]) for y in ys], 0)
            if total == 1:
                flat = flat[0]
        if total == 1:
            grads = tape.gradient(flat, weights, unconnected_gradients=_ZERO)
            grads = [tf.reshape(g, [1, -1]) for g in grads]
        else:
            grads = _jacobian(tape, flat, weights)
            grads = [tf.reshape(g, [total, -1]) for g in grads]
        return tf.concat(grads, -1)

    jac = tf.vectorized_map(one, x)  # (N, S_total, W)
    return tf.split(jac, sizes, axis=1)


def _full_batch_jacobians(model, x, weights, training, sizes):
    """Jacobians of the whole batch's outputs (for training-mode coupled models)."""
    with tf.GradientTape() as tape:
        ys = _call_flat(model, x, training)
        flat = tf.concat([tf.reshape(y, [tf.shape(y)[0], -1]) for y in ys], 1)
    n = tf.shape(flat)[0]
    jac = _jacobian(tape, flat, weights)
    jac = tf.concat([tf.reshape(j, [n, sum(sizes), -1]) for j in jac], -1)
    return tf.split(jac, sizes, axis=1)


def _structured_factors(model, x, rules, training, sizes, dtype):
    """One forward pass with probes; returns per rule [(A, [G_k per output])]."""
    with _PATCH_LOCK:  # rule.calls is shared by threads tracing the same model
        with tf.GradientTape(persistent=True) as tape:
            with _patched(rules, tape):
                ys = _call_flat(model, x, training)
            sums = tf.concat([tf.reshape(tf.reduce_sum(y, 0), [-1]) for y in ys], 0)
            first = sums[0]  # recorded by the tape for the single-output gradient
        recorded = [(rule, rule.factors(dtype)) for rule in rules]
    probes = [probe for _, calls in recorded for _, probe in calls]
    total = sum(sizes)
    if not probes:
        return []
    if total == 1:
        cots = tape.gradient(first, probes, unconnected_gradients=_ZERO)
        cots = [c[None] for c in cots]
    else:
        cots = _jacobian(tape, sums, probes)
    del tape
    out, i = [], 0
    for rule, calls in recorded:
        a_list, g_list = [], []
        for a, _ in calls:
            g = cots[i]  # (S_total, N, ..., b)
            i += 1
            b = int(g.shape[-1])
            n = tf.shape(g)[1]
            g = tf.reshape(g, [total, n, -1, b])
            g = tf.transpose(g, [1, 0, 2, 3])  # (N, S_total, P, b)
            a_list.append(a)
            g_list.append(tf.cast(g, dtype))
        # A layer called several times: its calls are extra positions p.
        a = tf.concat(a_list, 1) if len(a_list) > 1 else a_list[0]
        g = tf.concat(g_list, 2) if len(g_list) > 1 else g_list[0]
        out.append((a, tf.split(g, sizes, axis=1)))
    return out


def _factorized_costs(n1, n2, p, a, b, axes):
    """FLOPs of the two ways to contract a patch-linear layer."""
    per_example = (n1 + n2) * axes.size * p * a * b + n1 * n2 * axes.pairs * a * b
    factorized = n1 * n2 * p * p * (a + b * axes.pairs)
    return per_example, factorized


def _contract_structured(a1, g1, a2, g2, axes, dtype):
    """Θ contribution of one patch-linear layer from (A, G) factors.

    Θ[n, m] = Σ_{p,q} (a_np · a_mq)(g_np · g_mq), either through per-example
    weight gradients W_n = Σ_p a_np ⊗ g_np or in factorized form, whichever
    the FLOP estimate says is cheaper.
    """
    n1, n2 = int(a1.shape[0]), int(a2.shape[0])
    p, a, b = int(a1.shape[1]), int(a1.shape[2]), int(g1.shape[-1])
    shape_s = list(axes.shape)
    g1 = tf.reshape(g1, [n1] + shape_s + [p, b])
    g2 = tf.reshape(g2, [n2] + shape_s + [p, b])
    per_example, factorized = _factorized_costs(n1, n2, p, a, b, axes)
    if p == 1:
        gram_a = tf.einsum("na,ma->nm", a1[:, 0], a2[:, 0])
        gram_g = tf.einsum(
            f"n{axes.sub1}b,m{axes.sub2}b->nm{axes.out}", g1[..., 0, :], g2[..., 0, :]
        )
        gram_a = tf.reshape(gram_a, [n1, n2] + [1] * len(axes.out))
        return gram_a * gram_g
    if per_example <= factorized:
        w1 = tf.einsum(f"npa,n{axes.sub1}pb->n{axes.sub1}ab", a1, g1)
        w2 = tf.einsum(f"mpa,m{axes.sub2}pb->m{axes.sub2}ab", a2, g2)
        return _contract_jacobians(w1, w2, axes, dtype)
    gram_a = tf.einsum("npa,mqa->nmpq", a1, a2)
    gram_g = tf.einsum(f"n{axes.sub1}pb,m{axes.sub2}qb->nm{axes.out}pq", g1, g2)
    return tf.einsum(f"nmpq,nm{axes.out}pq->nm{axes.out}", gram_a, gram_g)


# ----------------------------------------------------------------- block functions


class _Plan:
    """Everything about a (model, options) pair that does not depend on values."""

    def __init__(self, model, weights, out_axes, training, dtype, coupled, groups=None):
        self.groups = groups  # [(name, [weights])] for per-layer kernels, else None
        self.model = model
        self.weights = weights
        self.out_axes = out_axes
        self.sizes = [ax.size for ax in out_axes]
        self.training = training
        self.dtype = dtype
        self.coupled = coupled


def _split(x, n1):
    return (
        tf.nest.map_structure(lambda t: t[:n1], x),
        tf.nest.map_structure(lambda t: t[n1:], x),
    )


def _concat(x1, x2):
    return tf.nest.map_structure(lambda a, b: tf.concat([a, b], 0), x1, x2)


def _batch_size_of(x):
    return int(tf.nest.flatten(x)[0].shape[0])


def _jacobian_block(plan, x1, x2):
    same = x2 is None
    x = x1 if same else _concat(x1, x2)
    n1 = _batch_size_of(x1)
    if plan.coupled:
        j1 = _full_batch_jacobians(plan.model, x1, plan.weights, plan.training, plan.sizes)
        j2 = j1 if same else _full_batch_jacobians(
            plan.model, x2, plan.weights, plan.training, plan.sizes
        )
    else:
        j = _per_example_jacobians(plan.model, x, plan.weights, plan.training, plan.sizes)
        j1 = [t[:n1] for t in j]
        j2 = j1 if same else [t[n1:] for t in j]
    if plan.groups is not None:
        return _grouped_jacobian_kernels(plan, plan.weights, j1, j2, same, {})
    kernels = []
    for k, axes in enumerate(plan.out_axes):
        jk1 = tf.reshape(j1[k], [-1, *axes.shape, j1[k].shape[-1]])
        jk2 = tf.reshape(j2[k], [-1, *axes.shape, j2[k].shape[-1]])
        kernels.append(_contract_jacobians(jk1, jk2, axes, plan.dtype) / axes.trace_size)
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
            kernels[(g, k)] = kernels.get((g, k), 0.0) + _contract_jacobians(
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
    factors = _structured_factors(
        plan.model, x, rules, plan.training, plan.sizes, plan.dtype
    )
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
                grouped[(g, k)] = grouped.get((g, k), 0.0) + _contract_structured(
                    a1, g1, a2, g2, axes, plan.dtype)
        n_1 = tf.shape(tf.nest.flatten(x1)[0])[0]
        n_2 = n_1 if same else tf.shape(tf.nest.flatten(x2)[0])[0]
        if not rest:
            return _grouped_output(plan, grouped, n_1, n_2)
        j = _per_example_jacobians(plan.model, x, rest, plan.training, plan.sizes)
        j1 = [t[:n1] for t in j]
        j2 = j1 if same else [t[n1:] for t in j]
        return _grouped_jacobian_kernels(plan, rest, j1, j2, same, grouped)
    kernels = [0.0] * len(plan.out_axes)
    for a, g_per_output in factors:
        a1 = a[:n1]
        a2 = a1 if same else a[n1:]
        for k, axes in enumerate(plan.out_axes):
            g = g_per_output[k]
            g1 = g[:n1]
            g2 = g1 if same else g[n1:]
            kernels[k] += _contract_structured(a1, g1, a2, g2, axes, plan.dtype)
    if rest:
        j = _per_example_jacobians(plan.model, x, rest, plan.training, plan.sizes)
        for k, axes in enumerate(plan.out_axes):
            jk = tf.reshape(j[k], [-1, *axes.shape, j[k].shape[-1]])
            jk1 = jk[:n1]
            jk2 = jk1 if same else jk[n1:]
            kernels[k] += _contract_jacobians(jk1, jk2, axes, plan.dtype)
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
            y2 = _call_flat(plan.model, x2, plan.training)
        u = tape.gradient(y2, weights, output_gradients=cot, unconnected_gradients=_ZERO)
        with tf.autodiff.ForwardAccumulator(primals, u) as acc:
            y1 = _call_flat(plan.model, x1, plan.training)
        return [acc.jvp(y, unconnected_gradients=_ZERO) for y in y1]

    return tf.vectorized_map(one, cotangents, fallback_to_while_loop=True)


def _vjp_columns(plan, x, cotangents, k):
    """[J(x)ᵀ w_v for each weight], stacked over the V cotangents w (V, N, *S_k) of output k."""
    weights = plan.weights

    def one(cot):
        with tf.GradientTape() as tape:
            y = _call_flat(plan.model, x, plan.training)[k]
        return tape.gradient(y, weights, output_gradients=tf.cast(cot, y.dtype),
                             unconnected_gradients=_ZERO)

    return tf.vectorized_map(one, cotangents, fallback_to_while_loop=True)


def _jvp_columns(plan, x, tangents, k):
    """J(x) u_v of output k for V stacked tangents u (one (V, *w.shape) per weight)."""
    primals = [w.value if hasattr(w, "value") else w for w in plan.weights]

    def one(u):
        with tf.autodiff.ForwardAccumulator(primals, list(u)) as acc:
            y = _call_flat(plan.model, x, plan.training)[k]
        return acc.jvp(y, unconnected_gradients=_ZERO)

    return tf.vectorized_map(one, tuple(tangents), fallback_to_while_loop=True)


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


# ----------------------------------------------------------------- profile and costs


class _Profile:
    """Static facts about a model, read from one traced (never executed) call."""

    def __init__(self, out_shapes, activations, rule_dims, n_params, n_rest):
        self.out_shapes = out_shapes  # per output, without the batch axis
        self.activations = activations  # float elements per example in one forward
        self.rule_dims = rule_dims  # [(P, a, b)] per structured rule
        self.n_params = n_params
        self.n_rest = n_rest  # parameters not covered by a structured rule


def _example_spec(x):
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec([1, *t.shape[1:]], t.dtype), x
    )


def _profile(model, x, weights, rules, training):
    dims = {}
    out_shapes = []

    def forward(xs):
        with tf.GradientTape() as tape:
            with _patched(rules, tape):
                ys = _call_flat(model, xs, training)
            for rule in rules:
                p_total, a, b = 0, 0, 0
                for inputs, probe in rule.calls:
                    patches = rule.patches(inputs)
                    p_total += int(patches.shape[1])
                    a = int(patches.shape[2]) + int(rule.layer.use_bias)
                    b = int(probe.shape[-1])
                dims[id(rule)] = (p_total, a, b)
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
    return _Profile(
        out_shapes, max(activations, 1), [dims[id(r)] for r in rules], n_params, n_rest
    )


def _estimates(impl, profile, out_axes, n1, n2, same, itemsize, vector=False):
    """(FLOPs, peak bytes) of one block of n1 × n2 examples for `impl`.

    The cost model behind `implementation="auto"`; see `empirical_ntk`.
    """
    n = n1 if same else n1 + n2
    s_total = sum(ax.size for ax in out_axes)
    act = profile.activations
    fwd = 2 * (sum(p * a * b for p, a, b in profile.rule_dims) + profile.n_rest) + act
    out_elems = sum(n1 * n2 * ax.kernel_size for ax in out_axes)
    if impl == "jacobian":
        flops = n * s_total * 3 * fwd + sum(
            n1 * n2 * ax.pairs * profile.n_params for ax in out_axes
        )
        elems = n * s_total * (profile.n_params + 2 * act) + out_elems
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
        flops = n * fwd * (1 + 2 * s_total)
        elems = n * act * (1 + s_total) + out_elems
        for p, a, b in profile.rule_dims:
            for ax in out_axes:
                pe, fac = _factorized_costs(n1, n2, p, a, b, ax)
                flops += min(pe, fac) if p > 1 else n1 * n2 * (a + b * ax.pairs)
                if p == 1:
                    extra = n1 * n2 * (1 + ax.kernel_size)
                elif pe <= fac:
                    extra = n * ax.size * a * b
                else:
                    extra = n1 * n2 * p * p * (1 + ax.kernel_size)
                elems += n * p * a + n * ax.size * p * b + extra
        if profile.n_rest:
            flops += n * s_total * 3 * fwd + sum(
                n1 * n2 * ax.pairs * profile.n_rest for ax in out_axes
            )
            elems += n * s_total * (profile.n_rest + 2 * act)
    else:
        raise ValueError(impl)
    return float(flops), int(elems * itemsize)


def _default_memory_budget():
    """A quarter of the available host memory (of 4 GiB at most with a GPU)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
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


def _format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


# ----------------------------------------------------------------- compiled functions


def _compiled(model, key, builder):
    """A tf.function per (model, key), created once and reused across calls."""
    per_model = _COMPILED.setdefault(model, {})
    fn = per_model.get(key)
    if fn is None:
        jit = _JIT != "0" and key[0] != "ntvp"
        fn = _JitFallback(builder, jit)
        per_model[key] = fn
    return fn


class _JitFallback:
    """Runs a block function under XLA, falling back to a plain graph if XLA fails."""

    def __init__(self, builder, jit):
        self._plain = tf.function(builder, autograph=False)
        self._xla = tf.function(builder, jit_compile=True, autograph=False) if jit else None
        self._lock = threading.Lock()

    def __call__(self, *args):
        if self._xla is not None:
            try:
                return self._xla(*args)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                    tf.errors.InternalError, ValueError, NotImplementedError):
                if _JIT == "1":
                    raise
                self._xla = None
        return self._plain(*args)


# ----------------------------------------------------------------- set-up shared by the API


class _Setup:
    """Validated arguments, the plan, the implementation and the block size."""


def _to_host(x, name):
    if x is None:
        return None
    try:
        return tf.nest.map_structure(lambda t: np.asarray(t), x)
    except Exception as e:  # noqa: BLE001 - report what was received
        raise TypeError(
            f"Expected `{name}` to be an array or a structure of arrays. "
            f"Received: {name}={type(x)}"
        ) from e


def _num_examples(x, name):
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in tf.nest.flatten(x)}
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        raise ValueError(
            f"Expected `{name}` to hold a non-empty batch with the same leading size "
            f"in every input. Received: {name} with leading sizes {sorted(sizes)}"
        )
    return sizes.pop()


def _slice(x, start, stop):
    return tf.nest.map_structure(lambda t: t[start:stop], x)


def _gather(x, index):
    """The examples `index` of host inputs (numpy fancy indexing per input)."""
    return tf.nest.map_structure(lambda t: t[index], x)


def _setup(model, x1, x2, trace_axes, diagonal_axes, implementation, batch_size,
           memory_budget, training, dtype, vector=False, variables=None, per_layer=False):
    if not callable(model) or not hasattr(model, "trainable_weights"):
        raise TypeError(
            f"Expected `model` to be a Keras model or layer. Received: model={model}"
        )
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"Expected `implementation` to be one of {_IMPLEMENTATIONS}. "
            f"Received: implementation={implementation}"
        )
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(
            f"Expected `batch_size` to be a positive int or None. "
            f"Received: batch_size={batch_size}"
        )
    if memory_budget is not None and (not isinstance(memory_budget, (int, float, np.number))
                                      or memory_budget <= 0):
        raise ValueError(
            f"Expected `memory_budget` to be a positive number of bytes or None. "
            f"Received: memory_budget={memory_budget}"
        )
    s = _Setup()
    s.x1 = _to_host(x1, "x1")
    s.x2 = _to_host(x2, "x2")
    s.same = x2 is None
    s.n1 = _num_examples(s.x1, "x1")
    s.n2 = s.n1 if s.same else _num_examples(s.x2, "x2")
    if not getattr(model, "built", True) or not model.trainable_weights:
        model(_slice(s.x1, 0, 1), training=False)  # builds a subclassed model
    if not model.trainable_weights:
        raise ValueError(
            f"Expected `model` to have trainable weights. Received: model={model.name} "
            "with none"
        )
    weights = select_weights(model, variables)
    training = bool(training)
    coupled = training and _couples_examples(model)
    # Rules and the traced profile depend only on the model, the weights and
    # the per-example input signature: cache them so repeated calls are cheap.
    cache_key = (
        "setup", training, coupled, tuple(id(w) for w in weights),
        tuple((tuple(t.shape[1:]), t.dtype.str) for t in tf.nest.flatten(s.x1)),
    )
    per_model = _COMPILED.setdefault(model, {})
    if cache_key not in per_model:
        rules = [] if coupled else _structured_rules(model, weights)
        per_model[cache_key] = (rules, _profile(model, s.x1, weights, rules, training))
    rules, profile = per_model[cache_key]
    out_axes = [_OutputAxes(shape, trace_axes, diagonal_axes) for shape in profile.out_shapes]
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
    groups = _weight_groups(model, weights) if per_layer else None
    plan = _Plan(model, weights, out_axes, training, dtype, coupled, groups)
    plan.model_dtype = tf.as_dtype(keras.backend.standardize_dtype(
        getattr(model, "compute_dtype", "float32")))
    itemsize = dtype.size
    budget = _default_memory_budget() if memory_budget is None else int(memory_budget)
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

    def block_sizes():
        if batch_size is not None:
            yield int(min(batch_size, max(s.n1, s.n2)))
            return
        b = max(s.n1, s.n2)
        while True:
            yield b
            if b == 1:
                return
            b = max(1, (b + 1) // 2)

    best = None
    tried = []
    for impl in order:
        for b in block_sizes():
            b1, b2 = min(b, s.n1), min(b, s.n2)
            flops, peak = _estimates(impl, profile, out_axes, b1, b2, s.same, itemsize,
                                     vector=vector)
            blocks = math.ceil(s.n1 / b1) * math.ceil(s.n2 / b2)
            if s.same:
                nb = math.ceil(s.n1 / b1)
                blocks = nb * (nb + 1) // 2
            total_peak = peak + result_bytes
            tried.append((impl, b, total_peak))
            if total_peak <= budget:
                if best is None or flops * blocks < best[0]:
                    best = (flops * blocks, impl, b)
                break
    if best is None:
        smallest = min(tried, key=lambda t: t[2])
        raise ValueError(
            "The empirical NTK does not fit in the memory budget even in its smallest "
            f"block: implementation '{smallest[0]}' with blocks of {smallest[1]} "
            f"examples needs about {_format_bytes(smallest[2])} (result "
            f"{_format_bytes(result_bytes)} included), above the budget of "
            f"{_format_bytes(budget)}. Raise `memory_budget` or lower `batch_size`. "
            f"Received: memory_budget={memory_budget}, batch_size={batch_size}"
        )
    _, s.implementation, s.block = best
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
    plan, rules = s.plan, s.rules
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
    if same:
        return _compiled(plan.model, key, lambda x1: impl(x1))
    return _compiled(plan.model, key, lambda x1, x2: impl(x1, x2))


def _blocks(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _strategy():
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        strategy = tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync > 1:
            return strategy
    return None


def _run_tasks(tasks, verbose):
    """Runs [(fn, args, on_done)] blocks, spread over replicas under a strategy."""
    progbar = keras.utils.Progbar(len(tasks), unit_name="block") if verbose else None
    strategy = _strategy()
    step = strategy.num_replicas_in_sync if strategy is not None else 1
    done = 0
    for start in range(0, len(tasks), step):
        group = tasks[start:start + step]
        if strategy is None:
            fn, args, on_done = group[0]
            on_done([np.asarray(k) for k in fn(*args)])
        else:
            padded = group + [group[-1]] * (step - len(group))
            # Blocks of a group may call different functions (diagonal blocks).
            def replica_fn(index):
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                fn, args, _ = padded[replica]
                return fn(*[tf.nest.map_structure(tf.convert_to_tensor, a) for a in args])

            outputs = strategy.run(replica_fn, args=(0,))
            per_replica = [
                strategy.experimental_local_results(o) for o in tf.nest.flatten(outputs)
            ]
            for r, (_, _, on_done) in enumerate(group):
                on_done([np.asarray(p[r]) for p in per_replica])
        done += len(group)
        if progbar is not None:
            progbar.update(done)


@contextlib.contextmanager
def _frozen_state(model, training):
    """Restores the non-trainable variables (BatchNorm statistics) a training-mode
    forward pass moves: computing a kernel must not change the model."""
    if not training:
        yield
        return
    saved = [(v, v.numpy()) for v in model.non_trainable_weights]
    try:
        yield
    finally:
        for v, value in saved:
            v.assign(value)


def _to_device(x):
    return tf.nest.map_structure(tf.convert_to_tensor, x)


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
      layer (`Dense`, `Conv2D`) records its input and a zero probe added to its
      pre-activation, and one backward pass of the batch-summed output per
      output entry (vectorized) that gives each example's cotangent g at each
      such layer (examples are independent in inference mode). The layer's
      per-example weight gradient is Σ_p a_p ⊗ g_p, so for a Dense layer
      Θ_layer = (A1 A2ᵀ + 1) ⊙ (G1 G2ᵀ) costs N1 N2 (d_in + d_out S) and no
      per-example gradient is ever formed; for convolutions the (patch,
      cotangent) pairs are contracted either in that factorized form
      (N1 N2 P_pos² (a + b S) FLOPs) or through per-example weight gradients
      (N S P_pos a b + N1 N2 S a b), whichever is cheaper per layer. Weights not
      covered by a rule (BatchNorm, Embedding, LayerNorm, custom layers, a
      `Linearize` wrapper's δ) use the per-example Jacobian for those weights only.
    * `"jacobian"`: per-example Jacobians (N S P numbers), vectorized over the
      examples, contracted over the weights: N1 N2 S² P FLOPs.
    * `"ntvp"`: products J(x1) (J(x2)ᵀ w) (a VJP then a JVP) for the N2 S basis
      cotangents w: never forms J; the slowest, useful when P is huge.
    * `"auto"`: the implementation with the fewest estimated FLOPs among those
      whose estimated peak memory fits `memory_budget` (structured when the model
      has Dense/Conv2D layers, otherwise jacobian, ntvp when nothing else fits).

    Memory: the kernel is computed in blocks of x1 × x2 examples; the block size
    is `batch_size`, or else the largest power-of-two fraction of N whose
    estimated peak (block working memory plus the host result) fits
    `memory_budget`. If even one block cannot fit, a ValueError giving the
    estimate and the budget is raised before any computation. With `x2=None`
    only the blocks on and above the diagonal are computed. Under a
    `tf.distribute.Strategy` scope the blocks are spread over the replicas.
    Compiled block functions are cached per model and options, so repeated
    calls do not retrace.

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
    s = _setup(model, x1, x2, trace_axes, diagonal_axes, implementation, batch_size,
               memory_budget, training, dtype, variables=variables, per_layer=per_layer)
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
    results = [
        np.zeros((s.n1, s.n2, *ax.kernel_shape), np_dtype) for ax in out_axes
    ]
    rows = _blocks(s.n1, s.block)
    cols = rows if s.same else _blocks(s.n2, s.block)
    tasks = []
    if s.same:
        fn_diag = _block_function(s, same=True)
        fn_off = _block_function(s, same=False) if len(rows) > 1 else None
        for i, (a0, a1) in enumerate(rows):
            for j, (b0, b1) in enumerate(rows):
                if j < i:
                    continue
                if i == j:
                    tasks.append((fn_diag, (_slice(s.x1, a0, a1),),
                                  _placer(results, out_axes, a0, a1, b0, b1, False)))
                else:
                    tasks.append((fn_off, (_slice(s.x1, a0, a1), _slice(s.x1, b0, b1)),
                                  _placer(results, out_axes, a0, a1, b0, b1, True)))
    else:
        fn = _block_function(s, same=False)
        for a0, a1 in rows:
            for b0, b1 in cols:
                tasks.append((fn, (_slice(s.x1, a0, a1), _slice(s.x2, b0, b1)),
                              _placer(results, out_axes, a0, a1, b0, b1, False)))
    with _frozen_state(model, s.plan.training):
        _run_tasks(tasks, verbose)
    if groups is None:
        return _pack_outputs(model, results)
    per_output = len(s.out_axes)
    return {
        name: _pack_outputs(model, results[g * per_output:(g + 1) * per_output])
        for g, (name, _) in enumerate(groups)
    }


def _swap_pairs(kernel, axes):
    """The transposed block Θ(x2, x1) of Θ(x1, x2): swap batch and paired axes."""
    perm = [1, 0]
    pos = 2
    for i in range(len(axes.shape)):
        axis = i + 1
        if axis in axes.trace:
            continue
        if axis in axes.diag:
            perm.append(pos)
            pos += 1
        else:
            perm += [pos + 1, pos]
            pos += 2
    return np.transpose(kernel, perm)


def _placer(results, out_axes, a0, a1, b0, b1, mirror):
    def place(blocks):
        for k, (res, ax) in enumerate(zip(results, out_axes)):
            res[a0:a1, b0:b1] = blocks[k]
            if mirror:
                res[b0:b1, a0:a1] = _swap_pairs(blocks[k], ax)
    return place


def _delta_einsum_parts(axes):
    """Subscripts and identity matrices placing a vector at traced/diagonal entries."""
    eyes, subs = [], []
    for i, size in enumerate(axes.shape):
        if (i + 1) in axes.trace or (i + 1) in axes.diag:
            eyes.append(np.eye(size))
            subs.append(_AXES_2[i] + _AXES_1[i])
    extra = "".join(
        _AXES_2[i] for i in range(len(axes.shape))
        if (i + 1) in axes.trace or (i + 1) in axes.diag
    )
    # v's own subscripts: paired axes by their x2 index (lower-case here, the
    # output index of f(x2)), diagonal axes by the diagonal index (upper-case).
    v_sub = "".join(
        _AXES_2[i] if (i + 1) in axes.diag else _AXES_1[i]
        for i in range(len(axes.shape)) if (i + 1) not in axes.trace
    )
    return eyes, subs, extra, v_sub


def _cotangents_from_vector(v_block, axes):
    """w[(t, d, e), n2, s] = v[n2, s_P, d, e] δ(s_T = t) δ(s_D = d)."""
    eyes, subs, extra, v_sub = _delta_einsum_parts(axes)
    s_all = _AXES_1[: len(axes.shape)]
    spec = ",".join([f"n{v_sub}z"] + subs) + f"->{extra}zn{s_all}"
    w = np.einsum(spec, v_block, *eyes) if eyes else np.einsum(f"n{v_sub}z->zn{s_all}", v_block)
    n2 = v_block.shape[0]
    return w.reshape((-1, n2, *axes.shape))


def _vector_from_products(products, axes, columns):
    """out[n1, s_P, d, e] = Σ_t r[(t, d, e), n1, s_T = t, s_P, s_D = d] / |T|."""
    eyes, subs, extra, v_sub = _delta_einsum_parts(axes)
    s_all = _AXES_1[: len(axes.shape)]
    sizes = [axes.shape[i] for i in range(len(axes.shape))
             if (i + 1) in axes.trace or (i + 1) in axes.diag]
    n1 = products.shape[1]
    r = products.reshape((*sizes, columns, n1, *axes.shape))
    spec = ",".join([f"{extra}zn{s_all}"] + subs) + f"->n{v_sub}z"
    out = np.einsum(spec, r, *eyes) if eyes else np.einsum(f"zn{s_all}->n{v_sub}z", r)
    return out / axes.trace_size


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
        trace_axes, diagonal_axes, implementation, batch_size, memory_budget,
        training, dtype, verbose, variables: as in `empirical_ntk`.

    Returns:
        A numpy array (N1, *kept axes[, columns]), or a list per output.

    Example:

    ```python
    v = np.random.normal(size=(10,))
    kv = keras_ntk.ntk_vector_product(model, x, None, v)  # == empirical_ntk(model, x) @ v
    ```
    """
    s = _setup(model, x1, x2, trace_axes, diagonal_axes, implementation, batch_size,
               memory_budget, training, dtype, vector=True, variables=variables)
    if s.same:
        s.x2 = s.x1
    vs = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(vs) != len(s.out_axes):
        raise ValueError(
            f"Expected one vector per model output ({len(s.out_axes)}). "
            f"Received: v with {len(vs)} entries"
        )
    np_dtype = s.plan.dtype.as_numpy_dtype
    prepared, squeeze = [], []
    for k, (vk, ax) in enumerate(zip(vs, s.out_axes)):
        vk = np.asarray(vk, np_dtype)
        expected = (s.n2, *ax.vec_shape)
        if vk.shape == expected:
            vk, sq = vk[..., None], True
        elif vk.ndim == len(expected) + 1 and vk.shape[:-1] == expected:
            sq = False
        else:
            raise ValueError(
                f"Expected v for output {k} to have shape {expected} (optionally with "
                f"a trailing axis of columns). Received: v.shape={vk.shape}"
            )
        prepared.append(vk)
        squeeze.append(sq)
    results = [np.zeros((s.n1, *ax.vec_shape, vk.shape[-1]), np_dtype)
               for ax, vk in zip(s.out_axes, prepared)]
    rows = _blocks(s.n1, s.block)
    cols = _blocks(s.n2, s.block)
    tasks = []
    if implementation == "ntvp":
        # Matrix-free: u = J(x2)ᵀ w accumulated over the column blocks (VJPs),
        # then J(x1) u one row block at a time (JVPs): one pass over x2 and one
        # over x1 per output, holding V = columns·|traced| weight-sized vectors.
        plan = s.plan
        weights_key = tuple(id(w) for w in plan.weights)
        for k, ax in enumerate(s.out_axes):
            vjp_fn = _compiled(plan.model, ("ntvp", "vjp", k, plan.training, weights_key),
                               lambda xb, w, k=k: _vjp_columns(plan, xb, w, k))
            jvp_fn = _compiled(plan.model, ("ntvp", "jvp", k, plan.training, weights_key),
                               lambda xb, *u, k=k: [_jvp_columns(plan, xb, list(u), k)])
            columns = prepared[k].shape[-1]
            accumulated = []
            vjp_tasks = []
            for b0, b1 in cols:
                w = _cotangents_from_vector(prepared[k][b0:b1], ax).astype(
                    plan.model_dtype.as_numpy_dtype)

                def add(parts, accumulated=accumulated):
                    if not accumulated:
                        accumulated.extend(p.astype(np.float64) for p in parts)
                    else:
                        for total, p in zip(accumulated, parts):
                            total += p

                vjp_tasks.append((vjp_fn, (_slice(s.x2, b0, b1), w), add))
            with _frozen_state(model, s.plan.training):
                _run_tasks(vjp_tasks, verbose)
            u = tuple(a.astype(plan.model_dtype.as_numpy_dtype) for a in accumulated)
            jvp_tasks = []
            for a0, a1 in rows:
                def done(out, k=k, ax=ax, a0=a0, a1=a1, columns=columns):
                    results[k][a0:a1] += _vector_from_products(
                        np.asarray(out[0], np_dtype), ax, columns)

                jvp_tasks.append((jvp_fn, (_slice(s.x1, a0, a1), *u), done))
            tasks += jvp_tasks
    else:
        fn = _block_function(s, same=False)
        for a0, a1 in rows:
            for b0, b1 in cols:
                def done(blocks, a0=a0, a1=a1, b0=b0, b1=b1):
                    for k, ax in enumerate(s.out_axes):
                        results[k][a0:a1] += np.einsum(
                            f"nm{ax.out},m{ax.vec_sub2}z->n{ax.vec_sub1}z",
                            blocks[k], prepared[k][b0:b1])

                tasks.append((fn, (_slice(s.x1, a0, a1), _slice(s.x2, b0, b1)), done))
    with _frozen_state(model, s.plan.training):
        _run_tasks(tasks, verbose)
    results = [r[..., 0] if sq else r for r, sq in zip(results, squeeze)]
    return _pack_outputs(model, results)


# ----------------------------------------------------------------- empirical NNGP


def _feature_function(model, layer):
    """A function x -> features: the penultimate layer, a named layer or a callable."""
    if callable(layer) and not isinstance(layer, (str, keras.layers.Layer)):
        return layer
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            "Expected a functional or Sequential model (with symbolic inputs) to read "
            "layer features from; for a subclassed model pass `layer` as a callable "
            f"x -> features. Received: model={getattr(model, 'name', model)}, layer={layer}"
        )
    if layer is None:
        last = model.layers[-1]
        tensor = last.input
        if isinstance(tensor, (list, tuple, dict)):
            raise ValueError(
                f"Expected the last layer to have one input (the penultimate features); "
                f"name the feature layer instead. Received: last layer '{last.name}'"
            )
    else:
        if isinstance(layer, str):
            matches = [sub for sub in iter_layers(model) if sub.name == layer]
            if len(matches) != 1:
                names = [sub.name for sub in model.layers]
                raise ValueError(
                    f"Expected `layer` to name exactly one layer of the model (e.g. one of "
                    f"{names}). Received: layer={layer!r}"
                )
            layer = matches[0]
        try:
            tensor = layer.output
        except (AttributeError, ValueError) as e:
            raise ValueError(
                f"Expected `layer` to be a layer of the model's graph with one output. "
                f"Received: layer={layer.name}"
            ) from e
    # `model.input` keeps the structure the model is called with (a warning
    # otherwise); a Sequential model never called symbolically has only `inputs`.
    try:
        structure = model.input
    except (AttributeError, ValueError):
        structure = inputs[0] if len(inputs) == 1 else inputs
    return keras.Model(structure, tensor)


def empirical_nngp(model, x1, x2=None, *, layer=None, trace_axes=(-1,), diagonal_axes=(),
                   batch_size=256, dtype="float64"):
    """Empirical NNGP kernel: the Gram matrix of a layer's features, feature axes averaged.

    With φ(x) the features of `layer` (default: the penultimate layer, i.e. the
    input of the model's last layer) in inference mode,

        K(x1, x2) = φ(x1) · φ(x2) / d

    following neural-tangents' `empirical_nngp_fn` conventions: feature axes in
    `trace_axes` are summed and divided by their size d (so a Dense
    layer of width d gives the average over its units, O(1) at any width under
    NTK or standard 1/√fan-in initialization), axes in `diagonal_axes` keep
    their diagonal, and every other axis appears twice. For a convolutional
    feature map (N, H, W, C) the default gives (N1, N2, H, H, W, W); use
    `trace_axes=(1, 2, 3)` to average every axis (an N1 × N2 kernel). At
    infinite width the penultimate-layer kernel of an NTK-parameterized
    network tends to the NNGP of `keras_ntk.infinite_kernels` (up to the
    readout's weight and bias variances).

    Args:
        model: a functional or Sequential Keras model (subclassed models: pass
            `layer` as a callable).
        x1: inputs with N1 examples.
        x2: inputs with N2 examples, or None for x1.
        layer: None (penultimate features), a layer name, a layer of the
            model, or a callable x -> features.
        trace_axes, diagonal_axes: feature axes to average / keep diagonal
            (batch axis 0 counted), as in `empirical_ntk`.
        batch_size: examples per forward pass.
        dtype: dtype of the contraction and result.

    Returns:
        A numpy array (N1, N2, *kernel axes).

    Example:

    ```python
    k = keras_ntk.empirical_nngp(model, x_train)                 # penultimate layer
    k_first = keras_ntk.empirical_nngp(model, x_train, x_test, layer="dense_0")
    ```
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"Expected `batch_size` to be a positive int. Received: batch_size={batch_size}"
        )
    x1 = _to_host(x1, "x1")
    n1 = _num_examples(x1, "x1")
    if not getattr(model, "built", True):
        model(_slice(x1, 0, 1), training=False)
    features_of = _feature_function(model, layer)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype

    def features(x, n):
        parts = []
        for start in range(0, n, batch_size):
            out = features_of(_slice(x, start, min(start + batch_size, n)), training=False) \
                if isinstance(features_of, keras.Model) else \
                features_of(_slice(x, start, min(start + batch_size, n)))
            parts.append(np.asarray(keras.ops.convert_to_numpy(out), np_dtype))
        return np.concatenate(parts, 0)

    phi1 = features(x1, n1)
    if x2 is None:
        phi2 = phi1
    else:
        x2 = _to_host(x2, "x2")
        phi2 = features(x2, _num_examples(x2, "x2"))
    axes = _OutputAxes(phi1.shape[1:], trace_axes, diagonal_axes)
    kernel = np.einsum(f"n{axes.sub1},m{axes.sub2}->nm{axes.out}", phi1, phi2)
    return kernel / axes.trace_size
