"""Tests of keras_ntk.monte_carlo against the infinite-width kernels and per-sample references."""
import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ntk
from keras_ntk import NTKDense


def _mlp(width, outputs, inputs=4):
    return keras.Sequential([
        keras.Input((inputs,)), NTKDense(width, 1.4, 0.3, activation="relu"),
        NTKDense(width, 1.4, 0.3, activation="relu"), NTKDense(outputs, 1.2, 0.2)])


def test_mean_converges_to_the_infinite_kernels_within_standard_errors():
    # A width-512 NTK-parameterized ReLU MLP, 20 initializations (fixed seed), 4 outputs
    # averaged. Its expected kernels differ from the limit by O(1/width) (~0.2%), well
    # below the standard errors (NTK ~1-3%, NNGP ~10-25%), so every entry of the mean is
    # within 4.5 standard errors of infinite_kernels: a Student t with 19 degrees of
    # freedom exceeds 4.5 with probability 2.5e-4 per entry (15 entries per kernel).
    x = np.random.default_rng(0).normal(size=(5, 4))
    limit = keras_ntk.infinite_kernels(_mlp(1, 1), x)
    mc = keras_ntk.monte_carlo_kernels(lambda: _mlp(512, 4), x, n_samples=20, seed=3)
    assert mc.n_samples == 20
    for name in ("nngp", "ntk"):
        mean, stderr, exact = getattr(mc, name), getattr(mc, name + "_stderr"), getattr(limit, name)
        assert mean.shape == stderr.shape == (5, 5)
        z = (mean - exact) / stderr
        assert np.max(np.abs(z)) < 4.5, (name, z)
    # The NTK test has teeth: its standard errors are a few percent of the kernel, and a
    # kernel 10% off the limit would be rejected.
    assert np.max(mc.ntk_stderr / np.abs(limit.ntk)) < 0.05
    assert np.max(np.abs((mc.ntk - 1.1 * limit.ntk) / mc.ntk_stderr)) > 4.5
    np.testing.assert_allclose(mc.ntk, mc.ntk.T, rtol=1e-12)


def _naive_kernels(model, x1, x2):
    """Output products and J(x1)J(x2)ᵀ from float64 GradientTape.jacobian (one output)."""
    def jacobian(x):
        with tf.GradientTape() as tape:
            out = model(tf.constant(x, tf.float64))
        parts = tape.jacobian(out, model.trainable_variables)
        return out.numpy(), np.concatenate(
            [tf.reshape(p, [len(x), -1]).numpy() for p in parts], axis=1)

    f1, j1 = jacobian(x1)
    f2, j2 = jacobian(x2)
    return f1 @ f2.T, j1 @ j2.T


def test_standard_error_matches_per_sample_kernels_and_models_are_freed(float64_keras):
    # Sample i is model_fn(seed + i): rebuilding those models here and computing each
    # kernel naively gives the mean and s/√n (ddof=1) independently. Every model built
    # is released: when sample i is built, only the first model (whose variables hold
    # every later sample's weights) and none of samples 1..i−1 is alive.
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))
    built = []

    def model_fn(seed):
        alive = [i for i, ref in enumerate(built) if ref() is not None]
        assert alive in ([], [0]), alive
        keras.utils.set_random_seed(seed)
        model = _mlp(16, 1)
        built.append(weakref.ref(model))
        return model

    mc = keras_ntk.monte_carlo_kernels(model_fn, x1, x2, n_samples=4, seed=7)
    gc.collect()
    assert len(built) == 4 and all(ref() is None for ref in built)
    samples = []
    for i in range(4):
        keras.utils.set_random_seed(7 + i)
        samples.append(_naive_kernels(_mlp(16, 1), x1, x2))
    nngps, ntks = (np.array(s) for s in zip(*samples))
    for got, values in ((mc.nngp, nngps), (mc.ntk, ntks)):
        np.testing.assert_allclose(got, values.mean(0), rtol=1e-10)
    np.testing.assert_allclose(mc.nngp_stderr, nngps.std(0, ddof=1) / 2, rtol=1e-8)
    np.testing.assert_allclose(mc.ntk_stderr, ntks.std(0, ddof=1) / 2, rtol=1e-8)
    assert np.min(mc.ntk_stderr) > 0


class _BatchCentring(keras.layers.Layer):
    """Subtracts the batch mean: each example's output depends on the others."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)


def test_refuses_a_model_coupling_the_examples_of_a_batch():
    def model_fn():
        return keras.Sequential([keras.Input((4,)), NTKDense(8), _BatchCentring(name="centring"),
                                 NTKDense(1)])

    x = np.random.default_rng(2).normal(size=(4, 4))
    with pytest.raises(ValueError, match="no kernel between pairs.*centring"):
        keras_ntk.monte_carlo_kernels(model_fn, x, n_samples=2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n_samples=1), ValueError, "n_samples"),
    (dict(get=("nngp", "cov")), ValueError, "get"),
    (dict(model_fn=lambda a, b: None), TypeError, "model_fn"),
    (dict(model_fn=lambda: "not a model"), TypeError, "keras.Model"),
    (dict(model_fn=3), TypeError, "model_fn"),
])
def test_refuses_bad_arguments(kwargs, error, match):
    arguments = dict(model_fn=lambda: _mlp(4, 1), x1=np.ones((2, 4)), n_samples=2)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        keras_ntk.monte_carlo_kernels(**arguments)


def _cnn(width, pool):
    layers = [keras.Input((3, 3, 1)), keras_ntk.NTKConv2D(width, 2, weight_std=1.4, bias_std=0.3),
              keras.layers.ReLU()]
    if pool:
        layers.append(keras.layers.MaxPooling2D(pool_size=1, name="max_pool"))
    return keras.Sequential(layers + [keras.layers.Flatten(), NTKDense(2, 1.2, 0.2)])


def test_infinite_kernels_falls_back_to_monte_carlo_and_names_the_layers():
    # MaxPooling2D has no closed form, but with pool_size=1 it is the identity: the
    # Monte-Carlo estimate of the whole (width-256) model must agree, within 4.5 standard
    # errors (Student t, 9 degrees of freedom: P(|t| > 4.5) = 1.5e-3 per entry), with
    # the closed form of the same model without it.
    x = np.random.default_rng(3).normal(size=(3, 3, 3, 1))
    exact = keras_ntk.infinite_kernels(_cnn(1, pool=False), x)
    model = _cnn(256, pool=True)
    with pytest.raises(ValueError, match="max_pool"):
        keras_ntk.infinite_kernels(model, x)
    estimate = keras_ntk.infinite_kernels(model, x, fallback="monte_carlo", n_samples=10, seed=1)
    assert estimate.monte_carlo_layers == ("max_pool",)
    assert exact.monte_carlo_layers == () and exact.ntk_stderr is None
    for name in ("nngp", "ntk"):
        z = (getattr(estimate, name) - getattr(exact, name)) / getattr(estimate, name + "_stderr")
        assert np.max(np.abs(z)) < 4.5, (name, z)
    assert np.max(estimate.ntk_stderr / np.abs(exact.ntk)) < 0.1


def test_monte_carlo_fallback_refuses_a_layer_without_a_pairwise_kernel():
    model = keras.Sequential([keras.Input((4,)), NTKDense(8), _BatchCentring(name="centring"),
                              NTKDense(1)])
    x = np.random.default_rng(4).normal(size=(3, 4))
    with pytest.raises(ValueError, match="no kernel between pairs.*centring"):
        keras_ntk.infinite_kernels(model, x, fallback="monte_carlo", n_samples=2)
    with pytest.raises(ValueError, match="fallback"):
        keras_ntk.infinite_kernels(model, x, fallback="sampling")


def _two_branches(seed, chained):
    """x -> a = A(x), b = B(a) (chained) or B(x), [a, b] concatenated -> Dense: the same
    layers and weight shapes either way, two different functions of the same weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    first = keras.layers.Dense(4, activation="tanh")(inputs)
    second = keras.layers.Dense(4, activation="tanh")(first if chained else inputs)
    joined = keras.layers.Concatenate()([first, second])
    return keras.Model(inputs, keras.layers.Dense(1)(joined))


def test_samples_wired_differently_are_not_copied_into_the_first(float64_keras):
    # Odd samples chain the two branches. Copying such a sample's weights into the first
    # sample's model (same layer configs and weight shapes) would compute another
    # function: the mean NNGP must equal the mean of the samples' own output products.
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))
    mc = keras_ntk.monte_carlo_kernels(lambda seed: _two_branches(seed, seed % 2 == 1),
                                       x1, x2, n_samples=2, seed=0, get="nngp")

    def output_products(model):
        return np.asarray(model(x1)) @ np.asarray(model(x2)).T

    samples = [output_products(_two_branches(seed, seed % 2 == 1)) for seed in (0, 1)]
    np.testing.assert_allclose(mc.nngp, np.mean(samples, 0), rtol=1e-10)
    # The test has teeth: the copied weights give other outputs.
    copied = _two_branches(0, False)
    copied.set_weights(_two_branches(1, True).get_weights())
    wrong = output_products(copied)
    assert np.max(np.abs(wrong - samples[1])) > 1e-3 * np.max(np.abs(samples[1]))


class SubclassedMLP(keras.Model):
    """A subclassed model without get_config (its own config is not implemented)."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.hidden = keras.layers.Dense(width, activation="relu")
        self.head = keras.layers.Dense(1)

    def call(self, x):
        return self.head(self.hidden(x))


def test_samples_of_one_architecture_share_the_first_model(monkeypatch):
    # Models of one architecture (also subclassed models and users' layers, which
    # compiled functions shared across unrelated models do not trust) have their weights
    # copied into the first sample's model: a second model_fn call builds a model that is
    # never used for a kernel. Wider samples, another class or other wiring are not.
    from keras_ntk import monte_carlo

    for build in (lambda: _mlp(6, 1), lambda: SubclassedMLP(5)):
        one, two = build(), build()
        for model in (one, two):
            model(np.ones((1, 4)))
        assert monte_carlo.architecture_key(one, custom_classes=True) == \
            monte_carlo.architecture_key(two, custom_classes=True)
    wide, narrow = SubclassedMLP(6), SubclassedMLP(5)
    for model in (wide, narrow):
        model(np.ones((1, 4)))
    assert monte_carlo.architecture_key(wide, custom_classes=True) != \
        monte_carlo.architecture_key(narrow, custom_classes=True)
    assert monte_carlo.architecture_key(_two_branches(0, False), custom_classes=True) != \
        monte_carlo.architecture_key(_two_branches(0, True), custom_classes=True)
    # Only the first sample's model reaches the kernels.
    used = []
    original = monte_carlo.empirical_nngp
    monkeypatch.setattr(monte_carlo, "empirical_nngp",
                        lambda model, *a, **k: used.append(id(model)) or original(model, *a, **k))
    keras_ntk.monte_carlo_kernels(lambda: SubclassedMLP(5), np.ones((2, 4)), n_samples=3,
                                  get="nngp")
    assert len(used) == 3 and len(set(used)) == 1
