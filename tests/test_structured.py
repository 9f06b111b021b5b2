"""Tests of `keras_ntk._structured`: the structured rules of every supported layer.

Through `empirical_ntk(implementation="structured")`, against the naive float64
`GradientTape.jacobian` kernel of tests/ntk_reference.py (Dense/Conv2D models),
and against the Jacobian kernel of float64 models for the other layers: each
such model is built twice from the same factory, in float32 and in float64
(weights copied); the reference is the explicit Jacobian of the float64 model's
whole-batch output contracted with numpy. The structured kernel of the float64
model must match it to float64 precision, through both contraction forms
(per-example weight gradients and factorized), and the rule must really cover
the layer (no generic fallback).
"""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from keras_ntk import _batching, _dense_chain, _structured
from keras_ntk._weights import iter_layers

from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    assert_matches_naive_jacobian, model_cases, plain_graphs)

pytestmark = pytest.mark.usefixtures("plain_graphs")


@pytest.mark.parametrize("name", model_cases("structured"))
def test_structured_implementation_matches_naive_jacobian(name):
    assert_matches_naive_jacobian(name, "structured")


RTOL64 = 1e-9


def _randomize_normalization(model):
    rng = np.random.default_rng(3)
    for layer in iter_layers(model):
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            for v in layer.weights:
                name = v.path.rsplit("/", 1)[-1]
                shape = tuple(v.shape)
                if name in ("gamma", "moving_variance"):
                    v.assign(rng.uniform(0.5, 1.5, shape))
                else:
                    v.assign(rng.normal(size=shape) * 0.3)
    return model


def conv1d(dtype):
    return keras.Sequential([
        keras.Input((9, 4)),
        keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="tanh",
                            dtype=dtype),
        keras.layers.Conv1D(4, 2, strides=2, padding="same", dtype=dtype),
        keras.layers.Conv1D(3, 3, padding="valid", use_bias=False, dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


def depthwise(dtype):
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="tanh",
                                     dtype=dtype),
        keras.layers.DepthwiseConv2D(2, strides=2, padding="valid", use_bias=False, dtype=dtype),
        keras.layers.Reshape((9, 4), dtype=dtype),
        keras.layers.DepthwiseConv1D(3, padding="same", dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


def grouped_conv(dtype):
    """Grouped Conv2D (strided, 'same', with and without bias) and causal Conv1D."""
    return keras.Sequential([
        keras.Input((6, 6, 4)),
        keras.layers.Conv2D(6, 3, strides=2, padding="same", groups=2, activation="tanh",
                            dtype=dtype),
        keras.layers.Conv2D(4, 2, groups=2, use_bias=False, dtype=dtype),
        keras.layers.Reshape((4, 4), dtype=dtype),
        keras.layers.Conv1D(4, 2, padding="causal", groups=4, dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


def attention(dtype):
    x = keras.Input((5, 4))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, dtype=dtype)(x, x)
    h = keras.layers.LayerNormalization(dtype=dtype)(h + x)
    # b is a group axis (in x, W and y); its bias over d is left to the generic path.
    h = keras.layers.EinsumDense("abc,bcd->abd", output_shape=(5, 3), bias_axes="d",
                                 activation="tanh", dtype=dtype)(h)
    h = keras.layers.EinsumDense("abc,bcd->ad", output_shape=(2,), bias_axes="d",
                                 dtype=dtype)(h)
    return keras.Model(x, h)


def embedding(dtype):
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(7, 4, dtype=dtype),
        keras.layers.Dense(3, activation="tanh", dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


def normalization(dtype):
    x = keras.Input((4, 3, 2))
    h = keras.layers.Conv2D(3, 2, padding="same", dtype=dtype)(x)
    h = keras.layers.BatchNormalization(dtype=dtype)(h)
    h = keras.layers.Activation("relu", dtype=dtype)(h)
    h = keras.layers.BatchNormalization(axis=1, center=False, dtype=dtype)(h)
    h = keras.layers.LayerNormalization(axis=(1, 2), dtype=dtype)(h)
    h = keras.layers.LayerNormalization(scale=False, dtype=dtype)(h)
    h = keras.layers.Flatten(dtype=dtype)(h)
    h = keras.layers.Dense(5, dtype=dtype)(h)
    h = keras.layers.BatchNormalization(dtype=dtype)(h)
    h = keras.layers.Dense(2, dtype=dtype)(h)
    return keras.Model(x, h)


FAMILIES = {
    "conv1d": (conv1d, (keras.layers.Conv1D,)),
    "depthwise": (depthwise, (keras.layers.DepthwiseConv2D, keras.layers.DepthwiseConv1D)),
    "grouped_conv": (grouped_conv, (keras.layers.Conv2D, keras.layers.Conv1D)),
    "attention": (attention, (keras.layers.EinsumDense, keras.layers.LayerNormalization)),
    "embedding": (embedding, (keras.layers.Embedding,)),
    "normalization": (normalization, (keras.layers.BatchNormalization,
                                      keras.layers.LayerNormalization)),
}


def inputs_for(name, n, seed):
    rng = np.random.default_rng(seed)
    if name == "embedding":
        return rng.integers(0, 7, size=(n, 6)).astype("int32")
    shape = {"conv1d": (9, 4), "depthwise": (6, 6, 2), "attention": (5, 4),
             "normalization": (4, 3, 2), "grouped_conv": (6, 6, 4)}[name]
    return rng.normal(size=(n, *shape))


def model_pair(name):
    factory = FAMILIES[name][0]
    model32, model64 = factory("float32"), factory("float64")
    _randomize_normalization(model32)
    model64.set_weights(model32.get_weights())
    return model32, model64


def jacobians(model, x, weights):
    """Per weight, the float64 Jacobian of the whole-batch output, (N, O, |w|)."""
    with tf.GradientTape(persistent=True) as tape:
        y = model(x, training=False)
    # A loop of gradients, not pfor: quicker for these few outputs.
    js = tape.jacobian(y, weights, experimental_use_pfor=False)
    return [np.reshape(np.asarray(j, np.float64), (*y.shape, -1)) for j in js]


def contract(j1, j2, trace=True):
    """Θ from Jacobian columns: (N1, N2) traced, else (N1, N2, O, O)."""
    full = np.einsum("nop,mqp->nmoq", np.concatenate(j1, -1), np.concatenate(j2, -1))
    return np.einsum("nmoo->nm", full) / full.shape[-1] if trace else full


def jacobian_kernel(model, x1, x2, trace=True):
    weights = model.trainable_weights
    return contract(jacobians(model, x1, weights), jacobians(model, x2, weights), trace)


def rel_error(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def covered_layer_types(model):
    rules = _structured.structured_rules(model, model.trainable_weights)
    return {type(rule.layer) for rule in rules}


# Each family runs one contraction form in `make test`, the other under `slow`.
FAST = {("conv1d", "factorized"), ("depthwise", "per_example"), ("attention", "factorized"),
        ("embedding", "factorized"), ("normalization", "per_example"),
        ("grouped_conv", "per_example"), ("grouped_conv", "factorized")}


@pytest.mark.parametrize("name,form", [
    pytest.param(n, f, marks=() if (n, f) in FAST else pytest.mark.slow)
    for n in sorted(FAMILIES) for f in ("per_example", "factorized")])
def test_rule_matches_float64_jacobian_kernel(name, form, monkeypatch):
    _, model = model_pair(name)
    for layer_type in FAMILIES[name][1]:
        assert layer_type in covered_layer_types(model), layer_type
    forced = lambda n1, n2, dims, axes: (form, (0, 0))  # noqa: E731
    monkeypatch.setattr(_structured, "contraction_form", forced)
    x1, x2 = inputs_for(name, 5, 0), inputs_for(name, 3, 1)
    expected = jacobian_kernel(model, x1, x2, trace=False)
    actual = keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(), implementation="structured",
                                     dtype="float64")
    assert actual.shape == expected.shape
    assert rel_error(actual, expected) < RTOL64


def transformer(dtype):
    """Embedding + attention + LayerNorm + MLP: every weight under a structured rule."""
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(7, 4, dtype=dtype)(tokens)
    h = h + keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype=dtype)(h, h)
    h = keras.layers.LayerNormalization(dtype=dtype)(h)
    h = keras.layers.Dense(5, activation="relu", dtype=dtype)(h)
    h = keras.layers.GlobalAveragePooling1D(dtype=dtype)(h)
    h = keras.layers.BatchNormalization(dtype=dtype)(h)
    return keras.Model(tokens, keras.layers.Dense(2, dtype=dtype)(h))


def test_per_layer_kernels_of_a_transformer_match_float64_jacobians():
    model32, model = transformer("float32"), transformer("float64")
    _randomize_normalization(model32)
    model.set_weights(model32.get_weights())
    rules = _structured.structured_rules(model, model.trainable_weights)
    covered = {id(v) for rule in rules for v in rule.variables()}
    assert all(id(w) in covered for w in model.trainable_weights)
    rng = np.random.default_rng(0)
    x1, x2 = rng.integers(0, 7, (5, 6)).astype("int32"), rng.integers(0, 7, (4, 6)).astype("int32")
    parts = keras_ntk.empirical_ntk(model, x1, x2, per_layer=True, dtype="float64",
                                    implementation="structured")
    weights = model.trainable_weights
    j1, j2 = jacobians(model, x1, weights), jacobians(model, x2, weights)
    index = {id(w): i for i, w in enumerate(weights)}
    for layer in iter_layers(model):
        own = [index[id(w)] for w in layer.trainable_weights
               if not any(w is v for sub in iter_layers(layer, include_self=False)
                          for v in sub.trainable_weights)]
        if own:
            expected = contract([j1[i] for i in own], [j2[i] for i in own])
            assert rel_error(parts[layer.name], expected) < RTOL64, layer.name
    assert len(parts) == 9  # embedding, query/key/value/output, norm, dense, batchnorm, dense
    assert rel_error(sum(parts.values()), contract(j1, j2)) < RTOL64


@pytest.mark.parametrize("with_x2", [False, True])
def test_traced_fused_per_example_contraction_matches_float64_jacobian_kernel(with_x2,
                                                                             monkeypatch):
    # Every output axis traced: the fused per-example gradients of all rules are
    # contracted by one transposed matrix product (`_structured._gram`).
    _, model = model_pair("attention")
    forced = lambda n1, n2, dims, axes: ("per_example", (0, 0))  # noqa: E731
    monkeypatch.setattr(_structured, "contraction_form", forced)
    x1 = inputs_for("attention", 5, 0)
    x2 = inputs_for("attention", 3, 1) if with_x2 else None
    expected = jacobian_kernel(model, x1, x1 if x2 is None else x2, trace=True)
    actual = keras_ntk.empirical_ntk(model, x1, x2, implementation="structured",
                                     dtype="float64")
    assert actual.shape == expected.shape
    assert rel_error(actual, expected) < RTOL64


def head_mlp(dtype, activation, functional=False):
    """Dense layers ending in a linear Dense head of 3 units (keras_ntk._head's form)."""
    return dense_chain_model(("tanh", activation, None), 3, functional, dtype)


@pytest.mark.parametrize("activation,functional,with_x2,per_layer", [
    ("relu", False, False, False), ("tanh", True, True, False), ("gelu", False, True, True),
    ("sigmoid", True, False, True)])
def test_traced_head_identity_matches_float64_jacobian_kernel(activation, functional, with_x2,
                                                              per_layer, monkeypatch):
    # The Dense layer feeding a linear head: Σ_k g_k·g'_k = Σ_i φ'_i φ'_i' ‖V[i, :]‖²
    # (`keras_ntk._head`), in the fused and in the per-layer kernels.
    from keras_ntk import _head
    model = head_mlp("float64", activation, functional)
    model.layers[-1].kernel.assign(np.random.default_rng(5).normal(size=(5, 3)))
    found = _head.find(model)
    assert found is not None and found == (model.layers[-2], model.layers[-1])
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())  # traced afresh
    used = []
    contract_head = _head.contract
    monkeypatch.setattr(_head, "contract", lambda *a: used.append(1) or contract_head(*a))
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(5, 4))
    x2 = rng.normal(size=(3, 4)) if with_x2 else None
    weights = model.trainable_weights
    j1 = jacobians(model, x1, weights)
    j2 = j1 if x2 is None else jacobians(model, x2, weights)
    actual = keras_ntk.empirical_ntk(model, x1, x2, implementation="structured",
                                     dtype="float64", per_layer=per_layer)
    assert used  # the head form ran
    if per_layer:
        for i, layer in enumerate(l for l in model.layers if l.trainable_weights):
            own = [2 * i, 2 * i + 1]
            expected = contract([j1[k] for k in own], [j2[k] for k in own])
            assert rel_error(actual[layer.name], expected) < RTOL64, layer.name
        actual = sum(actual.values())
    assert rel_error(actual, contract(j1, j2)) < RTOL64
    # Untraced outputs take the full cotangents.
    full = keras_ntk.empirical_ntk(model, x1, x2, implementation="structured", dtype="float64",
                                   trace_axes=())
    assert rel_error(full, contract(j1, j2, trace=False)) < RTOL64


@pytest.mark.parametrize("head_bias", [True, False])
@pytest.mark.parametrize("with_x2,per_layer", [(False, False), (True, False), (False, True)])
def test_dense_grams_split_off_the_bias_column_exactly(head_bias, with_x2, per_layer,
                                                       monkeypatch):
    # The a-factor Gram of a Dense layer with a bias is A Aᵀ + 1 over its input, without
    # the appended column (`_jacobians.dense_gram`); layers without a bias keep A Aᵀ. A
    # chain mixing both, with a linear head (the head form) with and without its bias.
    from keras_ntk import _head
    dense = lambda units, act, bias: keras.layers.Dense(  # noqa: E731
        units, activation=act, use_bias=bias, dtype="float64")
    model = keras.Sequential([keras.Input((4,), dtype="float64"), dense(6, "relu", True),
                              dense(5, "tanh", False), dense(4, "relu", True),
                              dense(3, None, head_bias)])
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())  # traced afresh
    monkeypatch.setattr(_structured, "contraction_form",
                        lambda n1, n2, dims, axes: ("factorized", (0, 0)))
    calls = []
    for module in (_structured, _head):
        gram = module.dense_gram
        monkeypatch.setattr(module, "dense_gram", lambda a1, a2, bias=False, gram=gram: (
            calls.append(bias) or gram(a1, a2, bias)))
    rng = np.random.default_rng(4)
    x1 = rng.normal(size=(5, 4))
    x2 = rng.normal(size=(3, 4)) if with_x2 else None
    actual = keras_ntk.empirical_ntk(model, x1, x2, implementation="structured",
                                     dtype="float64", per_layer=per_layer)
    assert sorted(set(calls)) == [False, True]  # both kinds of layer took the Dense Gram
    if per_layer:
        actual = sum(actual.values())
    weights = model.trainable_weights
    j1 = jacobians(model, x1, weights)
    j2 = j1 if x2 is None else jacobians(model, x2, weights)
    assert rel_error(actual, contract(j1, j2)) < RTOL64


def dense_chain_model(activations, units, functional, dtype="float64"):
    """Dense layers of widths 6, 5, 4, ... with `activations`, the last with `units`."""
    widths = [6, 5, 4, 3][:len(activations) - 1] + [units]
    layers = [keras.layers.Dense(w, activation=a, dtype=dtype)
              for w, a in zip(widths, activations)]
    if not functional:
        return keras.Sequential([keras.Input((4,)), *layers])
    x = keras.Input((4,))
    h = x
    for layer in layers:
        h = layer(h)
    return keras.Model(x, h)


@pytest.mark.parametrize("activations,units,functional,with_x2,trace,per_layer", [
    (("relu", "relu", None), 3, False, False, True, False),  # MLP-10's form: a linear head
    (("tanh", "gelu", "softplus"), 3, True, True, False, False),  # a non-linear head
    (("sigmoid", None), 1, False, True, True, False),  # one output
    (("relu", "selu", "tanh", None), 2, True, False, True, True),  # per layer
    (("elu",), 3, False, False, False, False),  # one layer: the chain is its head
])
def test_dense_chain_cotangents_match_float64_jacobian_kernel(
        activations, units, functional, with_x2, trace, per_layer, monkeypatch):
    # A chain of Dense layers has its cotangents written out, example-major
    # (`_dense_chain.cotangents`), not taken from a vectorized backward pass.
    model = dense_chain_model(activations, units, functional)
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())  # traced afresh
    written = []
    cotangents = _dense_chain.cotangents
    monkeypatch.setattr(_dense_chain, "cotangents",
                        lambda chain: written.append(len(chain)) or cotangents(chain))
    rng = np.random.default_rng(2)
    x1 = rng.normal(size=(5, 4))
    x2 = rng.normal(size=(3, 4)) if with_x2 else None
    actual = keras_ntk.empirical_ntk(model, x1, x2, implementation="structured",
                                     dtype="float64", per_layer=per_layer,
                                     trace_axes=(-1,) if trace else ())
    assert written and set(written) == {len(activations)}
    weights = model.trainable_weights
    j1 = jacobians(model, x1, weights)
    j2 = j1 if x2 is None else jacobians(model, x2, weights)
    if per_layer:
        for i, layer in enumerate(l for l in model.layers if l.trainable_weights):
            own = [2 * i, 2 * i + 1]
            expected = contract([j1[k] for k in own], [j2[k] for k in own], trace)
            assert rel_error(actual[layer.name], expected) < RTOL64, layer.name
        actual = sum(actual.values())
    assert rel_error(actual, contract(j1, j2, trace)) < RTOL64


def test_only_a_chain_of_dense_layers_is_a_dense_chain():
    def chain(model, weights=None):
        weights = model.trainable_weights if weights is None else weights
        rules = _structured.structured_rules(model, weights)
        found = _dense_chain.dense_chain(model, rules, [2])
        return None if found is None else [rule.layer for rule in found]

    model = dense_chain_model(("relu", "tanh", None), 2, functional=True)
    assert chain(model) == model.layers[1:]
    assert chain(dense_chain_model(("relu", None), 2, functional=False)) is not None
    # Not chains: a layer between, a softmax (not entry by entry), two branches, a
    # subclassed model, a layer applied twice, and a chain whose layers are not all
    # selected (`variables`).
    dense = lambda units, act=None: keras.layers.Dense(units, activation=act)  # noqa: E731
    between = keras.Sequential([keras.Input((4,)), dense(5, "relu"), keras.layers.Dropout(0.5),
                                dense(2)])
    softmax = keras.Sequential([keras.Input((4,)), dense(5, "relu"), dense(2, "softmax")])
    x = keras.Input((4,))
    branches = keras.Model(x, dense(2)(keras.layers.Add()([dense(5)(x), dense(5)(x)])))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = dense(5, "relu"), dense(2)

        def call(self, inputs):
            return self.b(self.a(inputs))

    subclassed = Subclassed()
    subclassed(np.zeros((1, 4), "float32"))
    twice = dense(4, "tanh")
    shared = keras.Model(x, dense(2)(twice(twice(x))))
    for other in (between, softmax, branches, subclassed, shared):
        assert chain(other) is None, other
    assert chain(model, model.layers[-1].trainable_weights) is None


def test_traced_head_form_is_found_only_where_exact():
    from keras_ntk import _head
    assert _head.find(head_mlp("float32", "softmax")) is None  # not elementwise
    assert _head.find(head_mlp("float32", lambda z: tf.nn.relu(z))) is None  # unknown function
    model = head_mlp("float32", "relu")
    model.layers[-1].activation = keras.activations.tanh  # a head that is not linear
    assert _head.find(model) is None
    x = keras.Input((4,))
    h = keras.layers.Dense(5, activation="relu")(x)
    two = keras.Model(x, [keras.layers.Dense(3)(h), keras.layers.Dense(2)(h)])
    assert _head.find(two) is None  # two outputs
    skip = keras.Model(x, keras.layers.Dense(3)(keras.layers.Concatenate()([h, x])))
    assert _head.find(skip) is None  # the head does not read the Dense layer alone


class DoubledGraph(keras.Model):
    """Built from a layer graph, but its own `call` changes what the graph computes."""

    def call(self, inputs):
        return super().call(inputs) * 2.0


class RenamedGraph(keras.Model):
    """Built from a layer graph and running it: Keras' own `call`."""


def test_traced_head_form_is_not_used_when_the_model_call_is_not_its_graph():
    # The head form is read off the model's layer graph; a subclass overriding `call`
    # (here: the graph's output doubled) does not compute y = V·φ(z) + c.
    from keras_ntk import _head
    x = keras.Input((4,))
    layer, head = (keras.layers.Dense(5, activation="tanh", dtype="float64"),
                   keras.layers.Dense(3, dtype="float64"))
    model = DoubledGraph(x, head(layer(x)))
    assert _head.find(model) is None
    assert _head.find(RenamedGraph(x, head(layer(x)))) == (layer, head)
    x1 = np.random.default_rng(3).normal(size=(5, 4))
    j = jacobians(model, x1, model.trainable_weights)
    actual = keras_ntk.empirical_ntk(model, x1, implementation="structured", dtype="float64")
    assert rel_error(actual, contract(j, j)) < RTOL64


@pytest.mark.parametrize("with_x2", [False, True])
def test_rules_of_one_input_are_contracted_as_one(with_x2, monkeypatch):
    # Attention's query, key and value read one input: one a-factor, their cotangents
    # side by side (`_structured._merge_shared_inputs`), exact against float64.
    _, model = model_pair("attention")
    # Functions shared by architecture are traced afresh (earlier tests ran this one).
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())
    merged = []
    merge = _structured._merge_shared_inputs
    monkeypatch.setattr(_structured, "_merge_shared_inputs",
                        lambda f: merged.append((len(f), len(merge(f)))) or merge(f))
    x1 = inputs_for("attention", 5, 0)
    x2 = inputs_for("attention", 3, 1) if with_x2 else None
    expected = jacobian_kernel(model, x1, x1 if x2 is None else x2, trace=True)
    actual = keras_ntk.empirical_ntk(model, x1, x2, implementation="structured",
                                     dtype="float64")
    assert rel_error(actual, expected) < RTOL64
    # 7 rules (query, key, value, output, LayerNorm, 2 EinsumDense); with x2 = None key
    # and value, which read one tensor, are one (the query reads its own cast of the
    # input; with x2, x1 and x2 slice each rule's a-factor: nothing shared).
    assert merged == [(7, 6 if x2 is None else 7)]
