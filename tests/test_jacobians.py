"""Tests of `keras_ntk._jacobians`: per-example Jacobians contracted into the kernel.

Through `empirical_ntk(implementation="jacobian")`, against the naive float64
`GradientTape.jacobian` kernel of tests/ntk_reference.py.
"""

import pytest

from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    assert_matches_naive_jacobian, model_cases, plain_graphs)

pytestmark = pytest.mark.usefixtures("plain_graphs")


@pytest.mark.parametrize("name", model_cases("jacobian"))
def test_jacobian_implementation_matches_naive_jacobian(name):
    assert_matches_naive_jacobian(name, "jacobian")


def _lstm(units=3):
    import keras

    return keras.Sequential([keras.Input((4, 2)), keras.layers.LSTM(units),
                             keras.layers.Dense(1)])


def test_unrolled_calls_overlap_across_threads_and_models():
    # Thread "a" stays inside `unrolled(first)` until thread "b" has run `second`
    # (another model) and `first` (the same model: the replicas of a MirroredStrategy)
    # inside `unrolled`. A lock held across the model call would make "b" wait for "a"
    # and "a" for "b": "b" would never finish. The layers stay unrolled until the last overlapping call leaves,
    # and every call computes the model's own outputs.
    import threading

    import numpy as np

    from keras_ntk._jacobians import call_flat, recurrent_layers, unrolled

    x = np.random.default_rng(0).normal(size=(2, 4, 2)).astype("float32")
    first, second = _lstm(), _lstm(4)
    expected = {id(m): np.asarray(m(x)) for m in (first, second)}
    b_done, failures, seen = threading.Event(), [], {}

    def outputs_match(model):
        out = np.asarray(call_flat(model, x, training=False)[0])
        if not np.allclose(out, expected[id(model)], rtol=1e-5, atol=1e-6):
            failures.append(model.name)

    def thread_a():
        with unrolled(first):
            outputs_match(first)
            if not b_done.wait(timeout=10):
                failures.append("b did not finish while a was inside unrolled")
            seen["first after b"] = [layer.unroll for layer in recurrent_layers(first)]

    def thread_b():
        with unrolled(second):
            seen["second inside"] = [layer.unroll for layer in recurrent_layers(second)]
            outputs_match(second)
        with unrolled(first):
            outputs_match(first)
        b_done.set()

    a = threading.Thread(target=thread_a)
    a.start()
    b = threading.Thread(target=thread_b)
    b.start()
    a.join(20)
    b.join(20)
    assert not failures and b_done.is_set(), failures
    assert seen == {"second inside": [True], "first after b": [True]}
    assert not any(layer.unroll for m in (first, second) for layer in recurrent_layers(m))


def test_unrolled_nested_and_shared_layers_are_restored_by_the_last_call():
    import keras

    from keras_ntk._jacobians import unrolled

    lstm = keras.layers.LSTM(2)
    one = keras.Sequential([keras.Input((3, 2)), lstm])
    two = keras.Sequential([keras.Input((3, 2)), lstm, keras.layers.Dense(1)])
    with unrolled(one):
        with unrolled(two):
            with unrolled(one):
                assert lstm.unroll
            assert lstm.unroll
        assert lstm.unroll
    assert not lstm.unroll
    # A layer the user unrolled stays unrolled.
    own = keras.layers.LSTM(2, unroll=True)
    with unrolled(keras.Sequential([keras.Input((3, 2)), own])):
        assert own.unroll
    assert own.unroll


def test_unrolling_is_logged_once_per_model_and_forgets_freed_models(caplog):
    # Each new model logs once (also one at the address of a freed model: CPython reuses
    # them), and the record of logged models does not grow with models that are gone.
    import gc
    import logging
    import weakref

    from keras_ntk import _jacobians

    gc.collect()
    before = len(_jacobians._LOGGED)
    refs = []
    with caplog.at_level(logging.INFO, logger="keras_ntk"):
        for _ in range(2):
            model = _lstm()
            for _ in range(2):
                with _jacobians.unrolled(model):
                    pass
            refs.append(weakref.ref(model))
            del model
            gc.collect()
    lines = [r for r in caplog.records if "unrolled over time" in r.getMessage()]
    assert len(lines) == 2
    assert all(ref() is None for ref in refs)
    assert len(_jacobians._LOGGED) == before


def test_tape_jacobian_equals_tape_jacobian_and_head_cotangents_stay_unfolded_under_xla():
    # The cotangents of a model's head are constants (identity rows per example). Seeded
    # with a constant identity, as `tape.jacobian` does, XLA constant-folds their Gram at
    # compile time with its slow evaluator (15-45 s for one 2048-example block of a
    # 10-output MLP); our seed sits behind an optimization barrier, so the optimized
    # program still computes the Gram (a dot) instead of holding it as a folded literal.
    import numpy as np
    import tensorflow as tf
    import keras

    from keras_ntk._jacobians import tape_jacobian

    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
                              keras.layers.Dense(4)])
    x = tf.constant(np.random.default_rng(0).normal(size=(64, 5)).astype("float32"))

    def jacobians(jacobian, jit):
        @tf.function(jit_compile=jit)
        def head_and_weights(x):
            with tf.GradientTape(persistent=True) as tape:
                y = model(x)
                tape.watch(y)
                sums = tf.reshape(tf.reduce_sum(y, 0), [-1])
            return jacobian(tape, sums, [y] + model.trainable_variables)

        @tf.function(jit_compile=True)
        def head_gram(x):
            g = tf.reshape(tf.transpose(head_and_weights.python_function(x)[0], [1, 0, 2]),
                           [64, -1])
            return tf.matmul(g, g, transpose_b=True)

        return head_and_weights(x), head_gram.experimental_get_compiler_ir(x)(
            stage="optimized_hlo")

    reference, folded = jacobians(lambda tape, y, s: tape.jacobian(y, s), jit=False)
    for jit in (False, True):
        ours, hlo = jacobians(tape_jacobian, jit)
        for a, b in zip(ours, reference):  # XLA fuses differently: float32 rounding
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0 if not jit else 1e-5,
                                       atol=0 if not jit else 1e-5)
    assert " dot(" not in folded  # the control: tape.jacobian's Gram is folded away
    assert " dot(" in hlo


def test_tape_jacobian_with_an_unknown_source_dimension_and_a_2d_target():
    # Traced with an unknown batch size: the source's shape is only partly known, which
    # a static reshape of the result cannot express; and a 2-D target keeps its shape.
    import numpy as np
    import tensorflow as tf

    from keras_ntk._jacobians import tape_jacobian

    w = tf.Variable(np.random.default_rng(0).normal(size=(3, 2)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 3])])
    def jacobians(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = tf.matmul(x, w)
            flat = tf.reduce_sum(y, 0)
            square = flat[None] * tf.ones([3, 1])
        return (tape_jacobian(tape, flat, [x, w]) + tape_jacobian(tape, square, [w]),
                tape.jacobian(flat, [x, w]) + tape.jacobian(square, [w]))

    ours, reference = jacobians(tf.ones([4, 3]))
    assert [tuple(j.shape) for j in ours] == [(2, 4, 3), (2, 3, 2), (3, 2, 3, 2)]
    for a, b in zip(ours, reference):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
