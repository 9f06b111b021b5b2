"""Cotangents of a chain of Dense layers, written out (an exact shortcut of the structured rules).

For a model that is nothing but Dense layers in a row (`dense_chain`), the
cotangents that `_structured.structured_factors` needs at every layer's
pre-activation follow from the layers' kernels and their activations' slopes
alone, one product per layer (`cotangents`). Computed so, they come out
example-major and without the vectorized backward pass's product of its seeds
with the head kernel: MLP-10 traced, N = 256, 6.95 against 7.73 ms a call
(docs/performance.md, "Session 12").
"""

import tensorflow as tf

from keras_ntk import _head
from keras_ntk._jacobians import identity_seeds


def dense_chain(model, rules, sizes):
    """The rules of `model` in order, input to output, if it is a chain of Dense layers;
    else None.

    A Sequential or functional model (running its graph) with one input and one
    output, the output that of the last of Dense layers each reading the one before
    it (the first reading the input), each with an elementwise activation, plain and
    in its variables' dtype, each with a rule in `rules` and no other rule there.
    Its cotangents are written out (`cotangents`) instead of taken from a
    vectorized backward pass.
    """
    if len(sizes) != 1 or not rules or not _head._runs_its_graph(model):
        return None
    by_layer = {id(rule.layer): rule for rule in rules}
    chain = []
    try:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            return None
        tensor, source = model.outputs[0], model.inputs[0]
        while tensor is not source and len(chain) <= len(rules):
            layer, inputs = _head.producer(tensor)
            rule = by_layer.get(id(layer))
            if (rule is None or not _head._plain_dense(layer)
                    or not _head._elementwise(layer.activation) or len(inputs) != 1):
                return None
            chain.append(rule)
            tensor = inputs[0]
    except _head.GRAPH_ERRORS:
        return None  # a model without a graph of layers
    # Every rule once: a layer applied twice (shared weights) is not a chain of its own.
    if (tensor is not source or len(chain) != len(rules)
            or len(set(map(id, chain))) != len(chain)):
        return None
    return chain[::-1]


def cotangents(chain):
    """{id(rule): the cotangents of its pre-activation for every output entry,
    example-major, (N, K, 1, 1, B)} for the rules of a Dense chain (`dense_chain`) after
    its patched pass; None unless each layer was called once, on a 2-D input.

    With φ'_l the slopes of layer l's activation and W_l its kernel, g_L[n, k, b] =
    [k = b] φ'_L[n, b] (the identity `tape_jacobian` seeds with), g_{L-1} = φ'_L[n, k]
    W_L[b, k] φ'_{L-1}[n, b] (a broadcast, no product) and g_l = (g_{l+1} W_{l+1}ᵀ) ⊙
    φ'_l: the vectorized backward pass of autodiff, without its seeds' product with the
    head kernel and with the example axis first (no transposing copy for the Grams).
    """
    if not all(len(r.calls) == 1 and len(r.calls[0][0].shape) == 2 for r in chain):
        return None
    slopes = []
    for rule in chain:
        z = rule.preactivation(rule.calls[0][0])  # the forward pass's product (CSE'd)
        with tf.GradientTape() as tape:
            tape.watch(z)
            y = rule.activation(z)
        slopes.append(tape.gradient(y, z))  # φ'(z): the activation acts entry by entry
    n, k = tf.shape(slopes[0])[0], int(chain[-1].layer.units)
    g = identity_seeds(k, slopes[-1].dtype)[None] * slopes[-1][:, None, :]
    out = [g]
    for level in range(len(chain) - 2, -1, -1):
        kernel = tf.convert_to_tensor(chain[level + 1].layer.kernel)
        if level == len(chain) - 2:
            g = slopes[-1][:, :, None] * tf.transpose(kernel)[None]
        else:
            g = tf.reshape(tf.matmul(tf.reshape(g, [-1, int(kernel.shape[1])]), kernel,
                                     transpose_b=True), [n, k, int(kernel.shape[0])])
        g = g * slopes[level][:, None, :]
        out.append(g)
    return {id(rule): tf.reshape(t, [n, k, 1, 1, int(t.shape[-1])])
            for rule, t in zip(chain, out[::-1])}
