"""The plan of an infinite-width kernel: a Keras model read as recursion steps.

`_architecture(model, input_shape)` walks a Sequential or chain functional
model of supported layers and returns its steps (op, mode, spatial): the
kind and hyper-parameters of each step, and the representation of the
kernel it acts on ("fcn"; "full" positions × positions; "diag" the spatial
diagonal only, after the last pooling layer). Unsupported layers raise a
ValueError naming them.
"""

import keras

from keras_ntk.layers import Erf, NTKConv2D, NTKDense

SUPPORTED_LAYERS = (
    "keras_ntk.NTKDense (activation None/'linear'/'relu'/'erf')",
    "keras_ntk.NTKConv2D (padding 'same'/'valid', any strides)",
    "keras.layers.ReLU()",
    "keras.layers.Activation('relu' | 'linear')",
    "keras_ntk.Erf",
    "keras.layers.Identity",
    "keras.layers.AveragePooling2D",
    "keras.layers.GlobalAveragePooling2D",
    "keras.layers.Flatten",
)


class _Op:
    """One step of the kernel recursion: kind plus its hyper-parameters."""

    def __init__(self, kind, **params):
        self.kind = kind
        self.params = params

    def __repr__(self):
        return f"_Op({self.kind}, {self.params})"


def _unsupported(layer, why=""):
    supported = "\n  ".join(SUPPORTED_LAYERS)
    return ValueError(
        f"infinite_kernels does not support layer '{layer.name}' "
        f"({type(layer).__name__}){why}. Supported layers:\n  {supported}\n"
        f"Received: layer={layer.name!r}"
    )


def _activation_op(name, layer):
    if name in (None, "linear"):
        return []
    if name == "relu":
        return [_Op("relu")]
    if name == "erf":
        return [_Op("erf")]
    raise _unsupported(layer, f" with activation {name!r}")


def _layer_ops(layer):
    """The recursion steps of one Keras layer."""
    if isinstance(layer, keras.layers.InputLayer):
        return []
    if isinstance(layer, keras.Model):
        return _model_ops(layer)
    if isinstance(layer, NTKDense):
        ops = [_Op("dense", w2=layer.weight_std ** 2, b2=layer.bias_std ** 2)]
        return ops + _activation_op(layer.activation, layer)
    if isinstance(layer, NTKConv2D):
        return [_Op("conv", w2=layer.weight_std ** 2, b2=layer.bias_std ** 2,
                    kernel_size=tuple(layer.kernel_size), strides=tuple(layer.strides),
                    padding=layer.padding)]
    if isinstance(layer, Erf):
        return [_Op("erf")]
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        if (config.get("max_value") is not None or config.get("negative_slope", 0.0)
                or config.get("threshold", 0.0)):
            raise _unsupported(layer, " with max_value/negative_slope/threshold set")
        return [_Op("relu")]
    if isinstance(layer, keras.layers.Activation):
        name = keras.activations.serialize(layer.activation)
        if isinstance(name, dict):
            name = name.get("config", name.get("class_name"))
        return _activation_op(name, layer)
    if isinstance(layer, keras.layers.Identity):
        return []
    if isinstance(layer, keras.layers.AveragePooling2D):
        if layer.data_format != "channels_last":
            raise _unsupported(layer, " with data_format='channels_first'")
        return [_Op("avgpool", pool_size=tuple(layer.pool_size),
                    strides=tuple(layer.strides), padding=layer.padding)]
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        if layer.data_format != "channels_last" or layer.keepdims:
            raise _unsupported(layer, " with channels_first or keepdims=True")
        return [_Op("gap")]
    if isinstance(layer, keras.layers.Flatten):
        return [_Op("flatten")]
    raise _unsupported(layer)


def _model_ops(model):
    """The recursion steps of a Sequential model or a chain functional model."""
    if isinstance(model, keras.Sequential):
        layers = model.layers
    else:
        try:
            inputs, outputs = model.inputs, model.outputs
        except AttributeError:
            inputs = outputs = None
        if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                "infinite_kernels supports Sequential models and functional "
                "models with one input and one output whose layers form a chain. "
                f"Received: model={model.name!r}"
            )
        layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        previous = inputs[0]
        for layer in layers:
            try:
                layer_input, layer_output = layer.input, layer.output
            except (AttributeError, ValueError):
                layer_input = layer_output = None
            if layer_input is not previous:
                raise ValueError(
                    "infinite_kernels supports functional models whose layers form "
                    "a chain (each layer called once, on the previous layer's "
                    f"output). Layer '{layer.name}' breaks the chain. "
                    f"Received: model={model.name!r}"
                )
            previous = layer_output
        if previous is not outputs[0]:
            raise ValueError(
                "infinite_kernels supports functional models whose layers form a "
                f"chain ending at the model output. Received: model={model.name!r}"
            )
    ops = []
    for layer in layers:
        ops.extend(_layer_ops(layer))
    return ops


def _plan(ops, input_shape, full_covariance=False):
    """Checks shapes and picks per step the representation of the kernel.

    Returns a list of (op, mode_in, spatial_in) where mode is "fcn", "full"
    (positions of x1 × positions of x2) or "diag" (spatial diagonal only), and
    the final mode (always "fcn"). Steps after the last pooling layer only
    need the diagonal; `full_covariance=True` keeps the full covariance
    there too (the slow path, for tests).
    """
    if len(input_shape) == 1:
        mode, spatial = "fcn", None
    elif len(input_shape) == 3:
        mode, spatial = "spatial", tuple(input_shape[:2])
    else:
        raise ValueError(
            "infinite_kernels supports inputs of shape (N, features) or "
            f"(N, height, width, channels). Received: input_shape={input_shape}"
        )
    pooling = [i for i, op in enumerate(ops) if op.kind in ("avgpool", "gap")]
    last_pooling = pooling[-1] if pooling else -1
    steps = []
    for i, op in enumerate(ops):
        if mode != "fcn":
            mode = "full" if i <= last_pooling or full_covariance else "diag"
        if op.kind in ("conv", "avgpool", "gap") and mode == "fcn":
            raise ValueError(
                f"infinite_kernels: a {op.kind} step needs an image input of shape "
                "(N, height, width, channels) and must come before Flatten/"
                f"GlobalAveragePooling2D. Received: step={op}"
            )
        steps.append((op, mode, spatial))
        if op.kind in ("conv", "avgpool"):
            if op.kind == "conv":
                k, s, padding = op.params["kernel_size"], op.params["strides"], op.params["padding"]
            else:
                k, s, padding = op.params["pool_size"], op.params["strides"], op.params["padding"]
            new = []
            for size, kk, ss in zip(spatial, k, s):
                if padding == "same":
                    new.append(_same_padding(size, kk, ss)[0])
                else:
                    new.append((size - kk) // ss + 1)
            if min(new) < 1:
                raise ValueError(
                    f"infinite_kernels: step {op} leaves no output positions. "
                    f"Received: spatial_shape={spatial}"
                )
            spatial = tuple(new)
        elif op.kind in ("gap", "flatten"):
            mode, spatial = "fcn", None
    if mode != "fcn":
        raise ValueError(
            "infinite_kernels needs a flat output: end the convolutional part with "
            f"Flatten or GlobalAveragePooling2D. Received: input_shape={input_shape}"
        )
    return steps


def _same_padding(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def _architecture(model, input_shape):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected `model` to be a keras.Model (Sequential or a chain functional "
            f"model). Received: model={model!r}"
        )
    return _plan(_model_ops(model), tuple(input_shape))
