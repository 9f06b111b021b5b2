"""Tests of `keras_ntk.empirical_ntk` and `keras_ntk.ntk_vector_product`.

Every kernel is checked against an independent naive reference: the explicit
Jacobian of the whole batch from `tf.GradientTape.jacobian`, contracted over
the weights in float64 with numpy, with the trace/diagonal conventions of
neural-tangents applied by `numpy.einsum` on the full (N1, *S, N2, *S) kernel.
"""

import string

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from keras_ntk import _batching
from keras_ntk import ntk as ntk_module

RTOL = 1e-4
IMPLEMENTATIONS = ("structured", "jacobian", "ntvp")


@pytest.fixture(autouse=True)
def _plain_graphs(monkeypatch):
    """Plain tf.function graphs: XLA compilation of every tiny test model would take
    most of this file's time budget; `test_xla_path_matches_plain_graphs` covers XLA."""
    monkeypatch.setattr(_batching, "_JIT", "0")


# ----------------------------------------------------------------- reference


def naive_full_kernel(model, x1, x2=None, training=False):
    """Full kernels (N1, *S, N2, *S) per output, float64, from whole-batch Jacobians."""

    def jacobians(x):
        with tf.GradientTape(persistent=True) as tape:
            ys = tf.nest.flatten(model(x, training=training))
        out = []
        for y in ys:
            jac = tape.jacobian(y, model.trainable_weights)
            jac = [np.zeros((*y.shape, *w.shape)) if j is None else j
                   for j, w in zip(jac, model.trainable_weights)]
            flat = [np.reshape(np.asarray(j, np.float64), (*y.shape, -1)) for j in jac]
            out.append(np.concatenate(flat, -1))
        return out

    j1 = jacobians(x1)
    j2 = j1 if x2 is None else jacobians(x2)
    return [np.tensordot(a, b, axes=([a.ndim - 1], [b.ndim - 1])) for a, b in zip(j1, j2)]


def reduce_reference(full, trace_axes, diagonal_axes):
    """neural-tangents conventions written out independently with numpy.einsum."""
    ndim = (full.ndim - 2) // 2  # output axes per side
    norm = lambda axes: {a % (ndim + 1) for a in axes} - {0}  # noqa: E731
    trace, diag = norm(trace_axes), norm(diagonal_axes)
    lower, upper = string.ascii_lowercase[:ndim], string.ascii_uppercase[:ndim]
    side1, side2, out, size = "", "", "", 1
    for i in range(ndim):
        side1 += lower[i]
        if i + 1 in trace:
            side2 += lower[i]
            size *= full.shape[1 + i]
        elif i + 1 in diag:
            side2 += lower[i]
            out += lower[i]
        else:
            side2 += upper[i]
            out += lower[i] + upper[i]
    return np.einsum(f"y{side1}z{side2}->yz{out}", full) / size


def reference(model, x1, x2=None, trace_axes=(-1,), diagonal_axes=(), training=False):
    fulls = naive_full_kernel(model, x1, x2, training)
    kernels = [reduce_reference(f, trace_axes, diagonal_axes) for f in fulls]
    return kernels[0] if len(kernels) == 1 else kernels


def rel_error(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def assert_close(actual, expected, rtol=RTOL):
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_close(a, e, rtol)
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert rel_error(actual, expected) < rtol, rel_error(actual, expected)


# ----------------------------------------------------------------- models


def mlp(outputs=3):
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(12, activation="tanh"),
        keras.layers.Dense(10, activation="relu"),
        keras.layers.Dense(outputs),
    ])


def randomize_batchnorm(model):
    """Non-trivial BatchNorm statistics so inference mode is not the identity."""
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(size=c) * 0.3)
            layer.moving_mean.assign(rng.normal(size=c) * 0.3)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
    return model


def cnn():
    return randomize_batchnorm(keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Conv2D(3, 2, padding="valid", activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ]))


def conv_map():
    """A fully convolutional model with a (N, 4, 4, 2) output (strided conv)."""
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(2, 3, padding="same"),
    ])


def two_outputs():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    first = keras.layers.Dense(3, name="first")(h)
    g = keras.layers.Dense(6, activation="relu")(inputs)
    second = keras.layers.Dense(2, name="second")(keras.layers.Concatenate()([h, g]))
    return keras.Model(inputs, [first, second])


def text_model():
    return keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(20, 4),
        keras.layers.Dense(6, activation="tanh"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2),
    ])


class Residual(keras.Model):
    """A subclassed model: shared Dense layer, LayerNorm and a residual branch."""

    def __init__(self):
        super().__init__()
        self.inner = keras.layers.Dense(6, activation="tanh")
        self.norm = keras.layers.LayerNormalization()
        self.head = keras.layers.Dense(2)

    def call(self, x):
        h = self.inner(x)
        h = h + self.inner(h * 0.5 + x[:, :1])
        return self.head(self.norm(h))


def inputs_for(name, n, seed=0):
    rng = np.random.default_rng(seed)
    if name == "cnn":
        return rng.normal(size=(n, 6, 6, 2)).astype("float32")
    if name == "conv_map":
        return rng.normal(size=(n, 8, 8, 1)).astype("float32")
    if name == "text":
        return rng.integers(0, 20, size=(n, 5)).astype("int32")
    if name == "two_outputs":
        return rng.normal(size=(n, 4)).astype("float32")
    if name == "residual":
        return rng.normal(size=(n, 6)).astype("float32")
    return rng.normal(size=(n, 5)).astype("float32")


MODELS = {
    "mlp": mlp, "cnn": cnn, "two_outputs": two_outputs, "text": text_model,
    "residual": Residual,
}


# ----------------------------------------------------------------- correctness


def slow_unless(fast, *values):
    """A parameter set marked slow unless it is among the `fast` ones (time budget)."""
    return pytest.param(*values, marks=() if fast else pytest.mark.slow)


FAST_PAIRS = {
    ("mlp", "structured"), ("cnn", "structured"), ("two_outputs", "structured"),
    ("text", "structured"), ("residual", "structured"), ("cnn", "jacobian"),
    ("text", "jacobian"), ("two_outputs", "jacobian"), ("mlp", "ntvp"),
}


@pytest.mark.parametrize(
    "name,implementation",
    [slow_unless((n, i) in FAST_PAIRS, n, i) for n in sorted(MODELS) for i in IMPLEMENTATIONS],
)
def test_every_implementation_matches_naive_jacobian(name, implementation):
    model = MODELS[name]()
    x1, x2 = inputs_for(name, 6), inputs_for(name, 4, seed=1)
    model(x1)
    expected = reference(model, x1, x2)
    actual = keras_ntk.empirical_ntk(model, x1, x2, implementation=implementation)
    assert_close(actual, expected)


AXES_CASES = [((), (), (6, 6, 3, 3)), ((), (-1,), (6, 6, 3)), ((1,), (), (6, 6))]


@pytest.mark.parametrize(
    "implementation,trace_axes,diagonal_axes,shape",
    [slow_unless(i == "structured" or (i == "jacobian" and c[1]) or (i == "ntvp" and c[0] == ()
                                                                    and not c[1]), i, *c)
     for i in IMPLEMENTATIONS for c in AXES_CASES],
)
def test_output_axis_conventions_on_mlp(implementation, trace_axes, diagonal_axes, shape):
    model = mlp()
    x = inputs_for("mlp", 6)
    expected = reference(model, x, None, trace_axes, diagonal_axes)
    actual = keras_ntk.empirical_ntk(model, x, trace_axes=trace_axes,
                                     diagonal_axes=diagonal_axes,
                                     implementation=implementation)
    assert actual.shape == shape
    assert_close(actual, expected)


@pytest.mark.parametrize(
    "implementation", [slow_unless(i != "jacobian", i) for i in IMPLEMENTATIONS])
def test_spatial_output_with_trace_and_diagonal_axes(implementation):
    # Output (N, 4, 4, 2): channels traced, rows diagonal, columns paired.
    model = conv_map()
    x1, x2 = inputs_for("conv_map", 3), inputs_for("conv_map", 2, seed=1)
    expected = reference(model, x1, x2, trace_axes=(3,), diagonal_axes=(1,))
    actual = keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(3,), diagonal_axes=(1,),
                                     implementation=implementation)
    assert actual.shape == (3, 2, 4, 4, 4)
    assert_close(actual, expected)


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


@pytest.mark.parametrize(
    "implementation", [slow_unless(i == "structured", i) for i in IMPLEMENTATIONS])
def test_blocks_with_n_not_divisible_by_batch_size(implementation):
    model = mlp()
    x1, x2 = inputs_for("mlp", 11), inputs_for("mlp", 7, seed=1)
    assert_close(
        keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(), batch_size=4,
                                implementation=implementation),
        reference(model, x1, x2, trace_axes=()),
    )
    # x2=None: the mirrored blocks must swap the paired output axes as well.
    assert_close(
        keras_ntk.empirical_ntk(model, x1, trace_axes=(), batch_size=4,
                                implementation=implementation),
        reference(model, x1, None, trace_axes=()),
    )


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


# ----------------------------------------------------------------- memory, blocks, options


def test_memory_budget_error_is_raised_before_any_work(monkeypatch):
    model = mlp()
    x = inputs_for("mlp", 64)
    ran = []
    monkeypatch.setattr(ntk_module, "run_tasks", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"memory budget.*above the budget of 1000 B"):
        keras_ntk.empirical_ntk(model, x, memory_budget=1000)
    assert not ran
    # An explicit block that is too large for the budget is refused as well.
    with pytest.raises(ValueError, match="budget"):
        keras_ntk.empirical_ntk(model, x, batch_size=64, memory_budget=20_000)
    assert not ran


def test_memory_budget_picks_blocks_and_stays_exact():
    model = mlp()
    x = inputs_for("mlp", 40)
    setup = ntk_module.kernel_setup(model, x, None, (-1,), (), "auto", None, 60_000, False, None)
    assert setup.block < 40  # the budget forced blocks
    assert_close(keras_ntk.empirical_ntk(model, x, memory_budget=60_000), reference(model, x))


def test_auto_picks_structured_for_dense_models_and_jacobian_otherwise():
    model = mlp()
    x = inputs_for("mlp", 8)
    assert ntk_module.kernel_setup(model, x, None, (-1,), (), "auto", None, None, False,
                                   None).implementation == "structured"
    no_rules = keras.Sequential([keras.Input((5,)), keras.layers.LayerNormalization(),
                                 keras.layers.EinsumDense("ab,bc->ac", output_shape=2)])
    assert ntk_module.kernel_setup(no_rules, x, None, (-1,), (), "auto", None, None, False,
                                   None).implementation == "jacobian"
    assert_close(keras_ntk.empirical_ntk(no_rules, x), reference(no_rules, x))


def test_repeated_calls_do_not_retrace():
    model = mlp()
    x = inputs_for("mlp", 8)
    first = keras_ntk.empirical_ntk(model, x, implementation="structured")
    functions = [f for f in _batching._COMPILED[model].values()
                 if isinstance(f, _batching._JitFallback)]
    cache = dict(_batching._COMPILED[model])
    counts = [f._plain.experimental_get_tracing_count()
              + (f._xla.experimental_get_tracing_count() if f._xla is not None else 0)
              for f in functions]
    model.layers[0].kernel.assign(model.layers[0].kernel * 1.5)
    second = keras_ntk.empirical_ntk(model, x, implementation="structured")
    again = [f._plain.experimental_get_tracing_count()
             + (f._xla.experimental_get_tracing_count() if f._xla is not None else 0)
             for f in functions]
    assert again == counts and len(_batching._COMPILED[model]) == len(cache)
    # The cached function reads the current weights, not the traced ones.
    assert rel_error(second, first) > 1e-2
    assert_close(second, reference(model, x))


def test_progbar_over_blocks(capsys):
    model = mlp()
    x = inputs_for("mlp", 9)
    kernel = keras_ntk.empirical_ntk(model, x, batch_size=3, verbose=1)
    assert "6/6" in capsys.readouterr().out  # 3 diagonal + 3 upper blocks
    assert_close(kernel, reference(model, x))


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


def test_mirrored_strategy_equals_single_device(mirrored_strategy):
    assert mirrored_strategy.num_replicas_in_sync == 2
    strategy = mirrored_strategy
    with strategy.scope():
        model = mlp()
    x = inputs_for("mlp", 9)
    single = keras_ntk.empirical_ntk(model, x, batch_size=3)
    with strategy.scope():
        # 6 blocks (3 on the diagonal) over 2 replicas.
        mirrored = keras_ntk.empirical_ntk(model, x, batch_size=3)
    np.testing.assert_allclose(mirrored, single, rtol=1e-5, atol=1e-6 * np.abs(single).max())
    assert_close(mirrored, reference(model, x))


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


def test_xla_path_matches_plain_graphs(monkeypatch):
    model = cnn()
    x1, x2 = inputs_for("cnn", 5), inputs_for("cnn", 3, seed=1)
    expected = reference(model, x1, x2, trace_axes=())
    monkeypatch.setattr(_batching, "_JIT", "1")  # XLA errors are raised, not hidden
    for implementation in ("structured", "jacobian"):
        actual = keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(),
                                         implementation=implementation)
        assert_close(actual, expected)
    functions = [f for f in _batching._COMPILED[model].values()
                 if isinstance(f, _batching._JitFallback)]
    assert functions and all(f._xla is not None for f in functions)


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


def naive_subset_kernel(model, weights, x1, x2=None, trace_axes=(-1,)):
    """float64 reference over a subset of weights from whole-batch GradientTape Jacobians."""

    def jacobians(x):
        with tf.GradientTape(persistent=True) as tape:
            ys = tf.nest.flatten(model(x, training=False))
        out = []
        for y in ys:
            jac = tape.jacobian(y, weights)
            jac = [np.zeros((*y.shape, *w.shape)) if j is None else j
                   for j, w in zip(jac, weights)]
            flat = [np.reshape(np.asarray(j, np.float64), (*y.shape, -1)) for j in jac]
            out.append(np.concatenate(flat, -1))
        return out

    j1 = jacobians(x1)
    j2 = j1 if x2 is None else jacobians(x2)
    kernels = [reduce_reference(np.tensordot(a, b, axes=([a.ndim - 1], [b.ndim - 1])),
                                trace_axes, ()) for a, b in zip(j1, j2)]
    return kernels[0] if len(kernels) == 1 else kernels


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


# ----------------------------------------------------------------- empirical NNGP


def test_empirical_nngp_of_penultimate_and_named_layers_matches_explicit_features():
    model = mlp()
    x1, x2 = inputs_for("mlp", 6), inputs_for("mlp", 4, seed=1)
    model(x1)
    first, second = model.layers[0], model.layers[1]

    def explicit(x):  # the two hidden layers written out in numpy (float64)
        w1, b1 = (np.asarray(v, np.float64) for v in first.weights)
        w2, b2 = (np.asarray(v, np.float64) for v in second.weights)
        h1 = np.tanh(x.astype(np.float64) @ w1 + b1)
        return h1, np.maximum(h1 @ w2 + b2, 0)

    (h1_a, h2_a), (h1_b, h2_b) = explicit(x1), explicit(x2)
    # Penultimate features (width 10): averaged over the feature axis.
    np.testing.assert_allclose(keras_ntk.empirical_nngp(model, x1, x2, batch_size=4),
                               h2_a @ h2_b.T / 10, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras_ntk.empirical_nngp(model, x1),
                               h2_a @ h2_a.T / 10, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras_ntk.empirical_nngp(model, x1, layer=first.name),
                               h1_a @ h1_a.T / 12, rtol=1e-5, atol=1e-7)
    # A callable (how a subclassed model names its features), trace_axes=().
    got = keras_ntk.empirical_nngp(model, x1, x2, layer=lambda x: first(x), trace_axes=())
    np.testing.assert_allclose(got, np.einsum("ni,mj->nmij", h1_a, h1_b), rtol=1e-5, atol=1e-6)


def test_empirical_nngp_of_a_feature_map_conventions():
    model = conv_map()
    x = inputs_for("conv_map", 3)
    phi = np.asarray(model.layers[0](x), np.float64)  # (3, 4, 4, 3)
    got = keras_ntk.empirical_nngp(model, x)
    assert got.shape == (3, 3, 4, 4, 4, 4)
    np.testing.assert_allclose(got, np.einsum("nhwc,mHWc->nmhHwW", phi, phi) / 3,
                               rtol=1e-5, atol=1e-7)
    got = keras_ntk.empirical_nngp(model, x, trace_axes=(1, 2, 3))
    np.testing.assert_allclose(got, np.einsum("nhwc,mhwc->nm", phi, phi) / 48,
                               rtol=1e-5, atol=1e-7)


def test_empirical_nngp_errors():
    model = Residual()
    x = inputs_for("residual", 3)
    model(x)
    with pytest.raises(ValueError, match="callable.*Received"):
        keras_ntk.empirical_nngp(model, x)
    with pytest.raises(ValueError, match="Received: layer='nope'"):
        keras_ntk.empirical_nngp(mlp(), inputs_for("mlp", 3), layer="nope")
