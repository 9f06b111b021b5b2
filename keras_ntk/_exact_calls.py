"""Exact replacements for Keras layers whose TensorFlow derivatives are wrong or missing.

The kernels vectorize gradients (pfor) and push tangents forward
(`tf.autodiff.ForwardAccumulator`, the double-VJP trick); `Linearize` does the
latter. Two kinds of Keras layers break these silently in TensorFlow 2.21:

* **Grouped convolutions** (Conv1D/2D/3D with `groups` > 1): the vectorized
  weight gradient of one grouped convolution op is wrong (pfor's rule for
  Conv2DBackpropFilter ignores the groups; outside XLA it fails, under XLA it
  returns wrong numbers). `grouped_conv` computes the layer as `groups`
  ungrouped convolutions of its channel slices, concatenated.
* **Resizing** (UpSampling2D other than "nearest", Resizing): TensorFlow marks
  ResizeBilinearGrad not differentiable, so forward mode and the double VJP
  drop every tangent through a bilinear resize (no error: the derivative of
  the weights before it comes out as zero), and other methods raise.
  `resize` applies the same linear map as two products with interpolation
  matrices, one per spatial axis (every TensorFlow resize method is separable;
  the matrices are TensorFlow's own resize of the identity).

While the kernels or `Linearize` trace a model, `exact_derivatives` replaces
such layers' `call` by these (the same function to float rounding), under
`PATCH_LOCK`, and restores them afterwards. `Linearize` keeps grouped
convolutions as they are: it does not vectorize, TensorFlow's forward mode of
the grouped op is right, and that of the split one fails under XLA (no
gradient for the XlaDynamicUpdateSlice of the slices' second derivative).
"""

import contextlib
import functools
import logging
import threading

import keras
import numpy as np
import tensorflow as tf

from keras_ntk._patches import causal_pad
from keras_ntk._weights import iter_layers

# Replacing a layer's `call` is process-global state: whoever replaces one holds this
# lock until the traced call is over (MirroredStrategy runs replicas in threads that
# may trace concurrently; `_structured.patched` and `exact_derivatives`).
PATCH_LOCK = threading.RLock()

_LOGGER = logging.getLogger("keras_ntk")
_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
# Ops whose gradient op TensorFlow 2.21 registers as not differentiable: forward mode and
# the double VJP drop the tangent through them without an error.
_NO_FORWARD_MODE = frozenset({"ResizeBilinear", "FakeQuantWithMinMaxArgs",
                              "FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel"})
_WARNED = set()  # (who, op type) pairs warned about
_CONV_CALLS = tuple(c.call for c in _CONVS)


def grouped_conv(layer, x, kernel, padding):
    """`layer`'s grouped convolution of `x` ('causal' padding already applied), as
    `groups` convolutions of its input channels' slices with its kernel's output
    slices, concatenated: the same sum, which TensorFlow differentiates correctly."""
    axis = -1 if layer.data_format == "channels_last" else 1
    pieces = zip(tf.split(x, layer.groups, axis=axis), tf.split(kernel, layer.groups, axis=-1))
    return tf.concat([keras.ops.conv(xg, kg, strides=list(layer.strides), padding=padding,
                                     dilation_rate=layer.dilation_rate,
                                     data_format=layer.data_format)
                      for xg, kg in pieces], axis)


def _grouped_call(layer, inputs, *args, **kwargs):
    """Keras' Conv call (causal padding, bias, activation) over `grouped_conv`."""
    x, padding = tf.convert_to_tensor(inputs), layer.padding
    if padding == "causal":
        x, padding = causal_pad(layer, x), "valid"
    z = grouped_conv(layer, x, layer.kernel, padding)
    if layer.use_bias:
        shape = ((1,) * (layer.rank + 1) + (layer.filters,) if layer.data_format == "channels_last"
                 else (1, layer.filters) + (1,) * layer.rank)
        z = z + tf.reshape(layer.bias, shape)
    return z if layer.activation is None else layer.activation(z)


@functools.lru_cache(maxsize=256)
def _interpolation(size_in, size_out, method, antialias):
    """(size_out, size_in) matrix of TensorFlow's 1-D resize (its resize of the identity)."""
    with tf.init_scope():  # eagerly, also while a function is traced
        basis = tf.eye(size_in, dtype=tf.float64)[:, :, None, None]
        out = tf.image.resize(basis, (size_out, 1), method=method, antialias=antialias)
        return np.asarray(out, np.float64)[:, :, 0, 0].T


def resize(x, size, method, antialias, data_format):
    """`tf.image.resize` of a batch of images as two matrix products (None when the
    spatial sizes are not static)."""
    x = tf.convert_to_tensor(x)
    h, w = (1, 2) if data_format == "channels_last" else (2, 3)
    if x.shape.rank != 4 or x.shape[h] is None or x.shape[w] is None:
        return None
    dtype = x.dtype if x.dtype.is_floating else tf.float32
    rh, rw = (tf.constant(_interpolation(int(n), int(m), method, antialias), dtype)
              for n, m in ((x.shape[h], size[0]), (x.shape[w], size[1])))
    x = tf.cast(x, dtype)
    if data_format == "channels_last":
        return tf.einsum("qw,npwc->npqc", rw, tf.einsum("ph,nhwc->npwc", rh, x))
    return tf.einsum("qw,ncpw->ncpq", rw, tf.einsum("ph,nchw->ncpw", rh, x))


def _upsampling_call(layer, inputs, *args, **kwargs):
    x = tf.convert_to_tensor(inputs)
    h, w = (1, 2) if layer.data_format == "channels_last" else (2, 3)
    out = None
    if x.shape.rank == 4 and x.shape[h] is not None and x.shape[w] is not None:
        size = (x.shape[h] * layer.size[0], x.shape[w] * layer.size[1])
        out = resize(x, size, layer.interpolation, False, layer.data_format)
    return type(layer).call(layer, inputs) if out is None else tf.cast(out, x.dtype)


def _resizing_call(layer, inputs, *args, **kwargs):
    if isinstance(inputs, (tf.Tensor, np.ndarray)) or keras.ops.is_tensor(inputs):
        x = tf.convert_to_tensor(inputs)
        if x.dtype.is_floating:
            out = resize(x, (layer.height, layer.width), layer.interpolation, layer.antialias,
                         layer.data_format)
            if out is not None:
                return tf.cast(out, x.dtype)
    return type(layer).call(layer, inputs, *args, **kwargs)  # dicts, unbatched images


def _replacement(layer, grouped):
    """The exact call replacing `layer`'s while derivatives are traced, or None."""
    if grouped and isinstance(layer, _CONVS) and getattr(layer, "groups", 1) > 1:
        if type(layer).call not in _CONV_CALLS:
            raise ValueError(
                f"Expected grouped convolutions to be Keras' own Conv1D/Conv2D/Conv3D: "
                f"TensorFlow's vectorized weight gradient of a grouped convolution is wrong, "
                f"so keras_ntk computes them one group at a time, which it cannot do for a "
                f"`call` of its own. Received: layer {layer.name!r} of class "
                f"{type(layer).__name__} with groups={layer.groups} and its own `call`. "
                f"Use groups=1, or Keras' own class.")
        return functools.partial(_grouped_call, layer)
    if (type(layer) is keras.layers.UpSampling2D and layer.interpolation != "nearest"):
        return functools.partial(_upsampling_call, layer)
    if (type(layer) is keras.layers.Resizing and layer.interpolation != "nearest"
            and not layer.crop_to_aspect_ratio and not layer.pad_to_aspect_ratio):
        return functools.partial(_resizing_call, layer)
    return None


@contextlib.contextmanager
def replaced_calls(replacements):
    """Replaces each (layer, fn)'s `call` by fn while inside, under `PATCH_LOCK`, and puts
    back what was there (Keras' own method, or an enclosing replacement) on the way out."""
    with PATCH_LOCK:
        saved = []
        try:
            for layer, fn in replacements:
                saved.append((layer, layer.__dict__.get("call")))
                object.__setattr__(layer, "call", fn)
            yield
        finally:
            for layer, old in reversed(saved):
                if old is None:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", old)


@contextlib.contextmanager
def exact_derivatives(model, grouped=True):
    """Traces `model`'s grouped convolutions (unless not `grouped`) and resizing layers
    through their exact replacements (see the module docstring).

    Each such layer's `call` is replaced for the duration of the call, under
    `PATCH_LOCK`; a layer whose `call` is replaced already (by an enclosing call,
    or a structured rule's recording call, which computes `grouped_conv` itself)
    is left as it is.
    """
    found = [(layer, fn) for layer in iter_layers(model)
             if "call" not in layer.__dict__ and (fn := _replacement(layer, grouped)) is not None]
    if not found:
        yield
        return
    with PATCH_LOCK:  # (whether a call is replaced already is read again under the lock)
        with replaced_calls([(layer, fn) for layer, fn in found
                             if "call" not in layer.__dict__]):
            yield


@contextlib.contextmanager
def forward_mode_watch(who):
    """Warns, once per `who` and op type, when the graph traced inside has an op whose
    derivative TensorFlow cannot push forward (`_NO_FORWARD_MODE`: the layers of
    `exact_derivatives` are replaced before they make one; this catches the others,
    e.g. `tf.image.resize` in a layer of the user's). Nothing in eager mode."""
    if tf.executing_eagerly():
        yield
        return
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    yield
    for op in graph.get_operations()[before:]:
        if op.type in _NO_FORWARD_MODE and (who, op.type) not in _WARNED:
            _WARNED.add((who, op.type))
            _LOGGER.warning(
                "keras_ntk: %s pushes derivatives forward through the model, and TensorFlow "
                "cannot do so through its op %r (type %s; TensorFlow marks its gradient not "
                "differentiable): the derivatives of the weights before it come out as zero, "
                "without an error. Keras' UpSampling2D and Resizing layers are computed "
                "without this op; use them instead%s.", who, op.name, op.type,
                ', or implementation="structured" or "jacobian"' if who.startswith("imp")
                else "")
