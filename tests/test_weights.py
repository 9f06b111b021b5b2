"""Tests of `keras_ntk._weights`: the nested-layer walker and weight selection."""

import keras
import numpy as np
import pytest

from keras_ntk._weights import iter_layers, select_weights


def _nested_model():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, name="inner_dense"),
         keras.layers.BatchNormalization(name="bn")],
        name="inner",
    )
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, name="first")(inputs)
    h = inner(h)
    frozen = keras.layers.Dense(2, name="frozen")
    frozen.trainable = False
    h = frozen(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    return keras.Model(inputs, outputs, name="outer"), inner


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = keras.layers.Dense(3, name="block_a")
        self.b = keras.layers.Dense(3, name="block_b")

    def call(self, x):
        return self.b(self.a(x))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.block = _Block(name="block")
        self.shared = keras.layers.Dense(3, name="shared")
        self.head = keras.layers.Dense(2, name="sub_head")

    def call(self, x):
        return self.head(self.shared(self.shared(self.block(x))))


def _names(weights):
    return [w.path for w in weights]


def test_iter_layers_visits_nested_and_attribute_layers_once():
    model, _ = _nested_model()
    names = [layer.name for layer in iter_layers(model)]
    assert names[0] == "outer"
    for expected in ("first", "inner", "inner_dense", "bn", "frozen", "head"):
        assert names.count(expected) == 1, names
    assert "outer" not in [layer.name for layer in iter_layers(model, include_self=False)]

    sub = _Subclassed()
    sub(np.zeros((1, 3), "float32"))
    names = [layer.name for layer in iter_layers(sub)]
    for expected in ("block", "block_a", "block_b", "shared", "sub_head"):
        assert names.count(expected) == 1, names


def test_iter_layers_finds_wrapped_layers():
    inner = keras.layers.Dense(2, name="wrapped")
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.TimeDistributed(inner)])
    assert any(layer is inner for layer in iter_layers(model))


def test_select_all_and_order():
    model, _ = _nested_model()
    assert _names(select_weights(model)) == _names(model.trainable_weights)
    assert _names(select_weights(model, None)) == _names(model.trainable_weights)
    # Items in any order, duplicates: model order, each once.
    head = model.get_layer("head")
    first = model.get_layer("first")
    got = select_weights(model, [head, "first", first.kernel, head.bias, "head"])
    expected = [w for w in model.trainable_weights if w.path.split("/")[0] in ("first", "head")]
    assert _names(got) == _names(expected)
    assert len(got) == 4


def test_select_nested_layer_by_name_and_by_object():
    model, inner = _nested_model()
    got = select_weights(model, ["inner_dense"])
    assert [id(w) for w in got] == [id(w) for w in inner.get_layer("inner_dense").trainable_weights]
    # A nested model: all its trainable weights (BatchNorm gamma/beta included).
    got = select_weights(model, [inner])
    assert [id(w) for w in got] == [id(w) for w in inner.trainable_weights]
    assert len(got) == 4
    # A single item without a list.
    assert len(select_weights(model, "head")) == 2
    # The model itself.
    assert len(select_weights(model, [model])) == len(model.trainable_weights)


def test_select_by_weight_path_and_backend_variable():
    model, _ = _nested_model()
    head = model.get_layer("head")
    assert select_weights(model, [head.kernel.path]) == [head.kernel]
    assert select_weights(model, [head.kernel.value]) == [head.kernel]


def test_select_subclassed_attribute_layers():
    sub = _Subclassed()
    sub(np.zeros((1, 3), "float32"))
    got = select_weights(sub, ["block_b", "sub_head"])
    assert len(got) == 4
    assert {id(w) for w in got} == {
        id(w) for w in sub.block.b.trainable_weights + sub.head.trainable_weights
    }


def test_errors():
    model, _ = _nested_model()
    with pytest.raises(ValueError, match=r"layer of the model.*Received: variables item='nope'"):
        select_weights(model, ["nope"])
    with pytest.raises(ValueError, match="has none. Received"):
        select_weights(model, ["frozen"])  # no trainable weights
    with pytest.raises(ValueError, match="has none. Received"):
        select_weights(model, [model.get_layer("frozen")])
    with pytest.raises(ValueError, match="trainable weight of the model.*Received"):
        select_weights(model, [model.get_layer("frozen").kernel])
    with pytest.raises(ValueError, match="trainable weight of the model.*Received"):
        select_weights(model, [model.get_layer("inner").get_layer("bn").moving_mean])
    other = keras.layers.Dense(2)
    other.build((None, 2))
    with pytest.raises(ValueError, match="part of the model.*Received"):
        select_weights(model, [other])
    with pytest.raises(ValueError, match="trainable weight of the model.*Received"):
        select_weights(model, [other.kernel])
    with pytest.raises(ValueError, match="at least one.*Received: variables=\\[\\]"):
        select_weights(model, [])
    with pytest.raises(TypeError, match="Received"):
        select_weights(model, [3])


def test_ambiguous_layer_name():
    a = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="same")], name="a")
    b = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="same")], name="b")
    inputs = keras.Input((2,))
    model = keras.Model(inputs, b(a(inputs)))
    with pytest.raises(ValueError, match="2 nested layers are named 'same'.*Received"):
        select_weights(model, ["same"])
    assert len(select_weights(model, [a, b])) == 4
