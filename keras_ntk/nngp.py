"""The empirical NNGP kernel: the Gram matrix of a layer's features."""

import keras
import numpy as np
import tensorflow as tf

from keras_ntk import _distribute, _validation
from keras_ntk._batching import host_inputs, num_examples, slice_examples
from keras_ntk._output_axes import OutputAxes
from keras_ntk._weights import iter_layers


def _feature_function(model, layer):
    """A function x -> features: the penultimate layer, a named layer or a callable."""
    if callable(layer) and not isinstance(layer, (str, keras.layers.Layer)):
        return layer
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            "Expected a functional or Sequential model (with symbolic inputs) to read "
            "layer features from; for a subclassed model pass `layer` as a callable "
            f"x -> features. Received: model={getattr(model, 'name', model)}, layer={layer}"
        )
    if layer is None:
        last = model.layers[-1]
        tensor = last.input
        if isinstance(tensor, (list, tuple, dict)):
            raise ValueError(
                f"Expected the last layer to have one input (the penultimate features); "
                f"name the feature layer instead. Received: last layer '{last.name}'"
            )
    else:
        if isinstance(layer, str):
            matches = [sub for sub in iter_layers(model) if sub.name == layer]
            if len(matches) != 1:
                names = [sub.name for sub in model.layers]
                raise ValueError(
                    f"Expected `layer` to name exactly one layer of the model (e.g. one of "
                    f"{names}). Received: layer={layer!r}"
                )
            layer = matches[0]
        try:
            tensor = layer.output
        except (AttributeError, ValueError) as e:
            raise ValueError(
                f"Expected `layer` to be a layer of the model's graph with one output. "
                f"Received: layer={layer.name}"
            ) from e
    # `model.input` keeps the structure the model is called with (a warning
    # otherwise); a Sequential model never called symbolically has only `inputs`.
    try:
        structure = model.input
    except (AttributeError, ValueError):
        structure = inputs[0] if len(inputs) == 1 else inputs
    return keras.Model(structure, tensor)


def empirical_nngp(model, x1, x2=None, *, layer=None, trace_axes=(-1,), diagonal_axes=(),
                   batch_size=256, dtype="float64"):
    """Empirical NNGP kernel: the Gram matrix of a layer's features, feature axes averaged.

    With φ(x) the features of `layer` (default: the penultimate layer, i.e. the
    input of the model's last layer) in inference mode,

        K(x1, x2) = φ(x1) · φ(x2) / d

    following neural-tangents' `empirical_nngp_fn` conventions: feature axes in
    `trace_axes` are summed and divided by their size d (so a Dense
    layer of width d gives the average over its units, O(1) at any width under
    NTK or standard 1/√fan-in initialization), axes in `diagonal_axes` keep
    their diagonal, and every other axis appears twice. For a convolutional
    feature map (N, H, W, C) the default gives (N1, N2, H, H, W, W); use
    `trace_axes=(1, 2, 3)` to average every axis (an N1 × N2 kernel). At
    infinite width the penultimate-layer kernel of an NTK-parameterized
    network tends to the NNGP of `keras_ntk.infinite_kernels` (up to the
    readout's weight and bias variances).

    Args:
        model: a functional or Sequential Keras model (subclassed models: pass
            `layer` as a callable).
        x1: inputs with N1 examples.
        x2: inputs with N2 examples, or None for x1.
        layer: None (penultimate features), a layer name, a layer of the
            model, or a callable x -> features.
        trace_axes, diagonal_axes: feature axes to average / keep diagonal
            (batch axis 0 counted), as in `empirical_ntk`.
        batch_size: examples per forward pass.
        dtype: dtype of the contraction and result.

    Returns:
        A numpy array (N1, N2, *kernel axes).

    Example:

    ```python
    k = keras_ntk.empirical_nngp(model, x_train)                 # penultimate layer
    k_first = keras_ntk.empirical_nngp(model, x_train, x_test, layer="dense_0")
    ```
    """
    _validation.check_int(batch_size, "batch_size", 1)
    _validation.check_float_dtype(dtype, allow_none=False)
    if layer is not None and not isinstance(layer, (str, keras.layers.Layer)) and not callable(
            layer):
        raise TypeError(
            "Expected `layer` to be None, a layer name, a layer of the model or a callable "
            f"x -> features. Received: layer={layer!r} of type {type(layer).__name__}"
        )
    x1, x2, n1, _ = host_inputs(x1, x2)
    if not getattr(model, "built", True):
        model(slice_examples(x1, 0, 1), training=False)
    features_of = _feature_function(model, layer)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype

    def features(x, n):
        parts = []

        def batch_features(start):
            out = features_of(slice_examples(x, start, min(start + batch_size, n)), training=False) \
                if isinstance(features_of, keras.Model) else \
                features_of(slice_examples(x, start, min(start + batch_size, n)))
            return [np.asarray(keras.ops.convert_to_numpy(out), np_dtype)]

        # Batches split across workers under a MultiWorkerMirroredStrategy.
        _distribute.run_host_tasks([(batch_features, (start,),
                                     lambda out: parts.append(out[0]))
                                    for start in range(0, n, batch_size)])
        return np.concatenate(parts, 0)

    phi1 = features(x1, n1)
    if x2 is None:
        phi2 = phi1
    else:
        phi2 = features(x2, num_examples(x2, "x2"))
    axes = OutputAxes(phi1.shape[1:], trace_axes, diagonal_axes)
    kernel = np.einsum(f"n{axes.sub1},m{axes.sub2}->nm{axes.out}", phi1, phi2)
    _validation.check_finite_result(
        kernel, "The empirical NNGP",
        "the features overflow or are undefined at some input (or the model's weights are "
        "not finite)")
    return kernel / axes.trace_size
