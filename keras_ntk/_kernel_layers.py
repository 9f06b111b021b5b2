"""One Keras layer read as steps of the infinite-width kernel recursion.

`_layer_ops(layer)` returns the steps (`_Op`) of a single-input layer;
`_weighted(...)` gives the four numbers of a layer with weights:

    K' = w2·S(K) + b2,    Θ' = tw·S(K) + tb + w2·S(Θ),

S the identity (dense) or the normalized shifted sum of a convolution. NTK
parameterization (`NTKDense`/`NTKConv2D`): tw = w2 = σw², tb = b2 = σb².
Standard parameterization (plain `keras.layers.Dense`/`Conv1D`/`Conv2D`,
neural-tangents `parameterization="standard"`): w2 = Var(W)·fan_in, b2 =
Var(b), tw = fan_in, tb = 1 (a trainable bias); a frozen layer
(`trainable=False`) contributes no own terms (tw = tb = 0).

A layer that has no closed form or numerical kernel raises `_Unsupported`
(a ValueError carrying the layer and the reason), from `_unsupported` only.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_ntk.layers import Erf, NTKConv2D, NTKDense

SUPPORTED_LAYERS = (
    "keras_ntk.NTKDense, keras_ntk.NTKConv2D (NTK parameterization)",
    "keras.layers.Dense, Conv1D, Conv2D (standard parameterization; initializers of known "
    "variance: VarianceScaling/Glorot/He/LeCun, RandomNormal, TruncatedNormal, RandomUniform, "
    "Zeros; dilation 1, groups 1)",
    "keras.layers.ReLU, LeakyReLU, ELU, Activation(elementwise Keras activation), keras_ntk.Erf",
    "keras.layers.Identity, Dropout, SpatialDropout1D/2D, GaussianNoise, GaussianDropout, "
    "AlphaDropout (identity at inference)",
    "keras.layers.BatchNormalization (inference map, equal scale over channels, no shift)",
    "keras.layers.LayerNormalization (axis=-1, center=False, scale=False)",
    "keras.layers.AveragePooling1D/2D, GlobalAveragePooling1D/2D, Flatten",
    "keras.layers.Add, Average, Concatenate (channel axis); nested Sequential/functional models",
)

# Elementwise Keras activations without a closed form here, with φ and φ' continuous:
# Gauss-Hermite quadrature (accuracy in docs/infinite.md).
NUMERICAL_ACTIVATIONS = (
    "celu", "elu", "exponential", "gelu", "log_sigmoid", "mish", "sigmoid", "silu", "swish",
    "softplus", "softsign", "sparse_plus", "squareplus", "tanh", "tanh_shrink",
)
# Elementwise, but φ or φ' jumps: the 25-point rule is off by several per cent (measured:
# ReLU(max_value=1) 3% on E[φ(u)φ(u)]), so they are refused rather than integrated.
_KINKED = ("relu6", "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh", "hard_shrink",
           "soft_shrink", "selu", "threshold")
_KINKED_REASON = (" (its derivative jumps, where Gauss-Hermite quadrature is off by several "
                  "per cent, and it has no closed form here)")
# Degree of the Gauss-Hermite rule per axis (neural-tangents' default).
QUADRATURE_DEGREE = 25
# Activations that map a centred input to a centred output (odd functions).
_ODD = ("erf", "sign", "sin", "tanh", "softsign", "hard_tanh", "tanh_shrink", "soft_shrink",
        "hard_shrink")


class _Op:
    """One step of the kernel recursion: kind, hyper-parameters and input steps."""

    def __init__(self, kind, **params):
        self.kind = kind
        self.inputs = ()
        self.params = params

    def __repr__(self):
        return f"_Op({self.kind}, {self.inputs}, {self.params})"


class _Unsupported(ValueError):
    """A layer without an infinite-width kernel here (`.layer`, `.reason`)."""

    def __init__(self, message, layer, reason):
        super().__init__(message)
        self.layer, self.reason = layer, reason


def _unsupported(layer, why=""):
    supported = "\n  ".join(SUPPORTED_LAYERS)
    return _Unsupported(
        f"infinite_kernels does not support layer '{layer.name}' "
        f"({type(layer).__name__}){why}. Supported layers:\n  {supported}\n"
        f"Received: layer={layer.name!r}", layer, why.strip(" :") or "not supported")


# ------------------------------------------------------------------ initializers

# Variance of a standard normal truncated at ±2 (Keras' TruncatedNormal).
_TRUNCATED_VARIANCE = 1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2))


def _fans(shape):
    """Keras' fan_in, fan_out of a weight shape (receptive field × channels)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def _init_variance(initializer, shape, layer, what):
    """Variance of the iid centred entries `initializer` draws for `shape`, else refused."""
    config = initializer.get_config() if hasattr(initializer, "get_config") else {}
    if isinstance(initializer, keras.initializers.VarianceScaling):
        if (getattr(initializer, "input_axes", None) is not None
                or getattr(initializer, "output_axes", None) is not None):
            raise _unsupported(layer, f": its {what} VarianceScaling sets input/output axes")
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out,
             "fan_avg": (fan_in + fan_out) / 2}[initializer.mode]
        return float(initializer.scale) / n  # Keras rescales the truncated normal to this variance.
    if isinstance(initializer, keras.initializers.Zeros):
        return 0.0
    if isinstance(initializer, keras.initializers.Ones):
        config = {"value": 1.0}
        initializer = keras.initializers.Constant(1.0)
    if isinstance(initializer, keras.initializers.Constant):
        if float(np.max(np.abs(config["value"]))) == 0.0:
            return 0.0
        raise _unsupported(layer, f": its {what} is a non-zero constant (the pre-activations "
                                  "would not be centred Gaussians)")
    if isinstance(initializer, keras.initializers.RandomNormal):
        mean, std = config["mean"], config["stddev"]
        variance = std ** 2
    elif isinstance(initializer, keras.initializers.TruncatedNormal):
        mean, std = config["mean"], config["stddev"]
        variance = std ** 2 * _TRUNCATED_VARIANCE
    elif isinstance(initializer, keras.initializers.RandomUniform):
        low, high = config["minval"], config["maxval"]
        mean, variance = (low + high) / 2, (high - low) ** 2 / 12
    else:
        name = getattr(initializer, "__name__", type(initializer).__name__)
        raise _unsupported(layer, f": its {what} initializer {name} has no known iid variance "
                                  "(Orthogonal, Identity, Ones and custom callables are refused)")
    if mean != 0:
        raise _unsupported(layer, f": its {what} initializer has mean {mean} (not centred)")
    return float(variance)


def _standard(layer, kernel_shape):
    """(w2, b2, tw, tb) of a standard-parameterized Keras layer with `kernel_shape`."""
    fan_in = _fans(kernel_shape)[0]
    w2 = _init_variance(layer.kernel_initializer, kernel_shape, layer, "kernel") * fan_in
    b2, tb = 0.0, 0.0
    if layer.use_bias:
        b2 = _init_variance(layer.bias_initializer, kernel_shape[-1:], layer, "bias")
        tb = 1.0
    trainable = layer.trainable
    return dict(w2=w2, b2=b2, tw=float(fan_in) if trainable else 0.0,
                tb=tb if trainable else 0.0)


# ------------------------------------------------------------------ activations

def _activation_ops(name, layer):
    """Steps of a named Keras activation (None/'linear': none)."""
    if name in (None, "linear"):
        return []
    if name in ("relu", "erf", "sign", "sin", "cos"):
        return [_Op(name)]
    if name == "leaky_relu":
        return [_Op("abrelu", a=0.2, b=1.0)]
    if name in NUMERICAL_ACTIVATIONS:
        return [_Op("numerical", name=name, fn=keras.activations.get(name),
                    deg=QUADRATURE_DEGREE)]
    if name in _KINKED:
        raise _unsupported(layer, f" with activation {name!r}{_KINKED_REASON}")
    raise _unsupported(layer, f" with activation {name!r} (not an elementwise activation with "
                              "a closed form or a numerical kernel here)")


def _callable_names():
    """Known elementwise functions given as callables, by the name of their kernel."""
    names = {}
    for name, fns in (("sin", (tf.math.sin, keras.ops.sin)), ("cos", (tf.math.cos, keras.ops.cos)),
                      ("sign", (tf.math.sign, keras.ops.sign)), ("erf", (tf.math.erf, keras.ops.erf)),
                      ("relu", (tf.nn.relu, keras.ops.relu)), ("tanh", (tf.math.tanh, keras.ops.tanh)),
                      ("sigmoid", (tf.math.sigmoid, keras.ops.sigmoid)),
                      ("gelu", (keras.ops.gelu,)), ("silu", (tf.nn.silu, keras.ops.silu))):
        for fn in fns:
            names[id(fn)] = name
    return names


def _activation_name(activation, layer):
    if activation is None:
        return None
    known = _callable_names().get(id(activation))
    if known:
        return known
    name = keras.activations.serialize(activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    if not isinstance(name, str):
        raise _unsupported(layer, f" with activation {activation!r} (unknown function)")
    return name


def _layer_ops(layer):
    """The recursion steps of one single-input Keras layer (no nested models)."""
    if isinstance(layer, NTKDense):
        ops = [_Op("dense", w2=layer.weight_std ** 2, b2=layer.bias_std ** 2,
                   tw=layer.weight_std ** 2, tb=layer.bias_std ** 2)]
        return ops + _activation_ops(layer.activation, layer)
    if isinstance(layer, NTKConv2D):
        w2, b2 = layer.weight_std ** 2, layer.bias_std ** 2
        return [_Op("conv", w2=w2, b2=b2, tw=w2, tb=b2, kernel_size=tuple(layer.kernel_size),
                    strides=tuple(layer.strides), padding=layer.padding)]
    if isinstance(layer, Erf):
        return [_Op("erf")]
    if isinstance(layer, keras.layers.Dense):
        if not layer.built:
            raise _unsupported(layer, ": it is not built (its input width is unknown)")
        ops = [_Op("dense", **_standard(layer, tuple(layer.kernel.shape)))]
        return ops + _activation_ops(_activation_name(layer.activation, layer), layer)
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
        return _conv_ops(layer)
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        if config.get("max_value") is None and not config.get("threshold", 0.0):
            slope = float(config.get("negative_slope", 0.0) or 0.0)
            return [_Op("relu")] if slope == 0.0 else [_Op("abrelu", a=slope, b=1.0)]
        raise _unsupported(layer, " with max_value or threshold set" + _KINKED_REASON)
    if isinstance(layer, keras.layers.LeakyReLU):
        return [_Op("abrelu", a=float(layer.get_config()["negative_slope"]), b=1.0)]
    if isinstance(layer, keras.layers.ELU):
        alpha = float(layer.get_config().get("alpha", 1.0))
        if alpha != 1.0:
            raise _unsupported(layer, f" with alpha={alpha}" + _KINKED_REASON)
        return [_Op("numerical", name="elu", fn=keras.activations.elu, deg=QUADRATURE_DEGREE)]
    if isinstance(layer, keras.layers.Activation):
        return _activation_ops(_activation_name(layer.activation, layer), layer)
    if isinstance(layer, (keras.layers.Identity, keras.layers.Dropout,
                          keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
                          keras.layers.GaussianNoise, keras.layers.GaussianDropout,
                          keras.layers.AlphaDropout)):
        return []  # The identity at inference.
    if isinstance(layer, keras.layers.BatchNormalization):
        return [_batch_norm_op(layer)]
    if isinstance(layer, keras.layers.LayerNormalization):
        config = layer.get_config()
        axis = config["axis"]
        axis = list(axis) if isinstance(axis, (list, tuple)) else [axis]
        if axis not in ([-1], [len(layer.input.shape) - 1] if layer.built else [-1]):
            raise _unsupported(layer, f" with axis={config['axis']} (only the feature axis -1)")
        if config.get("center", True) or config.get("scale", True):
            raise _unsupported(layer, " with center=True or scale=True (its trained offset and "
                                      "gain are not part of the kernel: pass center=False, "
                                      "scale=False)")
        return [_Op("layernorm", eps=float(config["epsilon"]))]
    if isinstance(layer, (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D)):
        if layer.data_format != "channels_last":
            raise _unsupported(layer, " with data_format='channels_first'")
        pool, strides = _pairs1d(layer, layer.pool_size), _pairs1d(layer, layer.strides)
        return [_Op("avgpool", pool_size=pool, strides=strides, padding=layer.padding)]
    if isinstance(layer, (keras.layers.GlobalAveragePooling1D,
                          keras.layers.GlobalAveragePooling2D)):
        if layer.data_format != "channels_last" or layer.keepdims:
            raise _unsupported(layer, " with channels_first or keepdims=True")
        return [_Op("gap")]
    if isinstance(layer, keras.layers.Flatten):
        return [_Op("flatten")]
    raise _unsupported(layer)


def _pairs1d(layer, value):
    """A 1-D layer's size as (1, size) on the (1, length) grid of 1-D inputs."""
    value = tuple(value)
    return (1,) + value if len(value) == 1 else value


def _conv_ops(layer):
    config = layer.get_config()
    if layer.data_format != "channels_last":
        raise _unsupported(layer, " with data_format='channels_first'")
    if config.get("padding") not in ("same", "valid"):
        raise _unsupported(layer, f" with padding={config.get('padding')!r}")
    if any(d != 1 for d in np.ravel(config.get("dilation_rate", 1))) or config.get("groups", 1) != 1:
        raise _unsupported(layer, " with dilation_rate or groups other than 1")
    if not layer.built:
        raise _unsupported(layer, ": it is not built (its input channels are unknown)")
    ops = [_Op("conv", **_standard(layer, tuple(layer.kernel.shape)),
               kernel_size=_pairs1d(layer, layer.kernel_size),
               strides=_pairs1d(layer, layer.strides), padding=config["padding"])]
    return ops + _activation_ops(_activation_name(layer.activation, layer), layer)


def _batch_norm_op(layer):
    """Inference-mode BatchNormalization: y = a·x + (β − a·μ), a = γ/√(var + ε), per channel.

    Exact as a kernel step when a² is the same for every channel and the shift
    is zero (e.g. freshly initialized): K' = a²K, Θ' = a²Θ + [γ trained]·K/(var + ε)
    + [β trained]·1.
    """
    config = layer.get_config()
    axis = config["axis"]
    if not layer.built or axis not in (-1, len(layer.input.shape) - 1):
        raise _unsupported(layer, " unless built with axis=-1")
    variance = np.asarray(layer.moving_variance.numpy(), np.float64) + config["epsilon"]
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones_like(variance)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros_like(variance)
    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    scale2 = gamma ** 2 / variance
    shift = beta - gamma * mean / np.sqrt(variance)
    if np.ptp(scale2) > 1e-12 * np.max(scale2) or np.ptp(variance) > 1e-12 * np.max(variance):
        raise _unsupported(layer, ": its scale γ²/(var + ε) differs between channels (only a "
                                  "channel-independent scale has a single kernel)")
    if np.any(shift != 0):
        raise _unsupported(layer, ": its shift β − γμ/√(var + ε) is not zero (the outputs "
                                  "would not be centred)")
    trainable = layer.trainable
    return _Op("affine", w2=float(scale2[0]), b2=0.0,
               tw=float(1.0 / variance[0]) if trainable and layer.scale else 0.0,
               tb=1.0 if trainable and layer.center else 0.0)


def _is_odd(op):
    return op.kind in _ODD or (op.kind == "numerical" and op.params["name"] in _ODD) or (
        op.kind == "abrelu" and op.params["a"] == op.params["b"])
