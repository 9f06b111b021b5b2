"""Tests of `keras_ntk.empirical_ntk` and `keras_ntk.ntk_vector_product` (keras_ntk/ntk.py).

Every kernel is checked against the naive float64 `GradientTape.jacobian` kernel of
tests/ntk_reference.py. The implementations' own modules are tested in
test_structured.py and test_jacobians.py, blocks and compiled functions in
test_batching.py, the budget and `auto` in test_costs.py, the output-axis conventions
in test_output_axes.py and the empirical NNGP in test_nngp.py.
"""

import keras
import numpy as np
import pytest

import keras_ntk
from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    assert_close, assert_matches_naive_jacobian, cnn, inputs_for, mlp, model_cases,
    naive_subset_kernel, plain_graphs, reference, rel_error, slow_unless, two_outputs)

pytestmark = pytest.mark.usefixtures("plain_graphs")


# ----------------------------------------------------------------- correctness


@pytest.mark.parametrize("name", model_cases("ntvp"))
def test_ntvp_implementation_matches_naive_jacobian(name):
    assert_matches_naive_jacobian(name, "ntvp")


def test_x2_none_equals_x2_x1_and_is_symmetric_psd():
    model = mlp()
    x = inputs_for("mlp", 8)
    k_none = keras_ntk.empirical_ntk(model, x, batch_size=4)
    k_same = keras_ntk.empirical_ntk(model, x, x, batch_size=4)
    np.testing.assert_allclose(k_none, k_same, rtol=1e-5, atol=1e-6 * np.abs(k_same).max())
    np.testing.assert_array_equal(k_none, k_none.T)  # mirrored blocks are exact
    eigenvalues = np.linalg.eigvalsh(k_none.astype(np.float64))
    assert eigenvalues.min() > -1e-5 * eigenvalues.max()
    assert_close(k_none, reference(model, x))


def test_float64_result():
    model = two_outputs()
    x = inputs_for("two_outputs", 5)
    kernels = keras_ntk.empirical_ntk(model, x, dtype="float64")
    assert all(k.dtype == np.float64 for k in kernels)
    assert_close(kernels, reference(model, x))
    float32 = keras_ntk.empirical_ntk(model, x)
    assert all(k.dtype == np.float32 for k in float32)


def test_float64_model_is_exact_to_float64_precision():
    keras.config.set_floatx("float64")
    try:
        model = mlp()
    finally:
        keras.config.set_floatx("float32")
    x = inputs_for("mlp", 6).astype("float64")
    for implementation in ("structured", "jacobian"):
        k = keras_ntk.empirical_ntk(model, x, trace_axes=(), implementation=implementation)
        assert k.dtype == np.float64
        assert_close(k, reference(model, x, None, trace_axes=()), rtol=1e-10)


@pytest.mark.parametrize("implementation", ["ntvp", "structured", "jacobian"])
def test_layers_computing_in_float64_inside_a_float32_model(implementation):
    """Layers made with dtype="float64" in a model whose own dtype is float32: "ntvp"
    seeded its products in the model's dtype (a TypeError in MatMul) and
    `ntk_vector_product` cast its tangents to it (a ValueError)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(4, activation="tanh", dtype="float64"),
        keras.layers.Dense(2, dtype="float64")])
    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(6, 5)), rng.normal(size=(6, 3))
    expected = reference(model, x)
    kernel = keras_ntk.empirical_ntk(model, x, implementation=implementation, dtype="float64")
    assert_close(kernel, expected, rtol=1e-10)
    product = keras_ntk.ntk_vector_product(model, x, None, v, implementation=implementation)
    assert_close(product, expected @ v, rtol=1e-5)


VECTOR_CASES = [((-1,), (), (4,)), ((), (), (4, 3, 2)), ((), (-1,), (4, 3))]


@pytest.mark.parametrize(
    "implementation,trace_axes,diagonal_axes,v_shape",
    [slow_unless((i == "ntvp" and c[0] == () and c[1]) or (i == "structured" and c[0] == ()
                                                          and not c[1]), i, *c)
     for i in ("ntvp", "structured") for c in VECTOR_CASES],
)
def test_ntk_vector_product_equals_kernel_times_vector(implementation, trace_axes,
                                                       diagonal_axes, v_shape):
    model = mlp()
    x1, x2 = inputs_for("mlp", 6), inputs_for("mlp", 4, seed=1)
    v = np.random.default_rng(2).normal(size=v_shape)
    kernel = reference(model, x1, x2, trace_axes, diagonal_axes)
    spec = {(4,): "nm,m->n", (4, 3, 2): "nmab,mbz->naz", (4, 3): "nma,ma->na"}[v_shape]
    expected = np.einsum(spec, kernel, v)
    actual = keras_ntk.ntk_vector_product(
        model, x1, x2, v, trace_axes=trace_axes, diagonal_axes=diagonal_axes,
        implementation=implementation, batch_size=3)
    assert actual.shape == expected.shape
    assert_close(actual, expected)


# ----------------------------------------------------------------- options


def test_training_true_with_batchnorm_refuses_blocks_and_uses_whole_batches():
    model = cnn()
    x = inputs_for("cnn", 6)
    with pytest.raises(ValueError, match="training=True"):
        keras_ntk.empirical_ntk(model, x, training=True, batch_size=3)
    stats = [w.numpy().copy() for w in model.non_trainable_weights]
    expected = reference(model, x, training=True)
    for w, value in zip(model.non_trainable_weights, stats):
        w.assign(value)  # the reference's training-mode calls moved the statistics
    actual = keras_ntk.empirical_ntk(model, x, training=True, implementation="structured")
    assert_close(actual, expected)
    for w, value in zip(model.non_trainable_weights, stats):
        np.testing.assert_array_equal(w.numpy(), value)  # statistics left as they were
    # Not the same kernel as inference mode: the examples are coupled.
    assert rel_error(actual, reference(model, x)) > 1e-2


def test_invalid_arguments_name_what_was_received():
    model = mlp()
    x = inputs_for("mlp", 4)
    with pytest.raises(ValueError, match="Received: implementation=fast"):
        keras_ntk.empirical_ntk(model, x, implementation="fast")
    with pytest.raises(ValueError, match="Received: trace_axes"):
        keras_ntk.empirical_ntk(model, x, trace_axes=(0,))
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        keras_ntk.empirical_ntk(model, x, batch_size=0)
    with pytest.raises(ValueError, match="Received: v.shape"):
        keras_ntk.ntk_vector_product(model, x, None, np.ones(5))


@pytest.mark.parametrize(
    "implementation", ["structured", pytest.param("jacobian", marks=pytest.mark.slow)])
def test_linearize_wrapper_has_the_kernel_of_the_model_at_theta0(implementation):
    model = cnn()
    x1, x2 = inputs_for("cnn", 4), inputs_for("cnn", 3, seed=1)
    expected = reference(model, x1, x2, trace_axes=())
    linearized = keras_ntk.Linearize(model)
    linearized(x1)
    # Move δ away from 0: the kernel of a model linear in δ does not depend on δ.
    rng = np.random.default_rng(3)
    for delta in linearized.trainable_weights:
        delta.assign(0.3 * rng.normal(size=delta.shape))
    actual = keras_ntk.empirical_ntk(linearized, x1, x2, trace_axes=(),
                                     implementation=implementation)
    assert_close(actual, expected)


# ----------------------------------------------------------------- subsets and per-layer split


@pytest.mark.parametrize("implementation", ["structured", "jacobian",
                                            pytest.param("ntvp", marks=pytest.mark.slow)])
def test_variables_subset_matches_naive_jacobian_over_the_subset(implementation):
    model = cnn()
    x1, x2 = inputs_for("cnn", 5), inputs_for("cnn", 3, seed=1)
    model(x1)
    head = model.layers[-1]
    first_conv = model.layers[0]
    # The last layer alone (a linear probe): Θ = J_head J_headᵀ.
    expected = naive_subset_kernel(model, head.trainable_weights, x1, x2, trace_axes=())
    actual = keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(), variables=[head.name],
                                     implementation=implementation)
    assert_close(actual, expected)
    # A kernel without its bias (no structured rule applies to half a layer) plus
    # BatchNorm's gamma, named by variable objects.
    bn = model.layers[1]
    subset = [first_conv.kernel, bn.gamma]
    expected = naive_subset_kernel(model, subset, x1, x2)
    actual = keras_ntk.empirical_ntk(model, x1, x2, variables=subset,
                                     implementation=implementation)
    assert_close(actual, expected)
    # The subset kernel differs from the full one (the test can fail).
    assert rel_error(actual, reference(model, x1, x2)) > 0.01


@pytest.mark.parametrize("implementation", ["structured", "jacobian",
                                            pytest.param("ntvp", marks=pytest.mark.slow)])
def test_per_layer_pieces_match_naive_per_layer_kernels_and_sum_to_the_kernel(implementation):
    model = cnn()
    x1 = inputs_for("cnn", 5)
    model(x1)
    parts = keras_ntk.empirical_ntk(model, x1, per_layer=True, implementation=implementation,
                                    batch_size=2)
    layers_with_weights = [layer for layer in model.layers if layer.trainable_weights]
    assert list(parts) == [layer.name for layer in layers_with_weights]
    for layer in layers_with_weights:
        expected = naive_subset_kernel(model, layer.trainable_weights, x1)
        assert_close(parts[layer.name], expected)
    assert_close(sum(parts.values()), reference(model, x1))


def test_per_layer_with_x2_subset_and_several_outputs():
    model = two_outputs()
    x1, x2 = inputs_for("two_outputs", 4), inputs_for("two_outputs", 3, seed=1)
    model(x1)
    parts = keras_ntk.empirical_ntk(model, x1, x2, per_layer=True, trace_axes=(),
                                    variables=["first", "second", model.layers[1]])
    assert list(parts) == [model.layers[1].name, "first", "second"]
    for name, kernels in parts.items():
        layer = model.get_layer(name)
        expected = naive_subset_kernel(model, layer.trainable_weights, x1, x2, trace_axes=())
        assert isinstance(kernels, list) and len(kernels) == 2
        for actual, reference_k in zip(kernels, expected):
            assert actual.shape == reference_k.shape
            if np.linalg.norm(reference_k) == 0:
                # Each head reaches only its own output: exact zero blocks.
                assert name in ("first", "second") and np.all(actual == 0)
            else:
                assert_close(actual, reference_k)


def test_ntk_vector_product_with_variables():
    model = mlp()
    x = inputs_for("mlp", 6)
    model(x)
    v = np.random.default_rng(0).normal(size=(6, 2))
    head = model.layers[-1]
    expected = naive_subset_kernel(model, head.trainable_weights, x) @ v
    for implementation in ("structured", "ntvp"):
        actual = keras_ntk.ntk_vector_product(model, x, None, v, variables=[head],
                                              implementation=implementation)
        assert_close(actual, expected)


def test_variables_errors_name_what_was_received():
    model = mlp()
    x = inputs_for("mlp", 3)
    model(x)
    with pytest.raises(ValueError, match="Received: variables item='missing'"):
        keras_ntk.empirical_ntk(model, x, variables=["missing"])
    with pytest.raises(ValueError, match="Received: variables=\\[\\]"):
        keras_ntk.empirical_ntk(model, x, variables=[])
