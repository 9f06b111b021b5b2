"""Models of the studies: MLP, LeNet (8×8 and 32×32 inputs), narrow ResNet-18, 1-D CNN.

Every builder takes `input_shape` and `num_outputs` (1: a single logit for
binary tasks trained with sigmoid cross-entropy) and uses LeCun-normal
kernels with zero biases, as the paper's (Ortiz-Jiménez et al., 2021)
JAX/Flax models do. Architectural hyperparameters are keyword arguments, so
gin can set them (`mlp.widths = (512, 512)`); the registration lives in
`experiments.configurables`.
"""

import keras

_INIT = "lecun_normal"


def _dense(units, activation=None, name=None):
    return keras.layers.Dense(
        units, activation=activation, kernel_initializer=_INIT,
        bias_initializer="zeros", name=name,
    )


def _conv(filters, kernel_size, strides=1, padding="same", activation=None,
          use_bias=True, name=None):
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding,
        activation=activation, use_bias=use_bias, kernel_initializer=_INIT,
        bias_initializer="zeros", name=name,
    )


def mlp(input_shape, num_outputs=1, *, widths=(512, 512), activation="relu"):
    """A fully connected ReLU network on flattened inputs.

    Args:
        input_shape: shape of one input example, e.g. (8, 8, 1).
        num_outputs: number of logits (1 for binary tasks).
        widths: hidden layer widths.
        activation: hidden activation.

    Returns:
        A `keras.Sequential` named "mlp".
    """
    layers = [keras.Input(input_shape), keras.layers.Flatten()]
    layers += [_dense(w, activation, name=f"dense_{i}") for i, w in enumerate(widths)]
    layers.append(_dense(num_outputs, name="logits"))
    return keras.Sequential(layers, name="mlp")


def lenet(input_shape, num_outputs=1, *, filters=(6, 16), hidden=(120, 84),
          activation="relu", kernel_size=None, padding=None, pooling="max"):
    """LeNet-5 adapted to the input size.

    Defaults: 32×32 inputs (CIFAR, padded MNIST): 5×5 'valid' convolutions,
    each followed by 2×2 max pooling (32→28→14→10→5), then the dense layers,
    as LeNet-5. Inputs smaller than 20 pixels (digits, 8×8): 3×3 'same'
    convolutions with 2×2 pooling (8→4→2), so the same layer sequence fits.
    `kernel_size`, `padding` and `pooling` override these: the reference code
    of Ortiz-Jiménez et al. (models/jax/lenet.py) uses 5×5 'same'
    convolutions and 2×2 average pooling with stride 2 (32→16→8).

    Args:
        input_shape: shape of one input example, (H, W, C).
        num_outputs: number of logits.
        filters: channels of the two convolutions.
        hidden: widths of the dense layers after flattening.
        activation: activation after every convolution and hidden layer.
        kernel_size: convolution window (None: 3 below 20 pixels, else 5).
        padding: "same" or "valid" (None: "same" below 20 pixels, else "valid").
        pooling: "max" or "average" 2×2 pooling with stride 2.

    Returns:
        A `keras.Sequential` named "lenet".
    """
    if pooling not in ("max", "average"):
        raise ValueError(f"Expected pooling 'max' or 'average'. Received: pooling={pooling!r}")
    if padding not in (None, "same", "valid"):
        raise ValueError(f"Expected padding 'same' or 'valid'. Received: padding={padding!r}")
    small = min(input_shape[0], input_shape[1]) < 20
    default_size, default_padding = (3, "same") if small else (5, "valid")
    kernel_size = default_size if kernel_size is None else kernel_size
    padding = default_padding if padding is None else padding
    pool = keras.layers.MaxPooling2D if pooling == "max" else keras.layers.AveragePooling2D
    layers = [keras.Input(input_shape)]
    for i, f in enumerate(filters):
        layers.append(_conv(f, kernel_size, padding=padding, activation=activation,
                            name=f"conv_{i}"))
        layers.append(pool(2, name=f"pool_{i}"))
    layers.append(keras.layers.Flatten())
    layers += [_dense(w, activation, name=f"dense_{i}") for i, w in enumerate(hidden)]
    layers.append(_dense(num_outputs, name="logits"))
    return keras.Sequential(layers, name="lenet")


@keras.saving.register_keras_serializable(package="experiments")
def gelu_tanh(x):
    """GeLU with the tanh approximation (Flax's `nn.gelu` default)."""
    return keras.activations.gelu(x, approximate=True)


_RESNET_ACTIVATIONS = ("relu", "gelu")


def _resnet_activation(activation):
    if activation == "relu":
        return keras.layers.ReLU()
    return keras.layers.Activation(gelu_tanh)


def _basic_block(x, filters, strides, name, norm, activation, zero_init_last_bn):
    shortcut = x
    y = _conv(filters, 3, strides=strides, use_bias=False, name=f"{name}_conv1")(x)
    y = norm(name=f"{name}_bn1")(y)
    y = _resnet_activation(activation)(y)
    y = _conv(filters, 3, use_bias=False, name=f"{name}_conv2")(y)
    # γ = 0 on the branch's last BatchNorm: each block starts as its shortcut.
    y = norm(name=f"{name}_bn2",
             gamma_initializer="zeros" if zero_init_last_bn else "ones")(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides=strides, use_bias=False,
                         name=f"{name}_proj")(x)
        shortcut = norm(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add()([y, shortcut])
    return _resnet_activation(activation)(y)


def resnet18(input_shape, num_outputs=1, *, width=16, blocks=(2, 2, 2, 2), activation="relu",
             zero_init_last_bn=False, bn_momentum=0.99, bn_epsilon=1e-3):
    """ResNet-18 (CIFAR variant) with BatchNorm, `width` channels in stage 1.

    A 3×3 stem, four stages of basic blocks with `width·(1, 2, 4, 8)`
    channels (stride 2 from the second stage on), global average pooling and
    a dense head. The standard network has width 64; the default 16 is the
    narrow version that runs on a CPU. The defaults keep Keras' BatchNorm
    settings; the reference code of Ortiz-Jiménez et al. (Flax's ResNet V1,
    models/jax/resnet.py) uses `zero_init_last_bn=True`, `bn_momentum=0.9`,
    `bn_epsilon=1e-5`, and GeLU in its linearization configs.

    Args:
        input_shape: shape of one input example, (H, W, C).
        num_outputs: number of logits.
        width: channels of the first stage.
        blocks: basic blocks per stage.
        activation: "relu" or "gelu" (tanh approximation, as Flax's nn.gelu).
        zero_init_last_bn: initialise γ of the last BatchNorm of each residual
            branch to 0.
        bn_momentum, bn_epsilon: of every BatchNormalization (moving
            statistics decay as m ← momentum·m + (1 − momentum)·batch).

    Returns:
        A functional `keras.Model` named "resnet18".
    """
    if activation not in _RESNET_ACTIVATIONS:
        raise ValueError(f"Expected activation in {_RESNET_ACTIVATIONS}. "
                         f"Received: activation={activation!r}")

    def norm(name, gamma_initializer="ones"):
        return keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                               gamma_initializer=gamma_initializer, name=name)

    inputs = keras.Input(input_shape)
    x = _conv(width, 3, use_bias=False, name="stem_conv")(inputs)
    x = norm(name="stem_bn")(x)
    x = _resnet_activation(activation)(x)
    for stage, count in enumerate(blocks):
        filters = width * 2**stage
        for block in range(count):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, strides, f"stage{stage}_block{block}", norm,
                             activation, zero_init_last_bn)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = _dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet18")


def conv1d(input_shape, num_outputs=1, *, channels=(25, 25, 25), kernel_size=5, strides=2,
           activation="relu"):
    """A small 1-D convolutional network for sequences stored as (1, L, C) images.

    Greydanus' (2020) MNIST-1D `ConvBase` in Keras: convolutions with 1×k
    kernels, stride (1, `strides`), 'same' padding and ReLU, then Flatten and
    a dense readout. On MNIST-1D inputs (1, 40, 1) the defaults give
    40 → 20 → 10 → 5 positions × 25 channels = 125 features. Only Conv2D,
    ReLU, Flatten and Dense: the structured eNTK and the NTK-parameterized
    twin (`ntk_parameterized`) support it.

    Args:
        input_shape: (1, L, C).
        num_outputs: number of logits.
        channels: channels of each convolution.
        kernel_size: k of the 1×k kernels.
        strides: stride along the sequence.
        activation: activation after every convolution.

    Returns:
        A `keras.Sequential` named "conv1d".
    """
    if len(input_shape) != 3 or input_shape[0] != 1:
        raise ValueError(
            "Expected inputs shaped (1, L, C) (a sequence as a one-row image). "
            f"Received: input_shape={tuple(input_shape)}"
        )
    layers = [keras.Input(input_shape)]
    layers += [_conv(c, (1, int(kernel_size)), strides=(1, int(strides)), padding="same",
                     activation=activation, name=f"conv_{i}") for i, c in enumerate(channels)]
    layers.append(keras.layers.Flatten())
    layers.append(_dense(num_outputs, name="logits"))
    return keras.Sequential(layers, name="conv1d")

MODELS = {"mlp": mlp, "lenet": lenet, "resnet18": resnet18, "conv1d": conv1d}


# ---------------------------------------------------------------- study C
# NTK-parameterized networks (keras_ntk.NTKDense/NTKConv2D) whose
# infinite-width kernels `keras_ntk.infinite_kernels` computes; used by
# experiments.trainability, which builds them per (σw², depth) itself (they
# are not in MODELS: their hyperparameters are the study's grid).


def _ntk_activation(activation):
    import keras_ntk

    if activation == "relu":
        return keras.layers.ReLU()
    if activation == "erf":
        return keras_ntk.Erf()
    raise ValueError(f"Expected activation 'relu' or 'erf'. Received: activation={activation!r}")


def ntk_fcn(input_shape, num_outputs=1, *, depth, width=512, sigma_w2=2.0, sigma_b2=0.05,
            activation="relu"):
    """A fully connected network in the NTK parameterization (study C).

    Flatten, then `depth` hidden layers NTKDense(width) + activation, then an
    NTKDense(num_outputs) readout; every layer has weight variance σw² and
    bias variance σb².

    Args:
        input_shape: shape of one input example.
        num_outputs: readout width.
        depth: number of hidden layers (≥ 0).
        width: hidden width (ignored by `infinite_kernels`).
        sigma_w2, sigma_b2: σw², σb².
        activation: "relu" or "erf".

    Returns:
        A `keras.Sequential` named "fcn".
    """
    import keras_ntk

    std = dict(weight_std=float(sigma_w2) ** 0.5, bias_std=float(sigma_b2) ** 0.5)
    layers = [keras.Input(input_shape), keras.layers.Flatten()]
    for i in range(depth):
        layers += [keras_ntk.NTKDense(width, name=f"dense_{i}", **std),
                   _ntk_activation(activation)]
    layers.append(keras_ntk.NTKDense(num_outputs, name="readout", **std))
    return keras.Sequential(layers, name="fcn")


def ntk_cnn(input_shape, num_outputs=1, *, depth, filters=64, kernel_size=3, pooling="flatten",
            sigma_w2=2.0, sigma_b2=0.05, activation="relu"):
    """A convolutional network in the NTK parameterization (study C).

    `depth` layers NTKConv2D(filters, kernel_size, 'same') + activation, then
    Flatten (`pooling="flatten"`, CNN-F) or GlobalAveragePooling2D
    (`pooling="gap"`, CNN-GAP), then an NTKDense(num_outputs) readout.

    Args:
        input_shape: (H, W, C).
        num_outputs: readout width.
        depth: number of convolutional layers (≥ 1).
        filters: channels (ignored by `infinite_kernels`).
        kernel_size: convolution window.
        pooling: "flatten" or "gap".
        sigma_w2, sigma_b2: σw², σb².
        activation: "relu" or "erf".

    Returns:
        A `keras.Sequential` named "cnn_flatten" or "cnn_gap".
    """
    import keras_ntk

    if pooling not in ("flatten", "gap"):
        raise ValueError(f"Expected pooling 'flatten' or 'gap'. Received: pooling={pooling!r}")
    std = dict(weight_std=float(sigma_w2) ** 0.5, bias_std=float(sigma_b2) ** 0.5)
    layers = [keras.Input(input_shape)]
    for i in range(depth):
        layers += [keras_ntk.NTKConv2D(filters, kernel_size, padding="same", name=f"conv_{i}",
                                       **std),
                   _ntk_activation(activation)]
    layers.append(keras.layers.Flatten() if pooling == "flatten"
                  else keras.layers.GlobalAveragePooling2D())
    layers.append(keras_ntk.NTKDense(num_outputs, name="readout", **std))
    return keras.Sequential(layers, name=f"cnn_{pooling}")


# ---------------------------------------------------------------- study B
# The NTK-parameterized version of an architecture, whose infinite-width NTK
# `keras_ntk.infinite_kernels` computes (experiments.data_scaling).


def _activation_name(activation):
    name = keras.activations.serialize(activation) if activation is not None else None
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return None if name in (None, "linear") else name


def ntk_parameterized(model, *, sigma_w2=1.0, sigma_b2=0.0):
    """The NTK-parameterized twin of a Sequential model (same layers and widths).

    Dense → `keras_ntk.NTKDense`, Conv2D → `keras_ntk.NTKConv2D` (same
    kernel size, strides, padding) with weight variance σw² and bias variance
    σb²; ReLU (as a layer or a Dense/Conv2D activation), Flatten, average
    pooling and identities are kept. σw² = 1, σb² = 0 match LeCun-normal
    weights with zero biases at initialization. Anything else (max pooling,
    BatchNorm, other activations) raises a ValueError naming the layer,
    because `infinite_kernels` has no closed form for it.

    Args:
        model: a `keras.Sequential`.
        sigma_w2, sigma_b2: σw², σb².

    Returns:
        A `keras.Sequential` named "<name>_ntk".
    """
    import keras_ntk

    if not isinstance(model, keras.Sequential):
        raise ValueError(
            "Expected a keras.Sequential model for its NTK-parameterized twin. "
            f"Received: model={type(model).__name__}"
        )
    std = dict(weight_std=float(sigma_w2) ** 0.5, bias_std=float(sigma_b2) ** 0.5)
    layers = [keras.Input(model.input_shape[1:])]
    for layer in model.layers:
        activation = None
        if isinstance(layer, keras.layers.Dense):
            layers.append(keras_ntk.NTKDense(layer.units, name=layer.name, **std))
            activation = _activation_name(layer.activation)
        elif isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
            layers.append(keras_ntk.NTKConv2D(layer.filters, layer.kernel_size,
                                              strides=layer.strides, padding=layer.padding,
                                              name=layer.name, **std))
            activation = _activation_name(layer.activation)
        elif isinstance(layer, (keras.layers.Flatten, keras.layers.ReLU,
                                keras.layers.AveragePooling2D,
                                keras.layers.GlobalAveragePooling2D, keras.layers.Identity)):
            layers.append(layer.__class__.from_config(layer.get_config()))
        elif isinstance(layer, keras.layers.Activation):
            activation = _activation_name(layer.activation)
        else:
            raise ValueError(
                f"No NTK-parameterized twin (no infinite-width kernel) for layer "
                f"{layer.name!r} of type {type(layer).__name__}. Received: model={model.name!r}"
            )
        if activation == "relu":
            layers.append(keras.layers.ReLU())
        elif activation is not None:
            raise ValueError(
                f"Only ReLU activations have an NTK twin here. Received: activation="
                f"{activation!r} in layer {layer.name!r}"
            )
    return keras.Sequential(layers, name=f"{model.name}_ntk")
