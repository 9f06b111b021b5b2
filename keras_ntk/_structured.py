"""Structured derivative rules: Θ of Dense/Conv2D layers from (input, cotangent) factors.

In inference mode each example's output depends only on its own input, so
one backward pass of the batch-summed output gives every example's cotangent
g at each layer; a Dense or Conv2D layer's per-example weight gradient is
Σ_p a_p ⊗ g_p (input patches a, cotangents at the pre-activation g), so its
part of Θ is contracted from those factors without forming per-example
gradients.

This is the only code that touches Keras layer internals: to record a
layer's input and to add a zero probe to its pre-activation, each supported
layer's `call` is replaced for the duration of one traced forward pass
(`patched`), and the rule recomputes the layer's maths from its variables.
"""

import contextlib
import threading

import keras
import tensorflow as tf

from keras_ntk._jacobians import call_flat, contract_jacobians, tape_jacobian
from keras_ntk._weights import iter_layers

_ZERO = tf.UnconnectedGradients.ZERO

# Patching `layer.call` is process-global state: serialize it across threads
# (MirroredStrategy runs replicas in threads that may trace concurrently).
_PATCH_LOCK = threading.RLock()


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


def structured_rules(model, weights):
    """Rules for the supported layers whose variables are all in `weights`."""
    ids = {id(w) for w in weights}
    rules = []
    for layer in iter_layers(model):
        for rule_cls in _RULES:
            if rule_cls.supports(layer):
                rule = rule_cls(layer)
                if all(id(v) in ids for v in rule.variables()):
                    rules.append(rule)
                break
    return rules


@contextlib.contextmanager
def patched(rules, tape):
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


def structured_factors(model, x, rules, training, sizes, dtype):
    """One forward pass with probes; returns per rule [(A, [G_k per output])]."""
    with _PATCH_LOCK:  # rule.calls is shared by threads tracing the same model
        with tf.GradientTape(persistent=True) as tape:
            with patched(rules, tape):
                ys = call_flat(model, x, training)
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
        cots = tape_jacobian(tape, sums, probes)
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


def factorized_costs(n1, n2, p, a, b, axes):
    """FLOPs of the two ways to contract a patch-linear layer."""
    per_example = (n1 + n2) * axes.size * p * a * b + n1 * n2 * axes.pairs * a * b
    factorized = n1 * n2 * p * p * (a + b * axes.pairs)
    return per_example, factorized


def contract_structured(a1, g1, a2, g2, axes, dtype):
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
    per_example, factorized = factorized_costs(n1, n2, p, a, b, axes)
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
        return contract_jacobians(w1, w2, axes, dtype)
    gram_a = tf.einsum("npa,mqa->nmpq", a1, a2)
    gram_g = tf.einsum(f"n{axes.sub1}pb,m{axes.sub2}qb->nm{axes.out}pq", g1, g2)
    return tf.einsum(f"nmpq,nm{axes.out}pq->nm{axes.out}", gram_a, gram_g)
