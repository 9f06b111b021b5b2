"""Structured derivative rules: Θ of linear-in-weights layers from (input, cotangent) factors.

In inference mode each example's output depends only on its own input, so
one backward pass of the batch-summed output gives every example's cotangent
g at each layer. Every layer with a rule here computes, per example,

    z[p, c, b] = Σ_a a[p, c, a] W[c, a, b]     (+ bias, as a constant a = 1)

over positions p, groups c and weight axes a (in) and b (out): its
per-example weight gradient is W_n[c, a, b] = Σ_p a_np[c, a] g_np[c, b], so
its part of Θ is contracted from the factors

    Θ[n, m] = Σ_c Σ_{p,q} (a_np[c] · a_mq[c]) (g_np[c] · g_mq[c])

without forming per-example gradients (or through W_n when cheaper):

    layer               positions p      groups c           a               b
    Dense               leading axes     -                  input features  units
    Conv1D/Conv2D       output pixels    groups (`groups`)  patch × C_in/G  filters / G
    DepthwiseConv1D/2D  output pixels    input channels     patch (1 ch.)   multiplier
    EinsumDense         input-only axes  axes of x, W, y    contracted      output-only
    Embedding           token positions  -                  one-hot token   output_dim
    BatchNormalization  all but `axis`   channels           (x̂, 1)          1
    LayerNormalization  all but `axis`   normalized entries (x̂, 1)          1

(x̂: the normalized input; BatchNormalization in inference mode, moving
statistics.) For Embedding a·a' is the token equality [t == t'] (a gather:
the one-hot vectors are never formed).

This is the only code that touches Keras layer internals: to record a
layer's input and to add a zero probe to its pre-activation, each supported
layer's `call` is replaced for the duration of one traced forward pass
(`patched`), and the rule recomputes the layer's maths from its variables.
"""

import collections
import contextlib
import re

import keras
import numpy as np
import tensorflow as tf

from keras_ntk import _dense_chain, _head
from keras_ntk._patches import causal_pad as _causal_pad, conv_patches as _conv_patches
from keras_ntk._exact_calls import PATCH_LOCK, grouped_conv, replaced_calls
from keras_ntk._jacobians import call_flat, contract_jacobians, dense_gram, tape_jacobian
from keras_ntk._weights import iter_layers

_ZERO = tf.UnconnectedGradients.ZERO

# Sizes of one rule's factors: P positions, G groups, A inputs and B outputs
# per group; `gather`: a is a one-hot token (A = vocabulary, never formed).
RuleDims = collections.namedtuple("RuleDims", "p g a b gather")


def _plain(layer):
    """A layer without LoRA or quantization (their maths differ from the rule's)."""
    return (not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


def _arrange(t, lead, p_axes, g_axes, b_axes):
    """Transposes the axes after `lead` leading ones to (p..., g..., b...) and
    reshapes them to three axes (P, G, B); sizes are static."""
    shape = t.shape[lead:]
    perm = list(range(lead)) + [lead + i for i in (*p_axes, *g_axes, *b_axes)]
    if perm != list(range(len(perm))):
        t = tf.transpose(t, perm)
    size = lambda axes: int(np.prod([int(shape[i]) for i in axes], dtype=np.int64))  # noqa: E731
    head = tf.shape(t)[:lead]
    return tf.reshape(t, tf.concat([head, [size(p_axes), size(g_axes), size(b_axes)]], 0))


class Tokens:
    """The a-factor of a gather (Embedding): token ids (N, P) and the vocabulary size.

    Sliced over examples like a tensor (`tokens[:n]`).
    """

    def __init__(self, ids, vocabulary):
        self.ids = ids
        self.vocabulary = int(vocabulary)

    def __getitem__(self, index):
        return Tokens(self.ids[index], self.vocabulary)


class _Rule:
    """A layer linear in its weights: z[p, c, b] = Σ_a a[p, c, a] W[c, a, b] (+ bias)."""

    gather = False

    def __init__(self, layer):
        self.layer = layer
        self.calls = []  # [(inputs, probe)] recorded per call

    def variables(self):
        v = [self.layer.kernel]
        if self.layer.use_bias:
            v.append(self.layer.bias)
        return v

    def activation(self, z):
        act = getattr(self.layer, "activation", None)
        return z if act is None else act(z)

    def patched_call(self, tape):
        def call(inputs, *args, **kwargs):
            z = self.preactivation(inputs)
            probe = tf.zeros_like(z)
            tape.watch(probe)
            self.calls.append((inputs, probe))
            return self.activation(z + probe)

        return call

    def preactivation(self, inputs):
        raise NotImplementedError

    def grouped_inputs(self, inputs):
        """(N, P, G, A) without the bias column."""
        raise NotImplementedError

    def grouped_cotangents(self, g):
        """(K, N, *z.shape[1:]) → (K, N, P, G, B)."""
        raise NotImplementedError

    def has_bias_column(self):
        return bool(getattr(self.layer, "use_bias", False))

    def patches(self, inputs, dtype=None):
        """The a-factor (N, P, G, A) of one call, bias column included."""
        a = self.grouped_inputs(inputs)
        if dtype is not None:
            a = tf.cast(a, dtype)
        if self.has_bias_column():
            a = tf.concat([a, tf.ones_like(a[..., :1])], -1)
        return a

    def dims(self, inputs, probe):
        a = self.patches(inputs)
        g = self.grouped_cotangents(probe[None])
        return RuleDims(int(a.shape[1]), int(a.shape[2]), int(a.shape[3]), int(g.shape[-1]),
                        self.gather)

    def patches_key(self):
        """Equal for rules whose a-factors of one input are equal (None: never shared)."""
        return None

    def factors(self, dtype, memo=None):
        """[(a, probe)] for every recorded call; `memo` {(id(inputs), key): a} shares one
        a-factor between rules reading the same input (attention's query/key/value)."""
        out = []
        for inputs, probe in self.calls:
            key = self.patches_key()
            key = None if key is None or memo is None else (id(inputs), key)
            if key is None or key not in memo:
                a = self.patches(inputs, dtype)
                if key is not None:
                    memo[key] = a
            out.append((memo[key] if key is not None else a, probe))
        return out


class _DenseRule(_Rule):
    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.Dense and _plain(layer)

    def patches_key(self):
        return ("dense", self.has_bias_column())

    def preactivation(self, inputs):
        inputs = tf.convert_to_tensor(inputs)
        kernel = tf.convert_to_tensor(self.layer.kernel)
        z = tf.matmul(inputs, kernel) if len(inputs.shape) == 2 else keras.ops.matmul(inputs, kernel)
        if self.layer.use_bias:
            z = z + self.layer.bias
        return z

    def grouped_inputs(self, inputs):
        r = len(inputs.shape) - 1
        return _arrange(tf.convert_to_tensor(inputs), 1, range(r - 1), (), (r - 1,))

    def grouped_cotangents(self, g):
        r = len(g.shape) - 2
        return _arrange(g, 2, range(r - 1), (), (r - 1,))


class _ConvRule(_Rule):
    """Conv1D/Conv2D (channels last, any strides and dilation, 'causal' in 1-D); with
    `groups` > 1 a group of the rule per group of channels and filters, computed one
    group at a time (`_exact_calls.grouped_conv`)."""

    @staticmethod
    def supports(layer):
        return (
            type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D)
            and layer.data_format == "channels_last"
            and layer.padding in ("valid", "same", "causal")
            and _plain(layer)
        )

    def _padded(self, inputs):
        if self.layer.padding == "causal":
            return _causal_pad(self.layer, inputs), "valid"
        return inputs, self.layer.padding

    def preactivation(self, inputs):
        x, padding = self._padded(inputs)
        layer = self.layer
        z = (grouped_conv(layer, x, layer.kernel, padding) if layer.groups > 1 else
             keras.ops.conv(x, layer.kernel, strides=list(layer.strides), padding=padding,
                            dilation_rate=layer.dilation_rate, data_format="channels_last"))
        if layer.use_bias:
            z = z + layer.bias
        return z

    def grouped_inputs(self, inputs):
        x, padding = self._padded(inputs)
        p = _conv_patches(self.layer, x, padding)  # (N, P, K, C_in)
        n, k, c = tf.shape(p)[0], int(p.shape[2]), int(p.shape[3])
        groups = self.layer.groups
        if groups == 1:
            return tf.reshape(p, [n, -1, 1, k * c])
        p = tf.reshape(p, [n, -1, k, groups, c // groups])
        return tf.reshape(tf.transpose(p, [0, 1, 3, 2, 4]), [n, -1, groups, k * c // groups])

    def grouped_cotangents(self, g):
        groups = self.layer.groups
        return tf.reshape(g, tf.concat([tf.shape(g)[:2], [-1, groups, g.shape[-1] // groups]], 0))


class _DepthwiseRule(_Rule):
    """DepthwiseConv1D/2D (channels last): one group per input channel."""

    @staticmethod
    def supports(layer):
        return (
            type(layer) in (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
            and layer.data_format == "channels_last"
            and layer.padding in ("valid", "same")
            and _plain(layer)
        )

    def preactivation(self, inputs):
        layer = self.layer
        z = keras.ops.depthwise_conv(inputs, layer.kernel, strides=layer.strides,
                                     padding=layer.padding, dilation_rate=layer.dilation_rate,
                                     data_format="channels_last")
        if layer.use_bias:
            z = z + layer.bias
        return z

    def grouped_inputs(self, inputs):
        p = _conv_patches(self.layer, inputs, self.layer.padding)  # (N, P, K, C)
        return tf.transpose(p, [0, 1, 3, 2])

    def grouped_cotangents(self, g):
        m = self.layer.depth_multiplier
        c = int(g.shape[-1]) // m
        return tf.reshape(g, tf.concat([tf.shape(g)[:2], [-1, c, m]], 0))


_EINSUM = re.compile(r"^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)$")


def _einsum_roles(layer):
    """The equation's letters as (positions, groups, contracted, outputs, bias column), or None."""
    match = _EINSUM.match(layer.equation.replace(" ", ""))
    if match is None:
        return None
    x, w, y = match.groups()
    if x[0] != y[0] or x[0] in w or any(len(set(spec)) != len(spec) for spec in (x, w, y)):
        return None
    if any(c not in w and c not in y for c in x[1:]) or any(c not in x and c not in y for c in w):
        return None
    if any(c not in x and c not in w for c in y):
        return None
    positions = [c for c in x[1:] if c not in w]
    groups = [c for c in w if c in x and c in y]
    contracted = [c for c in w if c in x and c not in y]
    outputs = [c for c in w if c not in x]
    bias_axes = getattr(layer, "bias_axes", None) or ""
    # A bias over exactly the output-only axes is the constant column a = 1.
    bias_column = bool(bias_axes) and not groups and sorted(bias_axes) == sorted(outputs)
    return x, w, y, positions, groups, contracted, outputs, bias_column


class _EinsumDenseRule(_Rule):
    """EinsumDense without ellipses (MultiHeadAttention's query/key/value/output)."""

    @staticmethod
    def supports(layer):
        return (type(layer) is keras.layers.EinsumDense and _plain(layer)
                and _einsum_roles(layer) is not None)

    def __init__(self, layer):
        super().__init__(layer)
        self.roles = _einsum_roles(layer)

    def variables(self):
        v = [self.layer.kernel]
        if self.layer.bias is not None and self.roles[-1]:
            v.append(self.layer.bias)
        return v  # another bias is left to the generic Jacobian

    def has_bias_column(self):
        return self.layer.bias is not None and self.roles[-1]

    def preactivation(self, inputs):
        z = keras.ops.einsum(self.layer.equation, inputs, self.layer.kernel)
        if self.layer.bias is not None:
            z = z + self.layer.bias
        return z

    def patches_key(self):
        x, _, _, positions, groups, contracted, _, _ = self.roles
        at = lambda cs: tuple(x.index(c) - 1 for c in cs)  # noqa: E731
        return ("einsum", at(positions), at(groups), at(contracted), self.has_bias_column())

    def grouped_inputs(self, inputs):
        x, _, _, positions, groups, contracted, _, _ = self.roles
        at = lambda cs: [x.index(c) - 1 for c in cs]  # noqa: E731
        return _arrange(tf.convert_to_tensor(inputs), 1, at(positions), at(groups),
                        at(contracted))

    def grouped_cotangents(self, g):
        _, _, y, positions, groups, _, outputs, _ = self.roles
        at = lambda cs: [y.index(c) - 1 for c in cs]  # noqa: E731
        return _arrange(g, 2, at(positions), at(groups), at(outputs))


class _EmbeddingRule(_Rule):
    """Embedding: a gather, z[p] = W[t_p]; a·a' = [t == t'] (no one-hot formed)."""

    gather = True

    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.Embedding and _plain(layer)

    def variables(self):
        return [self.layer.embeddings]

    def activation(self, z):
        return z

    def _ids(self, inputs):
        ids = tf.convert_to_tensor(inputs)
        return ids if ids.dtype in (tf.int32, tf.int64) else tf.cast(ids, tf.int32)

    def preactivation(self, inputs):
        z = tf.gather(tf.convert_to_tensor(self.layer.embeddings), self._ids(inputs), axis=0)
        return tf.cast(z, self.layer.compute_dtype)

    def patches(self, inputs, dtype=None):
        ids = tf.cast(self._ids(inputs), tf.int32)
        return Tokens(tf.reshape(ids, [tf.shape(ids)[0], -1]), self.layer.input_dim)

    def grouped_cotangents(self, g):
        r = len(g.shape) - 2
        return _arrange(g, 2, range(r - 1), (), (r - 1,))

    def dims(self, inputs, probe):
        p = int(np.prod(inputs.shape[1:], dtype=np.int64))
        return RuleDims(p, 1, self.layer.input_dim, self.layer.output_dim, True)


class _NormalizationRule(_Rule):
    """Scale/offset of a normalization: z = γ ⊙ x̂ + β, per entry of the parameter axes."""

    def variables(self):
        v = []
        if self.layer.scale:
            v.append(self.layer.gamma)
        if self.layer.center:
            v.append(self.layer.beta)
        return v

    def activation(self, z):
        return tf.cast(z, self.layer.compute_dtype)

    def param_axes(self, rank):
        """The parameter axes of an input of `rank` (batch axis counted), sorted."""
        raise NotImplementedError

    def normalized(self, inputs):
        raise NotImplementedError

    def _broadcast(self, v, rank):
        axes = self.param_axes(rank)
        shape = [1] * rank
        for i, size in zip(axes, v.shape):
            shape[i] = int(size)
        return tf.reshape(v, shape)

    def preactivation(self, inputs):
        xhat = self.normalized(inputs)
        rank = len(inputs.shape)
        z = xhat
        if self.layer.scale:
            z = z * self._broadcast(tf.cast(self.layer.gamma, xhat.dtype), rank)
        if self.layer.center:
            z = z + self._broadcast(tf.cast(self.layer.beta, xhat.dtype), rank)
        return z

    def _split(self, t, lead, rank):
        g_axes = [a - 1 for a in self.param_axes(rank)]
        p_axes = [a for a in range(rank - 1) if a not in g_axes]
        return _arrange(t, lead, p_axes, g_axes, ())

    def has_bias_column(self):
        return False

    def patches(self, inputs, dtype=None):
        rank = len(inputs.shape)
        xhat = self._split(self.normalized(inputs), 1, rank)  # (N, P, G, 1)
        # Columns: x̂ for γ, then the constant 1 for β.
        columns = []
        if self.layer.scale:
            columns.append(xhat)
        if self.layer.center:
            columns.append(tf.ones_like(xhat))
        a = tf.concat(columns, -1) if len(columns) > 1 else columns[0]
        return a if dtype is None else tf.cast(a, dtype)

    def grouped_cotangents(self, g):
        rank = len(g.shape) - 1
        return self._split(g, 2, rank)


class _BatchNormRule(_NormalizationRule):
    """BatchNormalization in inference mode (moving statistics)."""

    @staticmethod
    def supports(layer):
        return (type(layer) is keras.layers.BatchNormalization
                and (layer.scale or layer.center))

    def param_axes(self, rank):
        return [self.layer.axis % rank]

    def normalized(self, inputs):
        x = tf.convert_to_tensor(inputs)
        x = tf.cast(x, keras.backend.result_type(x.dtype, "float32"))
        rank = len(x.shape)
        mean = self._broadcast(tf.cast(self.layer.moving_mean, x.dtype), rank)
        variance = self._broadcast(tf.cast(self.layer.moving_variance, x.dtype), rank)
        return (x - mean) * tf.math.rsqrt(variance + self.layer.epsilon)


class _LayerNormRule(_NormalizationRule):
    """LayerNormalization (not `rms_scaling`); statistics are per example."""

    @staticmethod
    def supports(layer):
        return (type(layer) is keras.layers.LayerNormalization
                and not getattr(layer, "rms_scaling", False)
                and (layer.scale or layer.center))

    def param_axes(self, rank):
        axis = self.layer.axis
        axes = [axis] if isinstance(axis, int) else list(axis)
        return sorted(a % rank for a in axes)

    def normalized(self, inputs):
        return keras.ops.layer_normalization(
            tf.convert_to_tensor(inputs), None, None, axis=self.layer.axis,
            epsilon=self.layer.epsilon)


_RULES = (_DenseRule, _ConvRule, _DepthwiseRule, _EinsumDenseRule, _EmbeddingRule,
          _BatchNormRule, _LayerNormRule)


def structured_rules(model, weights):
    """Rules for the supported layers whose variables are all in `weights`."""
    ids = {id(w) for w in weights}
    rules = []
    for layer in iter_layers(model):
        for rule_cls in _RULES:
            if rule_cls.supports(layer):
                rule = rule_cls(layer)
                if rule.variables() and all(id(v) in ids for v in rule.variables()):
                    rules.append(rule)
                break
    return rules


@contextlib.contextmanager
def patched(rules, tape):
    """Temporarily replaces each rule's layer `call` by the recording version."""
    with PATCH_LOCK:
        for rule in rules:
            rule.calls = []
        with replaced_calls([(rule.layer, rule.patched_call(tape)) for rule in rules]):
            yield


def rule_dims(rule):
    """RuleDims of a rule after a patched pass (a layer called k times: k·P positions)."""
    dims = [rule.dims(inputs, probe) for inputs, probe in rule.calls]
    if not dims:  # a layer the forward pass never calls
        return RuleDims(0, 0, 0, 0, False)
    return dims[0]._replace(p=sum(d.p for d in dims))


def _concat_a(parts):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], Tokens):
        return Tokens(tf.concat([t.ids for t in parts], 1), parts[0].vocabulary)
    return tf.concat(parts, 1)


def structured_factors(model, x, rules, training, sizes, dtype, heads=False):
    """One forward pass with probes; returns per rule [(a, [g_k per output])].

    a: (N, P, G, A) (a `Tokens` for a gather); g_k: (N, S_k, P, G, B), with
    `heads` a `_head.HeadCotangents` for the Dense layer feeding a linear Dense
    head (`contract_rules` contracts its traced kernel in width B, not S·B).
    """
    found = _head.find(model) if heads and len(sizes) == 1 else None
    chain = _dense_chain.dense_chain(model, rules, sizes)
    with PATCH_LOCK:  # rule.calls is shared by threads tracing the same model
        with tf.GradientTape(persistent=True) as tape:
            with patched(rules, tape):
                ys = call_flat(model, x, training)
            sums = tf.concat([tf.reshape(tf.reduce_sum(y, 0), [-1]) for y in ys], 0)
            first = sums[0]  # recorded by the tape for the single-output gradient
        memo = {}  # the a-factors of layers reading one input are one tensor
        recorded = [(rule, rule.factors(dtype, memo)) for rule in rules]
        written = _dense_chain.cotangents(chain) if chain is not None else None
    probes = [probe for _, calls in recorded for _, probe in calls]
    total = sum(sizes)
    if not probes:
        return []
    if written is not None:
        cots = None
    elif total == 1:
        cots = tape.gradient(first, probes, unconnected_gradients=_ZERO)
        cots = [c[None] for c in cots]
    else:
        cots = tape_jacobian(tape, sums, probes)
    del tape
    out, i = [], 0
    for rule, calls in recorded:
        a_list, g_list = [], []
        for a, _ in calls:
            if written is not None:  # already (N, S_total, P, G, B)
                g_list.append(tf.cast(written[id(rule)], dtype))
            else:
                g = rule.grouped_cotangents(cots[i])  # (S_total, N, P, G, B)
                g_list.append(tf.cast(tf.transpose(g, [1, 0, 2, 3, 4]), dtype))
            i += 1
            a_list.append(a)
        # A layer called several times: its calls are extra positions p.
        a = _concat_a(a_list)
        g = tf.concat(g_list, 2) if len(g_list) > 1 else g_list[0]
        if found is not None and rule.layer is found[0]:
            out.append((a, [_head.cotangents(rule, found[1], rule.calls, g, dtype)]))
            continue
        out.append((a, tf.split(g, sizes, axis=1)))
    return out


def contraction_costs(n1, n2, dims, axes):
    """{form: (FLOPs, elements held)} of the ways to contract one rule's factors.

    "per_example": W_n = Σ_p a_np ⊗ g_np, then Σ_{c,a,b} W_n W_m;
    "factorized": Σ_c Σ_{p,q} (a_np · a_mq)(g_np · g_mq) (for a gather a·a'
    is a token comparison). Element counts are the intermediates beyond the
    factors themselves.
    """
    p, g, a, b = dims.p, dims.g, dims.a, dims.b
    n, pairs = n1 + n2, axes.pairs
    weights = g * a * b
    pe_flops = n * axes.size * p * (g * b if dims.gather else weights) + n1 * n2 * pairs * weights
    pe_elems = n * axes.size * weights + n1 * n2 * axes.kernel_size
    fa = 1 if dims.gather else a
    fac_flops = n1 * n2 * p * p * g * (fa + b * pairs)
    fac_elems = n1 * n2 * p * p * g * (1 + axes.kernel_size)
    return {"per_example": (pe_flops, pe_elems), "factorized": (fac_flops, fac_elems)}


def contraction_form(n1, n2, dims, axes):
    """The form with the fewest FLOPs (ties: per-example) and its (FLOPs, elements)."""
    costs = contraction_costs(n1, n2, dims, axes)
    form = min(costs, key=lambda k: (costs[k][0], k != "per_example"))
    return form, costs[form]


def forward_flops(dims):
    """FLOPs of one example's forward pass through a rule's layer."""
    return dims.p * dims.b if dims.gather else 2 * dims.p * dims.g * dims.a * dims.b


def _gather_weight_gradients(ids, g, vocabulary, axes):
    """Per-example W_n[s, v, b] = Σ_p [t_np = v] g_np[s, b] by segment sums: (N, *S, V, B)."""
    n, p = int(ids.shape[0]), int(ids.shape[1])
    shape_s = list(axes.shape)
    b = int(g.shape[-1])
    rank_s = len(shape_s)
    # (N, *S, P, 1, B) → (N, P, *S, B) → rows (N·P, S·B)
    g = tf.reshape(g, [n, *shape_s, p, b])
    g = tf.transpose(g, [0, rank_s + 1, *range(1, rank_s + 1), rank_s + 2])
    rows = tf.reshape(g, [n * p, -1])
    segments = tf.reshape(ids + vocabulary * tf.range(n, dtype=ids.dtype)[:, None], [-1])
    w = tf.math.unsorted_segment_sum(rows, segments, n * vocabulary)
    w = tf.reshape(w, [n, vocabulary, *shape_s, b])
    return tf.transpose(w, [0, *range(2, rank_s + 2), 1, rank_s + 2])


def _shaped(a1, g1, axes):
    """(n, RuleDims, g1 as (n, *S, P, G, B)) of one side's factors."""
    n, p, c, b = int(g1.shape[0]), int(g1.shape[-3]), int(g1.shape[-2]), int(g1.shape[-1])
    gather = isinstance(a1, Tokens)
    dims = RuleDims(p, c, a1.vocabulary if gather else int(a1.shape[-1]), b, gather)
    return n, dims, tf.reshape(g1, [n, *axes.shape, p, c, b])


def _weight_gradients(a, g, dims, axes):
    """Per-example weight gradients W_n = Σ_p a_np ⊗ g_np, flattened: (N, *S, G·A·B).

    `g` as (N, *S, P, G, B). A single group is dropped (plain matrix products
    for XLA, whose dots with a size-1 batch axis take a slower path); many
    groups with a tiny a ⊗ g (normalizations: (x̂, 1) ⊗ 1 per channel) are an
    elementwise product summed over positions, not G tiny products.
    """
    n, s = int(g.shape[0]), axes.sub1
    if dims.gather:
        w = _gather_weight_gradients(a.ids, g[..., 0, :], dims.a, axes)
    elif dims.g == 1:
        w = tf.einsum(f"npa,n{s}pb->n{s}ab", a[:, :, 0], g[..., 0, :])
    elif dims.a * dims.b <= 4:
        a = tf.reshape(a, [n] + [1] * len(s) + [dims.p, dims.g, dims.a, 1])
        w = tf.reduce_sum(a * g[..., None, :], axis=len(s) + 1)
    else:
        w = tf.einsum(f"npra,n{s}prb->n{s}rab", a, g)
    return tf.reshape(w, [n, *axes.shape, -1])


# Per-example weight gradients of several rules are concatenated up to this many
# elements per side and contracted by one product (dozens of small layers: one
# matrix product instead of one each); a larger rule is contracted alone.
FUSE_ELEMENTS = 2**22


def _gram(w1, w2, axes, dtype):
    """`contract_jacobians` of (N, *S, W) factors; every output axis traced: one
    matrix product with the second operand transposed (an einsum over (S, W)
    makes XLA copy it transposed first)."""
    if axes.out or axes.sub1 != axes.sub2:
        return contract_jacobians(w1, w2, axes, dtype)
    same = w2 is w1
    rows = lambda w: w.shape[0] if w.shape[0] is not None else tf.shape(w)[0]  # noqa: E731
    w1 = tf.cast(tf.reshape(w1, [rows(w1), -1]), dtype)
    w2 = w1 if same else tf.cast(tf.reshape(w2, [rows(w2), -1]), dtype)
    return tf.matmul(w1, w2, transpose_b=True)


def _merge_shared_inputs(factors):
    """Rules [(a1, g1, a2, g2, bias)] whose a-factors are one tensor (on both sides), e.g.
    attention's query, key and value of one input, as one rule: cotangents side by side (B
    axes concatenated; Θ = Σ_rules (a·a')(g·g') = (a·a')(Σ_rules g·g'))."""
    merged, index = [], {}
    for a1, g1, a2, g2, bias in factors:
        key = None
        if not isinstance(a1, Tokens) and not isinstance(g1, _head.HeadCotangents):
            key = (id(a1), id(a2), tuple(g1.shape[:-1]), tuple(g2.shape[:-1]))
        if key is not None and key in index:
            entry = merged[index[key]]
            entry[1].append(g1)
            entry[3].append(g2)
            continue
        if key is not None:
            index[key] = len(merged)
        merged.append((a1, [g1], a2, [g2], bias))  # one a-factor: one bias column or none
    out = []
    for a1, g1s, a2, g2s, bias in merged:
        if len(g1s) == 1:
            out.append((a1, g1s[0], a2, g2s[0], bias))
            continue
        g1 = tf.concat(g1s, -1)
        same = a2 is a1 and all(g2 is g for g, g2 in zip(g1s, g2s))
        out.append((a1, g1, a2, g1 if same else tf.concat(g2s, -1), bias))
    return out


def contract_rules(factors, axes, dtype):
    """Σ over rules of `contract_structured` for [(a1, g1, a2, g2, bias)] (same factors: a2
    is a1; `bias`: the a-factors end in the bias column, `dense_gram`).

    Rules contracted through per-example weight gradients are fused: their
    gradients concatenated (at most `FUSE_ELEMENTS` per side at a time) and
    contracted by one product per group.
    """
    total, group, size = 0.0, [], 0
    factors = _merge_shared_inputs(factors)

    def flush(group):
        w1 = tf.concat([w for w, _ in group], -1) if len(group) > 1 else group[0][0]
        if all(w2 is w for w, w2 in group):
            return _gram(w1, w1, axes, dtype)
        w2 = tf.concat([w for _, w in group], -1) if len(group) > 1 else group[0][1]
        return _gram(w1, w2, axes, dtype)

    for a1, g1, a2, g2, bias in factors:
        if isinstance(g1, _head.HeadCotangents):
            if _head.applies(axes):
                total += _head.contract(a1, g1, a2, g2, dtype, bias)
                continue
            g1, g2 = g1.full, g2.full
        same = a2 is a1 and g2 is g1
        n1, dims, g1s = _shaped(a1, g1, axes)
        n2 = int(g2.shape[0])
        form, _ = contraction_form(n1, n2, dims, axes)
        if form != "per_example":
            total += contract_structured(a1, g1, a2, g2, axes, dtype, bias)
            continue
        w1 = _weight_gradients(a1, g1s, dims, axes)
        w2 = w1 if same else _weight_gradients(a2, _shaped(a2, g2, axes)[2], dims, axes)
        elements = (n1 + (0 if same else n2)) * int(np.prod(w1.shape[1:], dtype=np.int64))
        if group and size + elements > FUSE_ELEMENTS:
            total += flush(group)
            group, size = [], 0
        group.append((w1, w2))
        size += elements
    if group:
        total += flush(group)
    return total


def contract_structured(a1, g1, a2, g2, axes, dtype, bias=False):
    """Θ contribution of one rule from its (a, g) factors (`bias`: see `dense_gram`).

    Θ[n, m] = Σ_c Σ_{p,q} (a_np[c] · a_mq[c])(g_np[c] · g_mq[c]), either
    through per-example weight gradients W_n = Σ_p a_np ⊗ g_np or in
    factorized form, whichever `contraction_form` says is cheaper.
    """
    if isinstance(g1, _head.HeadCotangents):
        if _head.applies(axes):
            return _head.contract(a1, g1, a2, g2, dtype, bias)
        g1, g2 = g1.full, g2.full
    same = a2 is a1 and g2 is g1
    n1, dims, g1 = _shaped(a1, g1, axes)
    n2, _, g2 = (n1, dims, g1) if same else _shaped(a2, g2, axes)
    p, c, a, b, gather = dims
    s1, s2, out = axes.sub1, axes.sub2, axes.out
    form, _ = contraction_form(n1, n2, dims, axes)
    if form == "per_example":
        w1 = _weight_gradients(a1, g1, dims, axes)
        w2 = w1 if same else _weight_gradients(a2, g2, dims, axes)
        return contract_jacobians(w1, w2, axes, dtype)
    if gather:
        g1, g2 = g1[..., 0, :], g2[..., 0, :]
        gram_a = tf.cast(tf.equal(a1.ids[:, None, :, None], a2.ids[None, :, None, :]), dtype)
        gram_g = tf.einsum(f"n{s1}pb,m{s2}qb->nm{out}pq", g1, g2)
        return tf.einsum(f"nmpq,nm{out}pq->nm{out}", gram_a, gram_g)
    # One group: drop its axis, so that XLA sees plain matrix products (a batch
    # axis of size 1 sends dots down a slower path).
    r = "r" if c > 1 else ""
    if p == 1 and not r and not out:
        # Dense, every output axis traced: (A1 A2ᵀ) ⊙ (G1 G2ᵀ), two matrix products.
        gram_g = tf.matmul(tf.reshape(g1, [n1, -1]), tf.reshape(g2, [n2, -1]),
                           transpose_b=True)
        return dense_gram(a1, a2, bias) * gram_g
    if not r:
        a1, a2 = a1[:, :, 0], a2[:, :, 0]
        g1, g2 = g1[..., 0, :], g2[..., 0, :]
    if p == 1:
        a1, a2 = a1[:, 0], a2[:, 0]
        if r:
            g1, g2 = g1[..., 0, :, :], g2[..., 0, :, :]
        else:
            g1, g2 = g1[..., 0, :], g2[..., 0, :]
        gram_a = tf.einsum(f"n{r}a,m{r}a->nm{r}", a1, a2)
        gram_g = tf.einsum(f"n{s1}{r}b,m{s2}{r}b->nm{out}{r}", g1, g2)
        if not r:
            return tf.reshape(gram_a, [n1, n2] + [1] * len(out)) * gram_g
        return tf.einsum(f"nmr,nm{out}r->nm{out}", gram_a, gram_g)
    gram_a = tf.einsum(f"np{r}a,mq{r}a->nmpq{r}", a1, a2)
    gram_g = tf.einsum(f"n{s1}p{r}b,m{s2}q{r}b->nm{out}pq{r}", g1, g2)
    return tf.einsum(f"nmpq{r},nm{out}pq{r}->nm{out}", gram_a, gram_g)
