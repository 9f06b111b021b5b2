"""The traced kernel of the Dense layer that feeds a linear Dense head.

For a model whose only output is y = V·φ(z) + c, with z = W·x + b the
pre-activation of a Dense layer (2-D input), φ its elementwise activation and
V (B × K) the kernel of a linear Dense head, the cotangent of z for output k is
exactly g_k = φ'(z) ⊙ V[:, k], so the output trace of the Dense layer's
cotangent Gram collapses to one of width B instead of K·B:

    Σ_k g_k(x) · g_k(x') = Σ_i φ'(z)_i φ'(z')_i ‖V[i, :]‖².

Only that layer: an earlier layer's cotangents mix V through the later
weights and keep the rank-K form; with K = 1 nothing is saved. Used only when
every output axis is traced (`applies`); every other kernel takes the full
cotangents, which are computed anyway for the layers before it.
"""

import keras
import tensorflow as tf

from keras_ntk._jacobians import dense_gram

# Keras activations that act entry by entry (softmax and the like do not).
_ELEMENTWISE = (
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "swish", "mish",
    "tanh", "sigmoid", "hard_sigmoid", "hard_silu", "hard_swish", "log_sigmoid", "softplus",
    "softsign", "exponential", "linear", "squareplus", "sparse_plus", "hard_tanh",
    "tanh_shrink", "hard_shrink", "soft_shrink",
)


def _elementwise(activation):
    name = getattr(activation, "__name__", None)
    if name not in _ELEMENTWISE:
        return False
    try:
        return keras.activations.get(name) is activation
    except ValueError:  # a name this Keras does not know
        return False


def _plain_dense(layer):
    return (type(layer) is keras.layers.Dense
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and layer.compute_dtype == layer.kernel.dtype)


def _runs_its_graph(model):
    """Whether calling `model` runs its layer graph: Keras' Functional or Sequential `call`,
    not a subclass's own (which may do anything with the graph's output)."""
    for klass in type(model).__mro__:
        if klass.__name__ in ("Functional", "Sequential") and klass.__module__.startswith(
                "keras."):
            return type(model).call is klass.call
    return False


# What reading a model's graph of layers raises when it has none (subclassed, unbuilt).
GRAPH_ERRORS = (AttributeError, IndexError, TypeError, ValueError)


def producer(tensor):
    """(the layer whose call output `tensor` in a model's graph, that call's input tensors);
    may raise `GRAPH_ERRORS`."""
    history = tensor._keras_history
    layer = history.operation
    return layer, layer._inbound_nodes[history.node_index].input_tensors


def find(model):
    """(the Dense layer feeding the head, the head) of a model of that form, else None.

    The model's only output must be the output of a linear Dense head whose single
    input is the output of a Dense layer with an elementwise activation
    (a Sequential or functional model running its graph; both layers plain, float in
    their variables' dtype).
    """
    if not isinstance(model, keras.Model) or not _runs_its_graph(model):
        return None
    try:  # a model without a graph of layers (subclassed, unbuilt) has no head form
        outputs = model.outputs
        if not outputs or len(outputs) != 1:
            return None
        head, inputs = producer(outputs[0])
        if len(inputs) != 1:
            return None
        layer, _ = producer(inputs[0])
    except GRAPH_ERRORS:
        return None
    if not (_plain_dense(head) and _plain_dense(layer)):
        return None
    if head.activation is not keras.activations.linear or not _elementwise(layer.activation):
        return None
    return layer, head


class HeadCotangents:
    """A rule's cotangents (N, S, P, G, B) with their head form g_k = φ'(z) ⊙ V[:, k].

    `full`: the cotangents; `slope`: φ'(z) as (N, B); `weight`: ‖V[i, :]‖² as (B,).
    Sliced over examples like a tensor (`g[:n]`).
    """

    def __init__(self, full, slope, weight):
        self.full, self.slope, self.weight = full, slope, weight

    def __getitem__(self, index):
        return HeadCotangents(self.full[index], self.slope[index], self.weight)


def cotangents(rule, head, calls, g, dtype):
    """`g` (N, S, P, G, B) of `rule` wrapped with its head form, or `g` itself when the
    rule's layer was not called once on a 2-D input."""
    if len(calls) != 1 or len(calls[0][0].shape) != 2 or int(g.shape[1]) < 2:
        return g
    inputs = calls[0][0]
    z = rule.preactivation(inputs)
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = rule.activation(z)
    slope = tape.gradient(y, z)  # φ'(z): the activation acts entry by entry
    v = tf.convert_to_tensor(head.kernel)
    weight = tf.reduce_sum(tf.square(tf.cast(v, dtype)), axis=1)
    return HeadCotangents(g, tf.cast(slope, dtype), weight)


def applies(axes):
    """Whether the kernel traces every output axis (no diagonal, none kept)."""
    return not axes.out and axes.sub1 == axes.sub2


def contract(a1, g1, a2, g2, dtype, bias=False):
    """Θ of the rule (P = G = 1, traced): (A1 A2ᵀ) ⊙ ((φ'1 ⊙ ‖V‖²) φ'2ᵀ), not yet averaged
    (`bias`: the a-factors end in the bias column, `_jacobians.dense_gram`)."""
    gram_a = dense_gram(tf.cast(a1, dtype), tf.cast(a2, dtype), bias)
    gram_g = tf.matmul(g1.slope * g1.weight, g2.slope, transpose_b=True)
    return gram_a * gram_g
