"""NTK-parameterized layers, whose wide limit is the kernel of `keras_ntk.infinite`.

In the NTK parameterization (Jacot et al. 2018) every weight and bias is drawn
from N(0, 1) and the layer rescales explicitly:

    y = weight_std / sqrt(fan_in) · (x ∗ W) + bias_std · b,

with fan_in = d_in for a dense layer and kh·kw·c_in for a convolution. Under
this scaling the empirical NTK of a network whose hidden widths grow to infinity
converges to the deterministic kernel returned by `keras_ntk.infinite_kernels`
(neural-tangents `stax` with `parameterization="ntk"`), and it stays constant
during gradient-descent training.
"""

import math

import keras
import tensorflow as tf

_ACTIVATIONS = (None, "linear", "relu", "erf")


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(
            "Expected `activation` to be one of None, 'linear', 'relu', 'erf' "
            "(the activations with a closed-form infinite-width kernel). "
            f"Received: activation={activation!r}"
        )
    return None if activation == "linear" else activation


def _apply_activation(x, activation):
    if activation == "relu":
        return tf.nn.relu(x)
    if activation == "erf":
        return tf.math.erf(x)
    return x


def _check_std(value, name):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected `{name}` to be a non-negative float. Received: {name}={value!r}"
        ) from None
    if not value >= 0.0:
        raise ValueError(
            f"Expected `{name}` to be a non-negative float. Received: {name}={value}"
        )
    return value


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Expected `{name}` to be a positive int. Received: {name}={value!r}"
        )
    return value


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        value = tuple(value)
    except TypeError:
        value = ()
    if len(value) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ValueError(
            f"Expected `{name}` to be a positive int or a pair of positive ints. "
            f"Received: {name}={value!r}"
        )
    return value


@keras.saving.register_keras_serializable(package="keras_ntk")
class NTKDense(keras.layers.Layer):
    """Densely connected layer in the NTK parameterization.

    Weights W (d_in × units) and biases b are drawn from N(0, 1) and the layer
    computes

        y = activation(weight_std / sqrt(d_in) · x W + bias_std · b).

    In the infinite-width limit the NNGP of the pre-activation is
    σw² K_in + σb² and its NTK is that plus σw² Θ_in (σw = `weight_std`,
    σb = `bias_std`), see `keras_ntk.infinite_kernels`. Like `keras.layers.Dense`,
    an input with more than two axes is transformed along its last axis.

    Args:
        units: positive int, the output width.
        weight_std: σw ≥ 0, the weight standard deviation before the
            1/sqrt(fan_in) scaling.
        bias_std: σb ≥ 0, the bias multiplier; 0 means the bias variable
            exists but has no effect.
        activation: None (identity), "linear", "relu" or "erf": the
            activations whose infinite-width kernels are known in closed form.

    Call arguments:
        inputs: a tensor of shape (..., d_in).

    Returns:
        A tensor of shape (..., units).

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((64,)),
        keras_ntk.NTKDense(512, weight_std=1.5, bias_std=0.1, activation="relu"),
        keras_ntk.NTKDense(1, weight_std=1.5, bias_std=0.1),
    ])
    ```
    """

    def __init__(self, units, weight_std=1.0, bias_std=0.0, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = _check_positive_int(units, "units")
        self.weight_std = _check_std(weight_std, "weight_std")
        self.bias_std = _check_std(bias_std, "bias_std")
        self.activation = _check_activation(activation)

    def build(self, input_shape):
        fan_in = input_shape[-1]
        if fan_in is None:
            raise ValueError(
                "Expected the last input axis of NTKDense to be known. "
                f"Received: input_shape={input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel", shape=(fan_in, self.units),
            initializer=keras.initializers.RandomNormal(0.0, 1.0),
        )
        self.bias = self.add_weight(
            name="bias", shape=(self.units,),
            initializer=keras.initializers.RandomNormal(0.0, 1.0),
        )
        self._scale = self.weight_std / math.sqrt(fan_in)

    def call(self, inputs):
        kernel = tf.cast(self.kernel, inputs.dtype)
        bias = tf.cast(self.bias, inputs.dtype)
        y = self._scale * tf.tensordot(inputs, kernel, axes=[[-1], [0]])
        y = y + self.bias_std * bias
        return _apply_activation(y, self.activation)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units, weight_std=self.weight_std, bias_std=self.bias_std,
            activation=self.activation,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_ntk")
class NTKConv2D(keras.layers.Layer):
    """2-D convolution (channels last) in the NTK parameterization.

    Filters W (kh × kw × c_in × filters) and biases b are drawn from N(0, 1):

        y = weight_std / sqrt(kh·kw·c_in) · (x ∗ W) + bias_std · b.

    In the infinite-width limit the NNGP of the output at positions (p, q) of
    two inputs is σw²/(kh·kw) · Σ_d K_in(p+d, q+d) + σb² (zero padding
    contributes zero) and its NTK adds σw² times the same sum of Θ_in, see
    `keras_ntk.infinite_kernels`.

    Args:
        filters: positive int, the number of output channels.
        kernel_size: int or pair (kh, kw).
        strides: int or pair, default 1.
        padding: "same" (zero padding as in `keras.layers.Conv2D`) or "valid".
        weight_std: σw ≥ 0.
        bias_std: σb ≥ 0.

    Call arguments:
        inputs: a tensor of shape (batch, height, width, c_in).

    Returns:
        A tensor of shape (batch, height', width', filters).

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras_ntk.NTKConv2D(256, 3, weight_std=1.4),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras_ntk.NTKDense(1, weight_std=1.4),
    ])
    ```
    """

    def __init__(self, filters, kernel_size, strides=1, padding="same", weight_std=1.0,
                 bias_std=0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters = _check_positive_int(filters, "filters")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
            raise ValueError(
                f"Expected `padding` to be 'same' or 'valid'. Received: padding={padding!r}"
            )
        self.padding = padding.lower()
        self.weight_std = _check_std(weight_std, "weight_std")
        self.bias_std = _check_std(bias_std, "bias_std")

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                "Expected a 4-D channels-last input with a known channel axis. "
                f"Received: input_shape={input_shape}"
            )
        c_in = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(*self.kernel_size, c_in, self.filters),
            initializer=keras.initializers.RandomNormal(0.0, 1.0),
        )
        self.bias = self.add_weight(
            name="bias", shape=(self.filters,),
            initializer=keras.initializers.RandomNormal(0.0, 1.0),
        )
        fan_in = self.kernel_size[0] * self.kernel_size[1] * c_in
        self._scale = self.weight_std / math.sqrt(fan_in)

    def call(self, inputs):
        kernel = tf.cast(self.kernel, inputs.dtype)
        bias = tf.cast(self.bias, inputs.dtype)
        y = tf.nn.conv2d(inputs, kernel, strides=self.strides,
                         padding=self.padding.upper())
        return self._scale * y + self.bias_std * bias

    def compute_output_shape(self, input_shape):
        batch, h, w, _ = input_shape
        out = []
        for size, k, s in zip((h, w), self.kernel_size, self.strides):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // s))
            else:
                out.append((size - k) // s + 1)
        return (batch, *out, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
            padding=self.padding, weight_std=self.weight_std, bias_std=self.bias_std,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_ntk")
class Erf(keras.layers.Layer):
    """The error-function activation, y = erf(x), elementwise.

    Its infinite-width kernel is Williams' (1997) arcsine kernel:
    E[erf(u) erf(v)] = 2/π · arcsin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22))) for
    (u, v) ~ N(0, [[k11, k12], [k12, k22]]). It matches neural-tangents
    `stax.Erf()` (a=1, b=1, c=0).

    Call arguments:
        inputs: a tensor of any shape.

    Returns:
        erf(inputs), same shape.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras_ntk.NTKDense(128),
                              keras_ntk.Erf(), keras_ntk.NTKDense(1)])
    ```
    """

    def call(self, inputs):
        return tf.math.erf(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape
