"""Bad input is refused before any work, naming the argument (issue 16, section 3).

Kernels (`empirical_ntk`, `ntk_vector_product`, `empirical_nngp`, `ntk_eigsh`,
`nystrom_ntk`) refuse NaN/Inf in their inputs and a model with non-finite
weights before computing anything, naming the argument and the index of the
first non-finite value; a kernel that becomes non-finite mid-computation
raises with the reason. The XLA fallback of the compiled block functions hides
only XLA's compile errors. (predict.py, metrics.py, NTKTracker and Linearize
have their checks tested in their own test files.)
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from keras_ntk import _batching, _validation
from keras_ntk import ntk as ntk_module


@pytest.fixture(autouse=True)
def _plain_graphs(monkeypatch):
    monkeypatch.setattr(_batching, "_JIT", "0")


def mlp(outputs=1):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"),
                             keras.layers.Dense(outputs)])


def inputs(n=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")


def with_value(x, index, value=np.nan):
    x = x.copy()
    x[index] = value
    return x


def naive_kernel(model, x1, x2):
    """Θ = J(x1) J(x2)ᵀ from whole-batch float64 Jacobians (one logit)."""
    def jacobian(x):
        with tf.GradientTape() as tape:
            y = model(x, training=False)
        return np.concatenate([np.reshape(np.asarray(j, np.float64), (len(x), -1))
                               for j in tape.jacobian(y, model.trainable_weights)], 1)
    return jacobian(x1) @ jacobian(x2).T


@pytest.fixture
def no_kernel_work(monkeypatch):
    """Any block computed fails the test: the checks must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("kernel blocks ran before the arguments were checked")
    monkeypatch.setattr(ntk_module, "run_tasks", fail)


@pytest.mark.parametrize("call, received", [
    (lambda m, x: keras_ntk.empirical_ntk(m, with_value(x, (3, 2))), r"x1\[3, 2\]=nan"),
    (lambda m, x: keras_ntk.empirical_ntk(m, x, with_value(x[:2], (1, 0), np.inf)),
     r"x2\[1, 0\]=inf"),
    (lambda m, x: keras_ntk.ntk_vector_product(m, x, None, with_value(np.ones(5), 4)),
     r"v\[4\]=nan"),
    (lambda m, x: keras_ntk.ntk_vector_product(m, with_value(x, (0, 0), -np.inf), None,
                                               np.ones(5)), r"x1\[0, 0\]=-inf"),
    (lambda m, x: keras_ntk.empirical_ntk(m, [x, with_value(x, (2, 3))]), r"x1\[1\]\[2, 3\]=nan"),
])
def test_kernels_refuse_non_finite_inputs_before_work(call, received, no_kernel_work):
    model = mlp()
    with pytest.raises(_validation.NonFiniteError, match=f"Received: {received}"):
        if "x1\\[1\\]" in received:  # a model with two inputs
            a, b = keras.Input((4,)), keras.Input((4,))
            model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Add()([a, b])))
        call(model, inputs())


@pytest.mark.parametrize("implementation, blocks_allowed", [
    # A block function shared by the architecture checks the weights it reads in the
    # same compiled call (no host read of every weight first): the first block raises.
    ("auto", 1),
    # Other block functions (ntvp, a model's own): checked on the host before any block.
    ("ntvp", 0),
])
def test_non_finite_weights_are_refused_naming_the_weight(implementation, blocks_allowed,
                                                          monkeypatch):
    ran = []
    run_tasks = ntk_module.run_tasks

    def counting(tasks, verbose):
        return run_tasks([(lambda *a, fn=fn: ran.append(fn) or fn(*a), args, done)
                          for fn, args, done in tasks], verbose)

    monkeypatch.setattr(ntk_module, "run_tasks", counting)
    model = mlp()
    kernel = model.layers[1].kernel
    kernel.assign(with_value(np.asarray(kernel.value), (4, 0)))
    with pytest.raises(ValueError, match=r"finite weights.*Received: weight '.*kernel'\[4, 0\]=nan"):
        keras_ntk.empirical_ntk(model, inputs(), batch_size=2,  # 6 blocks
                                implementation=implementation)
    assert len(ran) == blocks_allowed


def test_a_shared_block_function_refuses_the_non_finite_weights_of_one_model_only():
    # Two models of one architecture share a compiled block function: the check
    # reads each call's own weights (the finite model's kernel is still exact).
    good, bad = mlp(), mlp()
    bad.layers[0].bias.assign(with_value(np.asarray(bad.layers[0].bias.value), 2, np.inf))
    x = inputs()
    with pytest.raises(ValueError, match=r"Received: weight '.*bias'\[2\]=inf"):
        keras_ntk.empirical_ntk(bad, x)
    np.testing.assert_allclose(keras_ntk.empirical_ntk(good, x), naive_kernel(good, x, x),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"Received: weight '.*bias'\[2\]=inf"):
        keras_ntk.empirical_ntk(bad, x)


def test_the_in_program_weight_check_misses_nothing_and_refuses_nothing_finite():
    # A shared block function checks one sum per weight: +Inf and -Inf in one weight
    # sum to NaN (refused); finite entries whose sum overflows are a false alarm the
    # host check clears (the head bias: Θ does not depend on its value).
    bad = mlp()
    kernel = np.asarray(bad.layers[0].kernel.value).copy()
    kernel[0, 0], kernel[1, 0] = np.inf, -np.inf
    bad.layers[0].kernel.assign(kernel)
    x = inputs()
    with pytest.raises(ValueError, match=r"Received: weight '.*kernel'\[0, 0\]=inf"):
        keras_ntk.empirical_ntk(bad, x)
    big = mlp(outputs=2)
    big.layers[1].bias.assign(np.full(2, 3e38, "float32"))  # sum: inf in float32
    np.testing.assert_allclose(keras_ntk.empirical_ntk(big, x, trace_axes=()),
                               naive_full_kernel(big, x), rtol=1e-4, atol=1e-5)


def naive_full_kernel(model, x):
    """Θ[n, m, i, j] from float64 Jacobians of every output."""
    with tf.GradientTape() as tape:
        y = model(x, training=False)
    jac = np.concatenate([np.reshape(np.asarray(j, np.float64), (*y.shape, -1))
                          for j in tape.jacobian(y, model.trainable_weights)], -1)
    return np.einsum("nip,mjp->nmij", jac, jac)


def test_a_kernel_that_becomes_non_finite_says_why():
    # log of a negative pre-activation: finite inputs and weights, NaN outputs.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.Lambda(lambda t: keras.ops.log(t)),
                              keras.layers.Dense(1)])
    x = inputs()
    assert np.isnan(naive_kernel(model, x, x)).any()  # the reference is NaN too
    with pytest.raises(ValueError, match="not finite although every input is: the model's"):
        keras_ntk.empirical_ntk(model, x)
    with pytest.raises(ValueError, match="NTK-vector product is not finite"):
        keras_ntk.ntk_vector_product(model, x, None, np.ones(5))


@pytest.mark.parametrize("call, error, received", [
    (lambda m, x: keras_ntk.empirical_ntk(m, x, np.ones((3, 5), "float32")), ValueError,
     r"x1 per-example shapes \[\(4,\)\], x2 per-example shapes \[\(5,\)\]"),
    (lambda m, x: keras_ntk.empirical_ntk(m, x, dtype="int32"), ValueError,
     "dtype='int32'"),
    (lambda m, x: keras_ntk.empirical_ntk(m, x, batch_size=True), ValueError, "batch_size=True"),
    (lambda m, x: keras_ntk.empirical_ntk(m, x, memory_budget="1GB"), TypeError,
     "memory_budget='1GB'"),
    (lambda m, x: keras_ntk.empirical_nngp(m, x, layer=3), TypeError, "layer=3"),
    (lambda m, x: keras_ntk.empirical_nngp(m, x, x[:, :3]), ValueError,
     r"x2 per-example shapes \[\(3,\)\]"),
    (lambda m, x: keras_ntk.empirical_nngp(m, x, dtype="int64"), ValueError, "dtype='int64'"),
    (lambda m, x: keras_ntk.empirical_nngp(m, with_value(x, (1, 1))), ValueError,
     r"x1\[1, 1\]=nan"),
    (lambda m, x: keras_ntk.ntk_eigsh(m, with_value(x, (2, 2)), k=2), ValueError,
     r"x\[2, 2\]=nan"),
    (lambda m, x: keras_ntk.ntk_eigsh(m, x, k=2, ncv=2), ValueError, "ncv=2"),
    (lambda m, x: keras_ntk.ntk_eigsh(m, x, k=2, tol=-1.0), ValueError, "tol=-1.0"),
    (lambda m, x: keras_ntk.ntk_eigsh(m, x, k=2, maxiter=0), ValueError, "maxiter=0"),
    (lambda m, x: keras_ntk.nystrom_ntk(m, x, 3, rcond=1.5), ValueError, "rcond=1.5"),
    (lambda m, x: keras_ntk.nystrom_ntk(m, x, 3, error_columns=-1), ValueError,
     "error_columns=-1"),
    (lambda m, x: keras_ntk.nystrom_ntk(m, x, True), TypeError, "landmarks=True"),
    (lambda m, x: keras_ntk.nystrom_ntk(m, x, 3, dtype="int32"), ValueError, "dtype='int32'"),
])
def test_arguments_are_typed_and_ranged_before_work(call, error, received, no_kernel_work,
                                                    monkeypatch):
    def no_lanczos(*args, **kwargs):
        raise AssertionError("ARPACK ran before the arguments were checked")
    monkeypatch.setattr(keras_ntk.spectral.scipy.sparse.linalg, "eigsh", no_lanczos)
    with pytest.raises(error, match=f"Received: .*{received}"):
        call(mlp(), inputs())


def test_nystrom_regression_refuses_non_finite_targets():
    model, x = mlp(), inputs(8)
    approx = keras_ntk.nystrom_ntk(model, x, 4, error_columns=0)
    np.testing.assert_allclose(approx.matrix()[:, approx.landmarks],
                               naive_kernel(model, x, x[approx.landmarks]), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"Received: y_train\[5\]=nan"):
        approx.kernel_regression(with_value(np.ones(8), 5), 1e-3)
    with pytest.raises(ValueError, match="Received: ridge=nan"):
        approx.kernel_regression(np.ones(8), np.nan)


# ------------------------------------------------------------------ XLA fallback


class HostIdentity(keras.layers.Layer):
    """y = x + 0 from a NumPy call: fine in a plain graph, not compilable by XLA."""

    def call(self, x):
        zeros = tf.numpy_function(lambda a: a * 0, [x], tf.float32, stateful=False)
        return x + tf.reshape(tf.stop_gradient(zeros), tf.shape(x))


def test_xla_fallback_only_for_xla_compile_errors_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(_batching, "_JIT", "auto")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"),
                              HostIdentity(), keras.layers.Dense(1)])
    x = inputs(6)
    with caplog.at_level(logging.WARNING, logger="keras_ntk"):
        first = keras_ntk.empirical_ntk(model, x, implementation="jacobian")
        second = keras_ntk.empirical_ntk(model, x, implementation="jacobian")
    expected = naive_kernel(model, x, x)
    for kernel in (first, second):
        np.testing.assert_allclose(kernel, expected, rtol=1e-4, atol=1e-6)
    falls_back = [r for r in caplog.records if "XLA could not compile" in r.getMessage()]
    assert len(falls_back) == 1
    # The model's own error is not taken for an XLA failure: it is raised, XLA stays on.
    strict = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6), keras.layers.Dense(1)])
    keras_ntk.empirical_ntk(strict, x, implementation="jacobian")
    functions = _batching.block_functions(strict)
    assert functions and all(f._xla is not None for f in functions)
    # A block function that raises by itself (the model's ValueError): raised as it is.
    calls = []

    def refusing(x):
        calls.append(1)
        raise ValueError("the model refuses this input")

    function = _batching._JitFallback(refusing, jit=True)
    with pytest.raises(ValueError, match="the model refuses this input"):
        function(tf.ones((2, 4)))
    assert function._xla is not None and len(calls) == 1


def test_infinite_kernels_refuse_non_finite_inputs():
    model = keras.Sequential([keras.Input((4,)), keras_ntk.NTKDense(8), keras.layers.ReLU(),
                              keras_ntk.NTKDense(1)])
    x = inputs().astype("float64")
    with pytest.raises(ValueError, match=r"Received: x1\[2, 3\]=nan"):
        keras_ntk.infinite_kernels(model, with_value(x, (2, 3)))
    with pytest.raises(ValueError, match=r"Received: x2\[0, 1\]=inf"):
        keras_ntk.infinite_kernels(model, x, with_value(x[:2], (0, 1), np.inf))
