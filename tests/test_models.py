"""Tests of experiments/models.py and experiments/train.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from experiments import models, train


def test_mlp_shapes_and_parameter_count():
    model = models.mlp((8, 8, 1), 1, widths=(512, 512))
    assert model.output_shape == (None, 1)
    # 64·512 + 512, 512·512 + 512, 512·1 + 1 counted by hand.
    assert model.count_params() == (64 * 512 + 512) + (512 * 512 + 512) + (512 + 1)


@pytest.mark.parametrize("size, flat", [(8, 2 * 2 * 16), (32, 5 * 5 * 16)])
def test_lenet_adapts_to_input_size(size, flat):
    model = models.lenet((size, size, 1 if size == 8 else 3), 1)
    flatten = next(layer for layer in model.layers if isinstance(layer, keras.layers.Flatten))
    assert flatten.output.shape[-1] == flat
    assert model.output_shape == (None, 1)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.kernel_size for c in convs] == ([(3, 3)] * 2 if size == 8 else [(5, 5)] * 2)


def test_conv1d_matches_a_numpy_strided_convolution():
    model = models.conv1d((1, 40, 1), 10)
    # 5·1·25 + 25, 2 × (5·25·25 + 25), then 5 positions · 25 channels → 10.
    assert model.count_params() == 150 + 2 * 3150 + (125 * 10 + 10)
    x = np.random.default_rng(0).normal(size=(3, 1, 40, 1)).astype(np.float32)
    h = x[:, 0].astype(np.float64)  # (N, L, C)
    for layer in model.layers[:3]:
        kernel = np.asarray(layer.kernel, np.float64)[0]  # (k, C_in, C_out)
        bias = np.asarray(layer.bias, np.float64)
        # 'same' with stride 2 on an even length: pad 1 before, 2 after (TF's rule).
        padded = np.pad(h, ((0, 0), (1, 2), (0, 0)))
        h = np.stack([np.einsum("nkc,kcd->nd", padded[:, 2 * i:2 * i + 5], kernel)
                      for i in range(h.shape[1] // 2)], axis=1) + bias
        h = np.maximum(h, 0.0)
    logits = h.reshape(3, -1) @ np.asarray(model.layers[-1].kernel, np.float64)
    np.testing.assert_allclose(model(x).numpy(), logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="input_shape"):
        models.conv1d((40, 1), 10)

def test_resnet18_structure():
    model = models.resnet18((32, 32, 3), 10, width=4)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    bns = [layer for layer in model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    # 1 stem + 8 blocks × 2 convolutions = 17 (plus the dense head = 18 layers),
    # and 3 projection shortcuts where the stage changes width.
    assert len(convs) == 17 + 3 and len(bns) == 20
    assert [c.filters for c in convs if c.name.endswith("_conv1")] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert model.output_shape == (None, 10)
    x = np.random.normal(size=(2, 32, 32, 3)).astype("float32")
    assert model(x, training=False).shape == (2, 10)


def test_lecun_normal_kernels_and_zero_biases():
    model = models.mlp((8, 8, 1), 1, widths=(4096,))
    kernel, bias = model.layers[1].kernel.numpy(), model.layers[1].bias.numpy()
    # LeCun normal: standard deviation sqrt(1 / fan_in) with fan_in = 64.
    np.testing.assert_allclose(kernel.std(), np.sqrt(1 / 64), rtol=0.02)
    assert np.all(bias == 0)


def test_linear_decay_schedule_closed_form():
    optimizer = train.linear_decay_sgd(total_steps=200, learning_rate=0.05, momentum=0.9)
    schedule = optimizer._learning_rate  # The schedule object as passed.
    for step in (0, 50, 150, 200, 300):
        expected = 0.05 * max(1 - step / 200, 0)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-9)
    assert optimizer.momentum == 0.9


def test_fit_takes_the_sgd_step_of_sigmoid_cross_entropy():
    # One full-batch step from w = 0 of a logistic model: the first momentum
    # step is w1 = −lr · ∇L(0) with ∇L(0) = mean((σ(0) − y) x) = mean((0.5 − y) x).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = (rng.random(16) > 0.5).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        1, kernel_initializer="zeros", bias_initializer="zeros")])
    train.fit(model, x, y, epochs=1, batch_size=16, learning_rate=0.05, verbose=0)
    gradient = ((0.5 - y)[:, None] * x).mean(axis=0)
    np.testing.assert_allclose(model.layers[0].kernel.numpy()[:, 0], -0.05 * gradient,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(model.layers[0].bias.numpy(), [-0.05 * (0.5 - y).mean()],
                               rtol=1e-4, atol=1e-7)


def test_binary_accuracy_by_hand():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(
        1, kernel_initializer="ones", bias_initializer="zeros")])
    x = np.array([[-2.0], [-1.0], [1.0], [3.0]], "float32")
    # Logits −2, −1, 1, 3 → predictions 0, 0, 1, 1; two of four labels agree.
    assert train.binary_accuracy(model, x, np.array([0, 1, 0, 1])) == 0.5


def test_strategies():
    assert isinstance(train.make_strategy("cpu"), tf.distribute.OneDeviceStrategy)
    # conftest configures two logical CPUs: mirrored spans both.
    assert train.make_strategy("mirrored").num_replicas_in_sync == 2
    with pytest.raises(ValueError, match="auto, cpu, one_device, mirrored, tpu.*gpu"):
        train.make_strategy("gpu")
