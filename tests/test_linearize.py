"""Tests of `keras_ntk.Linearize` against independent references.

References: the wrapped model itself (δ = 0), explicit Jacobians from
`tf.GradientTape.jacobian` contracted with δ, finite differences of the
nonlinear model in float64, and the closed-form minimum-norm least-squares
solution of the linear model.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk


# ----------------------------------------------------------------- models


def mlp(input_dim=6, outputs=3, dtype=None):
    return keras.Sequential(
        [
            keras.Input((input_dim,), dtype=dtype),
            keras.layers.Dense(16, activation="tanh", dtype=dtype),
            keras.layers.Dense(16, activation="relu", dtype=dtype),
            keras.layers.Dense(outputs, dtype=dtype),
        ]
    )


def cnn_with_batchnorm_and_dropout(dtype=None):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2), dtype=dtype),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu", dtype=dtype),
            keras.layers.BatchNormalization(dtype=dtype),
            keras.layers.AveragePooling2D(2, dtype=dtype),
            keras.layers.Dropout(0.5, dtype=dtype),
            keras.layers.Flatten(dtype=dtype),
            keras.layers.Dense(2, dtype=dtype),
        ]
    )
    # Non-trivial moving statistics, so inference mode is distinguishable.
    bn = model.layers[1]
    bn.moving_mean.assign(np.random.randn(4) * 0.3)
    bn.moving_variance.assign(np.random.rand(4) + 0.5)
    return model


def resizing_cnn(dtype=None):
    """Bilinear upsampling (whose derivative TensorFlow's forward mode silently dropped:
    J·δ was 18 % off) and a bicubic Resizing, after and before trainable layers."""
    return keras.Sequential([
        keras.Input((4, 4, 2), dtype=dtype),
        keras.layers.Conv2D(3, 3, padding="same", activation="tanh", dtype=dtype),
        keras.layers.UpSampling2D(interpolation="bilinear", dtype=dtype),
        keras.layers.Conv2D(2, 1, dtype=dtype),
        keras.layers.Resizing(5, 6, interpolation="bicubic", dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ])


def two_output_functional():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="gelu")(inputs)
    first = keras.layers.Dense(2, name="first")(hidden)
    second = keras.layers.Dense(1, name="second")(keras.layers.LayerNormalization()(hidden))
    return keras.Model(inputs, {"first": first, "second": second})


class Subclassed(keras.Model):
    """A subclassed model with no `build()` and a `call()` without `training`."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="softplus")
        self.out = keras.layers.Dense(2)

    def call(self, inputs):
        return self.out(self.hidden(inputs) * 2.0)


def random_deltas(layer, scale=0.1, seed=1):
    rng = np.random.default_rng(seed)
    for delta in layer.deltas:
        delta.assign(scale * rng.standard_normal(delta.shape).astype(delta.dtype))
    return [np.asarray(d.value, dtype=np.float64) for d in layer.deltas]


def reference_jvp(model, x, deltas, use_pfor=False):
    """Σ_w ∂f/∂w · δ_w from explicit per-weight Jacobians, summed in float64.

    The while-loop Jacobian (no pfor) is the default. Weights an output does
    not depend on give None (TF's jacobian fails with unconnected ZERO): zeros.
    """
    weights = model.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x, training=False)
    flat = tf.nest.flatten(outputs)
    result = []
    for y in flat:
        jacobians = tape.jacobian(y, weights, experimental_use_pfor=use_pfor)
        total = np.zeros(tuple(y.shape), np.float64)
        for jac, delta in zip(jacobians, deltas):
            if jac is None:
                continue
            jac = np.asarray(jac, np.float64).reshape(tuple(y.shape) + (-1,))
            total += jac @ delta.reshape(-1)
        result.append(total)
    return result


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


CASES = {
    "mlp": (mlp, (4, 6)),
    "cnn_bn_dropout": (cnn_with_batchnorm_and_dropout, (3, 8, 8, 2)),
    "functional_two_outputs": (two_output_functional, (4, 5)),
    "subclassed": (Subclassed, (4, 5)),
    "resizing": (resizing_cnn, (3, 4, 4, 2)),
}


# ------------------------------------------------------------- the function


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_model_in_inference_mode_at_zero_offsets(case):
    build, shape = CASES[case]
    model = build()
    x = np.random.randn(*shape).astype("float32")
    linear = keras_ntk.Linearize(model)
    expected = model(x, training=False)
    actual = linear(x)
    tf.nest.assert_same_structure(expected, actual)
    for a, e in zip(tf.nest.flatten(actual), tf.nest.flatten(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jvp_matches_explicit_jacobian(case):
    build, shape = CASES[case]
    model = build()
    x = np.random.randn(*shape).astype("float32")
    linear = keras_ntk.Linearize(model, mode="difference")
    linear(x)
    deltas = random_deltas(linear)
    actual = tf.nest.flatten(linear(x))
    expected = reference_jvp(model, x, deltas)
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-5
    # The full mode adds f(x; θ0).
    full = keras_ntk.Linearize(model, mode="full")
    full(x)
    for d, v in zip(full.deltas, deltas):
        d.assign(v.astype(d.dtype))
    f0 = tf.nest.flatten(model(x, training=False))
    for a, e, y0 in zip(tf.nest.flatten(full(x)), expected, f0):
        assert relative_error(a, e + np.asarray(y0, np.float64)) < 1e-5


@pytest.mark.parametrize("case", ["mlp", "cnn_bn_dropout"])
def test_taylor_remainder_is_second_order(case):
    """f(θ0+εδ) − f(θ0) − ε·J·δ = O(ε²), checked in float64."""
    build, shape = CASES[case]
    model = build(dtype="float64")
    x = np.random.randn(*shape)
    linear = keras_ntk.Linearize(model, mode="difference", dtype="float64")
    linear(x)
    deltas = random_deltas(linear, scale=1.0)
    jvp = np.asarray(linear(x))
    f0 = np.asarray(model(x, training=False))
    theta0 = [np.asarray(w.value) for w in model.trainable_weights]
    remainders = []
    for eps in (1e-2, 5e-3):
        for w, t, d in zip(model.trainable_weights, theta0, deltas):
            w.assign(t + eps * d)
        f_eps = np.asarray(model(x, training=False))
        remainders.append(np.linalg.norm(f_eps - f0 - eps * jvp))
    for w, t in zip(model.trainable_weights, theta0):
        w.assign(t)
    # Halving ε divides a second-order remainder by 4.
    ratio = remainders[0] / remainders[1]
    assert 3.5 < ratio < 4.5, remainders
    # ... and it is small next to the first-order term ε·J·δ.
    assert remainders[0] < 0.1 * 1e-2 * np.linalg.norm(jvp)


def test_mobilenet_v2():
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=2
    )
    x = np.random.rand(2, 32, 32, 3).astype("float32")
    linear = keras_ntk.Linearize(model)
    np.testing.assert_allclose(linear(x), model(x, training=False), rtol=1e-6, atol=1e-7)
    linear = keras_ntk.Linearize(model, mode="difference")
    linear(x)
    deltas = random_deltas(linear, scale=1e-2)
    (expected,) = reference_jvp(model, x, deltas, use_pfor=True)
    assert relative_error(linear(x), expected) < 1e-4


def test_multi_input_nested_structure():
    a = keras.Input((3,), name="a")
    b = keras.Input((4,), name="b")
    joined = keras.layers.Concatenate()([keras.layers.Dense(5)(a), b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(joined))
    x = {"a": np.random.randn(3, 3).astype("float32"), "b": np.random.randn(3, 4).astype("float32")}
    linear = keras_ntk.Linearize(model, mode="difference")
    linear(x)
    deltas = random_deltas(linear)
    (expected,) = reference_jvp(model, x, deltas)
    assert relative_error(linear(x), expected) < 1e-5


def test_embedding_model_with_integer_inputs():
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(11, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    x = np.random.randint(0, 11, size=(3, 5)).astype("int32")
    linear = keras_ntk.Linearize(model, mode="difference")
    linear(x)
    deltas = random_deltas(linear)
    (expected,) = reference_jvp(model, x, deltas)
    assert relative_error(linear(x), expected) < 1e-5
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(linear(x) ** 2)
    grads = tape.gradient(loss, linear.trainable_weights)
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("jvp_method", ["forward", "double_vjp"])
def test_resizing_layers_have_their_derivatives_in_both_jvp_methods(jvp_method):
    """Both ways of J·δ differentiate TensorFlow's resize gradient, which it marks not
    differentiable (bilinear: the tangent silently dropped; bicubic: an error); the
    layers are traced through matrix products instead, and left as they were."""
    model = resizing_cnn()
    x = np.random.randn(3, 4, 4, 2).astype("float32")
    linear = keras_ntk.Linearize(model, mode="difference", jvp_method=jvp_method)
    linear(x)
    deltas = random_deltas(linear)
    assert relative_error(linear(x), reference_jvp(model, x, deltas)[0]) < 1e-5
    assert not any("call" in vars(layer) for layer in model.layers)


def test_grouped_convolutions_in_a_jit_compiled_fit():
    """Grouped convolutions keep TensorFlow's own op here (its forward mode is right; the
    kernels' one-group-at-a-time replacement has no second derivative under XLA)."""
    model = keras.Sequential([keras.Input((6, 6, 4)),
                              keras.layers.Conv2D(6, 3, strides=2, groups=2, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    x = np.random.randn(5, 6, 6, 4).astype("float32")
    linear = keras_ntk.Linearize(model, mode="difference")
    linear(x)
    deltas = random_deltas(linear)
    assert relative_error(linear(x), reference_jvp(model, x, deltas)[0]) < 1e-5
    wrapper = keras.Sequential([keras.Input((6, 6, 4)), linear])
    wrapper.compile(optimizer="sgd", loss="mse", jit_compile=True)
    loss = wrapper.fit(x, np.zeros((5, 2)), epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(loss)) and loss[1] < loss[0]


@pytest.mark.parametrize("jvp_method", ["forward", "double_vjp"])
def test_jvp_methods_agree_with_explicit_jacobian(jvp_method):
    model = cnn_with_batchnorm_and_dropout()
    x = np.random.randn(3, 8, 8, 2).astype("float32")
    linear = keras_ntk.Linearize(model, mode="difference", jvp_method=jvp_method)
    linear(x)
    deltas = random_deltas(linear)
    (expected,) = reference_jvp(model, x, deltas)
    assert relative_error(linear(x), expected) < 1e-5
    assert relative_error(tf.function(linear)(x), expected) < 1e-5


def test_recurrent_model_in_fit():
    """Graph-mode forward mode fails on the LSTM's while loop: auto uses double VJP."""
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.LSTM(4), keras.layers.Dense(2)]
    )
    x = np.random.randn(3, 5, 3).astype("float32")
    linear = keras_ntk.Linearize(model, mode="difference")
    linear(x)
    deltas = random_deltas(linear)
    (expected,) = reference_jvp(model, x, deltas)
    assert relative_error(tf.function(linear)(x), expected) < 1e-5
    wrapped = keras.Sequential([keras.Input((5, 3)), keras_ntk.Linearize(model)])
    wrapped.compile(optimizer="sgd", loss="mse")
    history = wrapped.fit(x, np.random.randn(3, 2), epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_mixed_precision_adds_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mlp()
        x = np.random.randn(4, 6).astype("float32")
        wrapped = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(model)])
        out = wrapped(x)
        assert out.dtype == tf.float32
        np.testing.assert_allclose(out, np.asarray(model(x), np.float32), atol=2e-3)
        wrapped.compile(optimizer="sgd", loss="mse")
        wrapped.fit(x, np.random.randn(4, 3), epochs=1, verbose=0)
        assert all(d.dtype == "float32" for d in wrapped.layers[0].deltas)
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ------------------------------------------------------------- gradients


def test_gradient_is_jacobian_transpose_product():
    model = two_output_functional()
    x = np.random.randn(4, 5).astype("float32")
    linear = keras_ntk.Linearize(model)
    linear(x)
    random_deltas(linear)
    u = {"first": np.random.randn(4, 2), "second": np.random.randn(4, 1)}
    with tf.GradientTape() as tape:
        out = linear(x)
        loss = tf.reduce_sum(out["first"] * u["first"]) + tf.reduce_sum(out["second"] * u["second"])
    grads = tape.gradient(loss, linear.deltas)
    # Reference: Jᵀu from explicit Jacobians at θ0.
    with tf.GradientTape(persistent=True) as ref_tape:
        ref = model(x, training=False)
    for grad, weight in zip(grads, model.trainable_weights):
        expected = np.zeros(weight.shape)
        for key in ("first", "second"):
            jac = ref_tape.jacobian(ref[key], weight, experimental_use_pfor=False)
            if jac is None:
                continue
            jac = np.asarray(jac, np.float64)
            expected += np.tensordot(u[key], jac, axes=2)
        assert relative_error(grad, expected) < 1e-5


def test_input_gradient_of_linearized_model():
    """∂f_lin/∂x = ∂f/∂x(θ0) + ∂(J·δ)/∂x, checked by central differences in float64."""
    model = mlp(input_dim=3, outputs=1, dtype="float64")
    linear = keras_ntk.Linearize(model, dtype="float64")
    x = tf.constant(np.random.randn(2, 3))
    linear(x)
    random_deltas(linear, scale=0.5)
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(linear(x))
    grad = tape.gradient(total, x).numpy()
    step = 1e-6
    numeric = np.zeros_like(grad)
    for index in np.ndindex(*grad.shape):
        bump = np.zeros(grad.shape)
        bump[index] = step
        numeric[index] = (
            float(tf.reduce_sum(linear(x + bump))) - float(tf.reduce_sum(linear(x - bump)))
        ) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# -------------------------------------------------------------- training


def test_fit_converges_to_minimum_norm_least_squares_solution():
    """GD from δ=0 on MSE stays in J's row space: it ends at δ* = J⁺(y − f0)."""
    model = mlp(input_dim=4, outputs=1, dtype="float64")
    x = np.random.randn(6, 4)
    y = np.random.randn(6, 1)
    x_test = np.random.randn(5, 4)
    with tf.GradientTape() as tape:
        f0 = model(x, training=False)
    jacobians = tape.jacobian(f0, model.trainable_weights)
    jac = np.concatenate([np.reshape(j, (6, -1)) for j in jacobians], axis=1)
    delta_star = np.linalg.pinv(jac) @ (y - np.asarray(f0)).ravel()

    linear = keras_ntk.Linearize(model, dtype="float64")
    wrapped = keras.Sequential([keras.Input((4,), dtype="float64"), linear])
    wrapped.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    full_batch = tf.data.Dataset.from_tensors((x, y)).repeat()
    wrapped.fit(full_batch, steps_per_epoch=300, epochs=1, verbose=0)

    delta = np.concatenate([np.ravel(d.value) for d in linear.deltas])
    assert relative_error(delta, delta_star) < 1e-3
    # Test predictions are the kernel-regression closed form f0 + J*·δ*.
    with tf.GradientTape() as tape:
        f0_test = model(x_test, training=False)
    jac_test = np.concatenate(
        [np.reshape(j, (5, -1)) for j in tape.jacobian(f0_test, model.trainable_weights)],
        axis=1,
    )
    expected = np.asarray(f0_test).ravel() + jac_test @ delta_star
    assert relative_error(wrapped.predict(x_test, verbose=0).ravel(), expected) < 1e-3


def test_fit_trains_only_offsets_and_leaves_model_untouched(caplog):
    model = cnn_with_batchnorm_and_dropout()
    before = [np.array(w.value) for w in model.weights]
    linear = keras_ntk.Linearize(model)
    wrapped = keras.Sequential([keras.Input((8, 8, 2)), linear])
    assert [id(w) for w in wrapped.trainable_weights] == [id(d) for d in linear.deltas]
    wrapped.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x = np.random.randn(32, 8, 8, 2).astype("float32")
    y = np.random.randn(32, 2).astype("float32")
    with caplog.at_level("WARNING"):
        history = wrapped.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert "Gradients do not exist" not in caplog.text
    assert history.history["loss"][-1] < history.history["loss"][0]
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(w.value, b)
    # θ0 is unchanged by training; only δ moved.
    for initial, w in zip(linear.initial_weights, model.trainable_weights):
        np.testing.assert_array_equal(initial, w.value)
    assert any(np.abs(d.value).max() > 0 for d in linear.deltas)


def test_training_the_network_does_not_move_its_linearization():
    model = cnn_with_batchnorm_and_dropout()
    x = np.random.randn(16, 8, 8, 2).astype("float32")
    linear = keras_ntk.Linearize(model)
    before = np.asarray(linear(x))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.random.randn(16, 2), epochs=2, verbose=0)  # moves θ and BN statistics
    np.testing.assert_allclose(linear(x), before, rtol=1e-6, atol=1e-6)


def test_jit_compiled_fit_matches_graph_fit():
    x = np.random.randn(32, 6).astype("float32")
    y = np.random.randn(32, 3).astype("float32")
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(3)
        model = mlp()
        wrapped = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(model)])
        wrapped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit)
        assert wrapped.jit_compile == jit
        wrapped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(wrapped.predict(x, verbose=0))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
def test_jit_compiled_fit_compiles_the_train_step_once(tmp_path, order):
    """Differentiating through the accumulator (or, for order 2, nesting two
    accumulators) made XLA recompile every step."""
    dump = tmp_path / "xla"
    script = textwrap.dedent(
        f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_dump_to={dump}"
        import keras, numpy as np, keras_ntk
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                keras.layers.Dense(1)])
        lin = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(net, order={order})])
        lin.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse",
                    jit_compile=True)
        lin.fit(np.random.randn(32, 6), np.random.randn(32, 1), batch_size=8, epochs=3,
                verbose=0)
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_DETERMINISTIC_OPS="0")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Proceeding with `jit_compile=False`" not in result.stderr
    compiled = [
        name
        for name in os.listdir(dump)
        if "one_step_on_data" in name and name.endswith("before_optimizations.txt")
    ]
    assert len(compiled) == 1, compiled  # 12 steps, one compilation


def test_fit_under_mirrored_strategy_matches_single_device(mirrored_strategy):
    """Two replicas (the logical CPUs of conftest) give the single-device result."""
    x = np.random.randn(32, 6).astype("float32")
    y = np.random.randn(32, 3).astype("float32")
    results = []
    for strategy in (tf.distribute.get_strategy(), mirrored_strategy):
        keras.utils.set_random_seed(5)
        with strategy.scope():
            wrapped = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(mlp())])
            wrapped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        wrapped.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append(wrapped.predict(x, verbose=0))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- relinearize & co


def test_relinearize_moves_the_linearization_point():
    model = mlp()
    x = np.random.randn(5, 6).astype("float32")
    linear = keras_ntk.Linearize(model)
    linear(x)
    deltas = random_deltas(linear, scale=0.3)
    expected_theta = [np.asarray(w.value) + d for w, d in zip(model.trainable_weights, deltas)]
    for actual, expected in zip(linear.linearized_weights(), expected_theta):
        np.testing.assert_allclose(actual, expected, rtol=1e-6)
    linear.relinearize()
    assert all(np.all(np.asarray(d.value) == 0) for d in linear.deltas)
    for actual, expected in zip(linear.initial_weights, expected_theta):
        np.testing.assert_allclose(actual, expected, rtol=1e-6)
    # Now f_lin(x; δ=0) is the nonlinear model at θ0 + δ.
    moved = mlp()
    moved.set_weights([np.asarray(w, np.float32) for w in expected_theta])
    np.testing.assert_allclose(linear(x), moved(x), rtol=1e-5, atol=1e-6)


def test_non_trainable_values_replace_batchnorm_statistics():
    model = cnn_with_batchnorm_and_dropout()
    bn = model.layers[1]
    x = np.random.randn(3, 8, 8, 2).astype("float32")
    fresh = [np.zeros(4, np.float32), np.ones(4, np.float32)]
    linear = keras_ntk.Linearize(model, non_trainable_values=fresh)
    original = [np.array(bn.moving_mean.value), np.array(bn.moving_variance.value)]
    bn.moving_mean.assign(fresh[0])
    bn.moving_variance.assign(fresh[1])
    expected = model(x, training=False)
    bn.moving_mean.assign(original[0])
    bn.moving_variance.assign(original[1])
    np.testing.assert_allclose(linear(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="Received: non_trainable_values with 1"):
        keras_ntk.Linearize(model, non_trainable_values=[fresh[0]])(x)


def test_saving_round_trip(tmp_path):
    model = cnn_with_batchnorm_and_dropout()
    linear = keras_ntk.Linearize(model)
    wrapped = keras.Sequential([keras.Input((8, 8, 2)), linear])
    wrapped.compile(optimizer="adam", loss="mse")
    x = np.random.randn(16, 8, 8, 2).astype("float32")
    wrapped.fit(x, np.random.randn(16, 2), epochs=1, verbose=0)
    path = str(tmp_path / "linear.keras")
    wrapped.save(path)
    restored = keras.saving.load_model(path)
    restored_linear = restored.layers[0]
    assert isinstance(restored_linear, keras_ntk.Linearize)
    assert restored_linear.mode == "full"
    np.testing.assert_allclose(restored.predict(x, verbose=0), wrapped.predict(x, verbose=0), rtol=1e-6)
    for a, b in zip(restored_linear.initial_weights, linear.initial_weights):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(restored_linear.deltas, linear.deltas):
        np.testing.assert_array_equal(a.value, b.value)
    # Training resumes from the restored optimizer state.
    restored.fit(x, np.random.randn(16, 2), epochs=1, verbose=0)


# ------------------------------------------- subsets of weights (variables=)


def test_variables_subset_matches_explicit_jacobian_of_that_subset():
    model = mlp()
    x = np.random.randn(4, 6).astype("float32")
    first_kernel = model.layers[0].kernel
    linear = keras_ntk.Linearize(model, mode="difference", variables=[first_kernel, "dense_2"])
    linear(x)
    chosen = [first_kernel] + list(model.layers[2].trainable_weights)
    assert [v.path for v in linear.linearized_variables] == [v.path for v in chosen]
    assert [tuple(d.shape) for d in linear.deltas] == [tuple(v.shape) for v in chosen]
    assert [id(w) for w in linear.trainable_weights] == [id(d) for d in linear.deltas]
    deltas = random_deltas(linear)
    with tf.GradientTape(persistent=True) as tape:
        y = model(x, training=False)
    expected = np.zeros(tuple(y.shape))
    for variable, delta in zip(chosen, deltas):
        jac = np.asarray(tape.jacobian(y, variable), np.float64).reshape(tuple(y.shape) + (-1,))
        expected += jac @ delta.reshape(-1)
    assert relative_error(linear(x), expected) < 1e-5
    # The weights left out are part of the returned parameter lists, unchanged.
    weights = linear.linearized_weights()
    assert len(weights) == len(model.trainable_weights)
    np.testing.assert_array_equal(weights[1], model.layers[0].bias.value)
    np.testing.assert_allclose(weights[0], np.asarray(first_kernel.value) + deltas[0], rtol=1e-6)


def test_linear_probe_trains_exactly_like_the_last_layer():
    """The output is linear in the head's weights: linearizing in them alone is exact."""
    model = mlp()
    x = np.random.randn(32, 6).astype("float32")
    y = np.random.randn(32, 3).astype("float32")
    probe = keras_ntk.Linearize(model, variables="dense_2")
    wrapped = keras.Sequential([keras.Input((6,)), probe])
    wrapped.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    wrapped.fit(x, y, epochs=5, batch_size=8, shuffle=False, verbose=0)
    reference = mlp()
    reference.set_weights(model.get_weights())
    for layer in reference.layers[:2]:
        layer.trainable = False
    reference.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    reference.fit(x, y, epochs=5, batch_size=8, shuffle=False, verbose=0)
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), reference.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-5)
    for actual, expected in zip(probe.linearized_weights(), reference.weights):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


def test_variables_are_saved_as_positions(tmp_path):
    model = mlp()
    x = np.random.randn(5, 6).astype("float32")
    wrapped = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(model, variables=["dense_2"])])
    wrapped.compile(optimizer="adam", loss="mse")
    wrapped.fit(x, np.random.randn(5, 3), epochs=2, verbose=0)
    assert wrapped.layers[0].get_config()["variables"] == [4, 5]
    path = str(tmp_path / "probe.keras")
    wrapped.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored.predict(x, verbose=0), wrapped.predict(x, verbose=0), rtol=1e-6)
    assert len(restored.layers[0].deltas) == 2


def test_variables_errors_name_what_was_received():
    x = np.zeros((1, 6), "float32")
    with pytest.raises(ValueError, match="Received: variables item='nope'"):
        keras_ntk.Linearize(mlp(), variables=["nope"])(x)
    other = keras.layers.Dense(2)
    other.build((None, 3))
    with pytest.raises(ValueError, match="Received: variables item="):
        keras_ntk.Linearize(mlp(), variables=[other.kernel])(x)
    with pytest.raises(ValueError, match=r"Received: variables=\[7\]"):
        keras_ntk.Linearize(mlp(), variables=[7])(x)


# ------------------------------------------------------- second order (order=2)


def _flat_jacobian_and_hessian(model, x):
    """Explicit J (outputs × P) and H (outputs × P × P) by nested tapes, float64."""
    weights = model.trainable_weights
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape(persistent=True) as inner:
            y = tf.reshape(model(x, training=False), [-1])
        jacobian = tf.concat(
            [tf.reshape(j, [y.shape[0], -1]) for j in inner.jacobian(y, weights)], axis=1
        )
    blocks = outer.jacobian(jacobian, weights)
    # Unconnected pairs (e.g. the output bias) come back as None: zeros.
    blocks = [
        tf.zeros(tuple(jacobian.shape) + tuple(w.shape), jacobian.dtype) if h is None else h
        for h, w in zip(blocks, weights)
    ]
    hessian = tf.concat(
        [tf.reshape(h, [y.shape[0], jacobian.shape[1], -1]) for h in blocks], axis=2
    )
    return np.asarray(y), np.asarray(jacobian), np.asarray(hessian)


def test_forward_mode_and_order_2_run_through_recurrent_layers_unrolled():
    """TensorFlow's forward mode fails on an LSTM's tf.while_loop in graph mode (an opaque
    TypeError for jvp_method="forward"; order=2 was refused): the wrapper traces the
    recurrent layers unrolled there, as the kernels do, and restores them."""
    def lstm(unroll):
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((4, 2), dtype="float64"),
                                 keras.layers.LSTM(2, unroll=unroll, dtype="float64"),
                                 keras.layers.Dense(2, dtype="float64")])

    model, reference = lstm(False), lstm(True)  # the same function and weights
    x = np.random.randn(3, 4, 2)
    linear = keras_ntk.Linearize(model, mode="difference", jvp_method="forward", dtype="float64")
    linear(x)
    deltas = random_deltas(linear)
    (expected,) = reference_jvp(model, x, deltas)
    assert relative_error(tf.function(linear)(x), expected) < 1e-10
    second = keras_ntk.Linearize(model, order=2, dtype="float64")
    second(x)
    deltas = random_deltas(second, scale=0.5)
    flat_delta = np.concatenate([d.reshape(-1) for d in deltas])
    f0, jacobian, hessian = _flat_jacobian_and_hessian(reference, x)
    expected = f0 + jacobian @ flat_delta + 0.5 * np.einsum("opq,p,q->o", hessian, flat_delta,
                                                            flat_delta)
    actual = np.asarray(tf.function(second)(x)).reshape(-1)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-11)
    u = np.random.randn(*expected.shape)

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(tf.reshape(second(x), [-1]) * u)
        return tape.gradient(value, second.deltas)

    grads = np.concatenate([np.asarray(g).reshape(-1) for g in gradient()])
    expected_grad = jacobian.T @ u + np.einsum("o,opq,q->p", u, hessian, flat_delta)
    np.testing.assert_allclose(grads, expected_grad, rtol=1e-9, atol=1e-11)
    assert not model.layers[0].unroll


def test_second_order_model_and_gradient_match_explicit_hessian():
    model = mlp(input_dim=3, outputs=2, dtype="float64")
    x = np.random.randn(3, 3)
    linear = keras_ntk.Linearize(model, order=2, dtype="float64")
    linear(x)
    deltas = random_deltas(linear, scale=0.5)
    flat_delta = np.concatenate([d.reshape(-1) for d in deltas])
    f0, jacobian, hessian = _flat_jacobian_and_hessian(model, x)
    expected = f0 + jacobian @ flat_delta + 0.5 * np.einsum("opq,p,q->o", hessian, flat_delta, flat_delta)
    np.testing.assert_allclose(np.asarray(linear(x)).reshape(-1), expected, rtol=1e-10, atol=1e-12)
    # ∂⟨u, f2⟩/∂δ = Jᵀu + Σ_o u_o H_o δ.
    u = np.random.randn(*expected.shape)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(tf.reshape(linear(x), [-1]) * u)
    grads = np.concatenate([np.asarray(g).reshape(-1) for g in tape.gradient(value, linear.deltas)])
    expected_grad = jacobian.T @ u + np.einsum("o,opq,q->p", u, hessian, flat_delta)
    np.testing.assert_allclose(grads, expected_grad, rtol=1e-10, atol=1e-12)


def test_second_order_remainder_is_third_order():
    # Smooth activations: a ReLU kink crossed within ε breaks the ε³ scaling.
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="float64"),
            keras.layers.Dense(16, activation="tanh", dtype="float64"),
            keras.layers.Dense(16, activation="softplus", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    x = np.random.randn(4, 6)
    linear = keras_ntk.Linearize(model, mode="difference", order=2, dtype="float64")
    linear(x)
    theta0 = [np.asarray(w.value) for w in model.trainable_weights]
    directions = random_deltas(linear, scale=1.0)
    f0 = np.asarray(model(x, training=False))
    remainders = []
    for eps in (2e-2, 1e-2):
        for d, v in zip(linear.deltas, directions):
            d.assign(eps * v)
        for w, t, v in zip(model.trainable_weights, theta0, directions):
            w.assign(t + eps * v)
        remainders.append(np.linalg.norm(np.asarray(model(x, training=False)) - f0 - np.asarray(linear(x))))
    ratio = remainders[0] / remainders[1]
    assert 7.0 < ratio < 9.0, remainders


def test_second_order_model_trains_in_fit_and_saves(tmp_path):
    model = mlp()
    x = np.random.randn(16, 6).astype("float32")
    y = np.random.randn(16, 3).astype("float32")
    wrapped = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(model, order=2)])
    wrapped.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = wrapped.fit(x, y, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    path = str(tmp_path / "order2.keras")
    wrapped.save(path)
    restored = keras.saving.load_model(path)
    assert restored.layers[0].order == 2
    np.testing.assert_allclose(restored.predict(x, verbose=0), wrapped.predict(x, verbose=0), rtol=1e-6)


# ----------------------------------------------- relinearize resets optimizer


def test_relinearize_resets_the_optimizer_state_of_the_offsets():
    model = mlp()
    x = np.random.randn(16, 6).astype("float32")
    y = np.random.randn(16, 3).astype("float32")
    inputs = keras.Input((6,))
    before = keras.layers.Dense(6, name="trainable_before")
    linear = keras_ntk.Linearize(model)
    wrapped = keras.Model(inputs, linear(before(inputs)))
    optimizer = keras.optimizers.Adagrad(0.01, initial_accumulator_value=0.25)
    wrapped.compile(optimizer=optimizer, loss="mse")
    wrapped.fit(x, y, epochs=2, verbose=0)
    delta_paths = {d.path.replace("/", "_") for d in linear.deltas}
    owned = [v for v in optimizer.variables if any(v.name.startswith(p) for p in delta_paths)]
    others = [v for v in optimizer.variables if v.name.startswith("trainable_before")]
    assert len(owned) == len(linear.deltas) and len(others) == 2
    others_before = [np.array(v.value) for v in others]
    assert all(np.all(np.asarray(v.value) > 0.25) for v in owned)
    linear.relinearize(wrapped.optimizer)
    for v in owned:
        np.testing.assert_array_equal(v.value, np.full(v.shape, 0.25, np.float32))
    for v, b in zip(others, others_before):
        np.testing.assert_array_equal(v.value, b)
    with pytest.raises(TypeError, match="Received: optimizer='sgd'"):
        linear.relinearize("sgd")



def test_relinearize_checks_its_arguments_before_moving_the_linearization_point():
    model = mlp()
    x = np.random.randn(5, 6).astype("float32")
    linear = keras_ntk.Linearize(model)
    linear(x)
    deltas = random_deltas(linear, scale=0.3)
    theta0 = [np.asarray(w.value) for w in model.trainable_weights]
    with pytest.raises(TypeError, match="Received: optimizer='adam'"):
        linear.relinearize("adam")
    # Nothing moved: θ0 is still the model's weights, δ still the offsets set above.
    for actual, expected in zip(linear.initial_weights, theta0):
        np.testing.assert_array_equal(actual, expected)
    for actual, expected in zip(linear.deltas, deltas):
        np.testing.assert_allclose(actual.value, expected, rtol=1e-7)
    unbuilt = keras_ntk.Linearize(mlp())
    with pytest.raises(ValueError, match="unbuilt layer"):
        unbuilt.relinearize()

def test_integer_inputs_are_cast_like_the_wrapped_model():
    model = mlp()
    x = np.arange(24).reshape(4, 6).astype("int32")
    linear = keras_ntk.Linearize(model)
    np.testing.assert_allclose(linear(x), model(x, training=False), rtol=1e-6)
    wrapped = keras.Sequential([keras.Input((6,), dtype="int32"), linear])
    wrapped.compile(optimizer="sgd", loss="mse")
    wrapped.fit(x, np.zeros((4, 3)), verbose=0)


# ------------------------------------------------------------------ errors


def test_errors_say_what_was_received():
    with pytest.raises(TypeError, match="Received: layer="):
        keras_ntk.Linearize(lambda x: x)
    with pytest.raises(ValueError, match="Received: mode='centred'"):
        keras_ntk.Linearize(mlp(), mode="centred")
    with pytest.raises(ValueError, match="Received: jvp_method='reverse'"):
        keras_ntk.Linearize(mlp(), jvp_method="reverse")
    with pytest.raises(ValueError, match="Received: order=3"):
        keras_ntk.Linearize(mlp(), order=3)
    with pytest.raises(ValueError, match="jvp_method='double_vjp'"):
        keras_ntk.Linearize(mlp(), order=2, jvp_method="double_vjp")
    frozen = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    frozen.trainable = False
    with pytest.raises(ValueError, match="0 trainable weights"):
        keras_ntk.Linearize(frozen)(np.zeros((1, 3), "float32"))


def test_refuses_non_tensorflow_backend(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="Received: backend='jax'"):
        keras_ntk.Linearize(keras.layers.Dense(2))


@pytest.mark.parametrize(
    "jvp_method, jit_compile",
    [("double_vjp", False), ("forward", False), ("double_vjp", True), ("forward", True)],
)
def test_traced_gradients_match_a_float64_reference_of_f0_plus_j_delta(jvp_method, jit_compile):
    """∂⟨u, f_lin⟩/∂δ = J(θ0)ᵀu and ∂⟨u, f_lin⟩/∂x, in a traced step (as in `fit`),
    against f0 + Σ_w (∂f/∂w)·δ_w built from explicit Jacobians of a float64 copy and
    differentiated by nested GradientTapes (no Hessian term may enter the δ-gradient).
    Under XLA "forward" takes the custom-gradient path, "double_vjp" the plain one."""
    model = mlp(input_dim=5, outputs=2)
    linear = keras_ntk.Linearize(model, jvp_method=jvp_method)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5)).astype("float32")
    u = rng.normal(size=(3, 2)).astype("float32")
    linear(x)
    random_deltas(linear, scale=0.3)

    @tf.function(jit_compile=jit_compile)
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(u * linear(x))
        return tape.gradient(total, [*linear.deltas, x])

    actual = gradients(tf.constant(x))
    reference = mlp(input_dim=5, outputs=2, dtype="float64")
    for target, source in zip(reference.weights, model.weights):
        target.assign(np.asarray(source.value, np.float64))
    deltas = [tf.Variable(np.asarray(d.value, np.float64)) for d in linear.deltas]
    x64 = tf.constant(x, tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(x64)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(x64)
            f0 = reference(x64, training=False)
        jacobians = inner.jacobian(f0, reference.trainable_weights, experimental_use_pfor=False)
        j_delta = tf.add_n([
            tf.reshape(tf.reshape(j, (3 * 2, -1)) @ tf.reshape(d, (-1, 1)), (3, 2))
            for j, d in zip(jacobians, deltas)
        ])
        total = tf.reduce_sum(tf.constant(u, tf.float64) * (f0 + j_delta))
    expected = outer.gradient(total, [*deltas, x64])
    for got, want in zip(actual, expected):
        assert relative_error(got, want) < 1e-5
