"""Infinite-width NNGP and NTK of a Keras model's architecture.

For a network built from `keras_ntk.NTKDense`/`NTKConv2D` layers (NTK
parameterization) whose hidden widths grow to infinity, the outputs at
initialization form a Gaussian process with covariance K (the NNGP kernel) and
the empirical NTK converges to a deterministic Θ (Jacot et al. 2018; Lee et al.
2019). Both follow from a layer-by-layer recursion, the same as neural-tangents
`stax` with `parameterization="ntk"`:

* input: K = x1·x2 / C (the mean over channels, positions kept), Θ = 0;
* dense (σw, σb): K' = σw² K + σb², Θ' = K' + σw² Θ;
* conv k_h×k_w: K'(p, q) = σw²/(k_h k_w) Σ_d K(p+d, q+d) + σb² (zero padding
  contributes zero), Θ'(p, q) = K'(p, q) + σw²/(k_h k_w) Σ_d Θ(p+d, q+d);
* activation φ applied to pre-activations (u, v) ~ N(0, [[k11, k12],
  [k12, k22]]): K' = E[φ(u)φ(v)], Θ' = Θ · E[φ'(u)φ'(v)], with for ReLU the
  arc-cosine kernel (Cho & Saul 2009), c = k12/√(k11 k22), θ = arccos c,
  E[φφ] = √(k11 k22)/(2π)·(sin θ + (π − θ) c), E[φ'φ'] = (π − θ)/(2π); and for
  Erf the arcsine kernel (Williams 1997), E[φφ] = 2/π·arcsin(2k12/√((1+2k11)
  (1+2k22))), E[φ'φ'] = 4/π / √((1+2k11)(1+2k22) − 4k12²);
* average pooling: the average of K over pairs of window positions;
  global average pooling: the average of K over all pairs of positions;
  Flatten: the average of K over the spatial diagonal p = q.

A convolutional kernel is a 4-D array per pair of inputs (positions of x1 ×
positions of x2). Only pooling needs the off-diagonal entries: layers after
the last pooling layer (a Flatten head) keep only the spatial diagonal
K(p, p), which is H·W times cheaper. Kernels are computed in blocks of pairs
of examples so that memory stays bounded. Large spatial kernels run through
XLA (`jit_compile`), which fuses each layer's elementwise chain into one loop
over a cache-sized block; arccos/arcsin are then fused polynomials (within 3
ulp), since the library calls cost more than the rest of a layer.

The mean-field quantities of deep networks (q*, c*, χ1, χc*, the depth
scales) are in `keras_ntk.mean_field`.
"""

import collections
import concurrent.futures
import math
import os

import keras
import numpy as np
import tensorflow as tf

from keras_ntk import _validation
from keras_ntk.layers import Erf, NTKConv2D, NTKDense

InfiniteKernels = collections.namedtuple("InfiniteKernels", ["nngp", "ntk"])
InfiniteKernels.__doc__ = """The infinite-width kernels of a model.

Attributes:
    nngp: numpy array (N1, N2), the NNGP kernel K(x1, x2): the covariance of
        the outputs of the randomly initialized infinite network.
    ntk: numpy array (N1, N2), the NTK Θ(x1, x2) (per output, the kernel is
        the identity across the output units).
"""

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

# Default working memory of one block of pairs (bytes).
_DEFAULT_MEMORY_BUDGET = 1 << 30
# Live arrays of the pair shape during one step of the recursion (estimate).
_LIVE_ARRAYS = 12


# ------------------------------------------------------------ architecture


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


def _same_padding(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


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


# ------------------------------------------------------------ recursion


def _spatial_axes(mode):
    return {"fcn": 0, "diag": 2, "full": 4}[mode]


def _shifted_sum(k, mode, spatial, kernel_size, strides, padding):
    """Σ_d K(p+d, q+d) over the kernel offsets d, for every output (p, q).

    The box of offsets is separable: the sum runs over the height offsets
    (shifting the height axes of both positions) and then over the width
    offsets, kh + kw shifted slices instead of kh·kw.
    """
    rank = k.shape.rank
    axes = ([rank - 4, rank - 2], [rank - 3, rank - 1]) if mode == "full" else (
        [rank - 2], [rank - 1])
    for dim in (0, 1):
        size, kk, ss = spatial[dim], kernel_size[dim], strides[dim]
        if padding == "same":
            out, before, after = _same_padding(size, kk, ss)
        else:
            out, before, after = (size - kk) // ss + 1, 0, 0
        if before or after:
            paddings = [(0, 0)] * rank
            for axis in axes[dim]:
                paddings[axis] = (before, after)
            k = tf.pad(k, paddings)
        total = None
        for d in range(kk):
            index = [slice(None)] * rank
            for axis in axes[dim]:
                index[axis] = slice(d, d + ss * (out - 1) + 1, ss)
            part = k[tuple(index)]
            total = part if total is None else total + part
        k = total
    return k


def _pool_matrix(size, k, s, padding, dtype):
    """Rows: output positions; entries 1/count over each window (pads excluded)."""
    if padding == "same":
        out, before, _ = _same_padding(size, k, s)
    else:
        out, before = (size - k) // s + 1, 0
    m = np.zeros((out, size))
    for i in range(out):
        start = i * s - before
        idx = [j for j in range(start, start + k) if 0 <= j < size]
        m[i, idx] = 1.0 / len(idx)
    return tf.constant(m, dtype)


def _diagonal(k, mode, spatial):
    """The spatial diagonal K(p, p) of a kernel in `mode`, shape (..., H, W)."""
    if mode != "full":
        return k
    h, w = spatial
    lead = tf.shape(k)[:-4]
    flat = tf.reshape(k, tf.concat([lead, [h * w, h * w]], 0))
    return tf.reshape(tf.linalg.diag_part(flat), tf.concat([lead, [h, w]], 0))


def _asin_coefficients(degree=12):
    """Coefficients c_j (j = 0..degree) of arcsin(x) ≈ x + x³ Σ_j c_j x^{2j} on |x| ≤ 1/2.

    g(s) = (arcsin(√s) − √s)/s^{3/2} = Σ_{k≥1} C(2k, k)/(4^k (2k+1)) s^{k−1} is
    evaluated by its Taylor series (80 terms: exact to rounding for s ≤ 1/4)
    at Chebyshev points of [0, 1/4] and interpolated by a polynomial of degree
    12 (degree 11 already gives arcsin within 1 ulp of numpy's on [0, 1/2]),
    half the terms of the truncated Taylor series.
    """
    taylor, central = [], 1.0
    for k in range(1, 81):
        central *= (2 * k - 1) / (2 * k)  # C(2k, k) / 4^k
        taylor.append(central / (2 * k + 1))

    def g(s):
        return np.polynomial.polynomial.polyval(s, taylor)

    fit = np.polynomial.Chebyshev.interpolate(g, degree, domain=[0.0, 0.25])
    return [float(c) for c in fit.convert(kind=np.polynomial.Polynomial).coef]


_ASIN_COEFFICIENTS = _asin_coefficients()


def _asin_small(x):
    """arcsin(x) for |x| ≤ 1/2 by a polynomial in x² (Horner), to rounding."""
    s = x * x
    p = tf.constant(_ASIN_COEFFICIENTS[-1], x.dtype)
    for coefficient in reversed(_ASIN_COEFFICIENTS[:-1]):
        p = p * s + coefficient
    return x + x * s * p


def _acos(c):
    """arccos(c) on [−1, 1] from elementwise arithmetic and one square root.

    TensorFlow's and XLA's CPU arccos/arcsin are scalar library calls (about
    27 ns per float64 on this machine, most of a convolutional kernel's time);
    this polynomial form is fused and vectorized by XLA (8× faster) and within
    3 ulp of numpy's arccos (2 measured, tests/test_infinite.py). Range
    reduction: |c| ≤ 1/2: π/2 − arcsin(c); c > 1/2: 2 arcsin(√((1 − c)/2));
    c < −1/2: π − 2 arcsin(√((1 + c)/2)).
    """
    magnitude = tf.abs(c)
    small = magnitude <= 0.5
    r = _asin_small(tf.where(small, c, tf.sqrt((1.0 - magnitude) * 0.5)))
    return tf.where(small, math.pi / 2 - r, tf.where(c > 0, 2.0 * r, math.pi - 2.0 * r))


def _asin(x):
    """arcsin(x) on [−1, 1] (see `_acos`); |x| > 1/2: π/2 − 2 arcsin(√((1 − |x|)/2))."""
    magnitude = tf.abs(x)
    small = magnitude <= 0.5
    r = _asin_small(tf.where(small, x, tf.sqrt((1.0 - magnitude) * 0.5)))
    return tf.where(small, r, tf.sign(x) * (math.pi / 2 - 2.0 * r))


def _relu(nngp, ntk, var1, var2, polynomial=False):
    """Arc-cosine kernel; `polynomial`: arccos by `_acos` (for XLA) instead of tf.acos."""
    norm = tf.sqrt(var1 * var2)
    cos = tf.clip_by_value(tf.math.divide_no_nan(nngp, norm), -1.0, 1.0)
    if polynomial:
        theta = _acos(cos)
        sin = tf.sqrt((1.0 - cos) * (1.0 + cos))
    else:
        theta = tf.acos(cos)
        sin = tf.sqrt(1.0 - cos * cos)
    nngp = norm / (2 * math.pi) * (sin + (math.pi - theta) * cos)
    ntk = ntk * ((math.pi - theta) / (2 * math.pi))
    return nngp, ntk


def _erf(nngp, ntk, var1, var2, polynomial=False):
    """Arcsine kernel; `polynomial`: arcsin by `_asin` (for XLA) instead of tf.asin."""
    d = (1.0 + 2.0 * var1) * (1.0 + 2.0 * var2)
    ratio = tf.clip_by_value(2.0 * nngp / tf.sqrt(d), -1.0, 1.0)
    new_nngp = (2.0 / math.pi) * (_asin(ratio) if polynomial else tf.asin(ratio))
    dot = (4.0 / math.pi) / tf.sqrt(tf.maximum(d - 4.0 * nngp * nngp, 0.0))
    return new_nngp, ntk * dot


def _propagate(steps, nngp, ntk, variances, activation_index=0, polynomial=False):
    """Runs the recursion on a kernel of any leading shape.

    `variances(i, nngp, mode, spatial)` returns (var1, var2) broadcastable to
    nngp: the self-covariances at each position for the i-th activation step.
    `ntk=None` stands for a zero NTK (before the first layer with weights),
    which saves its arithmetic.
    """
    previous_mode = steps[0][1] if steps else "fcn"
    for op, mode, spatial in steps:
        if previous_mode == "full" and mode == "diag":
            nngp = _diagonal(nngp, "full", spatial)
            ntk = None if ntk is None else _diagonal(ntk, "full", spatial)
        previous_mode = mode
        p = op.params
        if op.kind == "dense":
            nngp = p["w2"] * nngp + p["b2"]
            ntk = nngp if ntk is None else nngp + p["w2"] * ntk
        elif op.kind == "conv":
            scale = p["w2"] / (p["kernel_size"][0] * p["kernel_size"][1])
            args = (mode, spatial, p["kernel_size"], p["strides"], p["padding"])
            nngp = scale * _shifted_sum(nngp, *args) + p["b2"]
            ntk = nngp if ntk is None else nngp + scale * _shifted_sum(ntk, *args)
        elif op.kind in ("relu", "erf"):
            var1, var2 = variances(activation_index, nngp, mode, spatial)
            activation_index += 1
            fn = _relu if op.kind == "relu" else _erf
            nngp, ntk = fn(nngp, 0.0 if ntk is None else ntk, var1, var2, polynomial)
        elif op.kind == "avgpool":
            mh = _pool_matrix(spatial[0], p["pool_size"][0], p["strides"][0],
                              p["padding"], nngp.dtype)
            mw = _pool_matrix(spatial[1], p["pool_size"][1], p["strides"][1],
                              p["padding"], nngp.dtype)
            pool = lambda k: tf.einsum("...abcd,ia,jb,kc,ld->...ijkl", k, mh, mw, mh, mw)
            nngp, ntk = pool(nngp), None if ntk is None else pool(ntk)
        elif op.kind == "gap":
            gap = lambda k: tf.reduce_mean(k, axis=[-4, -3, -2, -1])
            nngp, ntk = gap(nngp), None if ntk is None else gap(ntk)
            previous_mode = "fcn"
        elif op.kind == "flatten":
            if mode != "fcn":
                flat = lambda k: tf.reduce_mean(_diagonal(k, mode, spatial), axis=[-2, -1])
                nngp, ntk = flat(nngp), None if ntk is None else flat(ntk)
            previous_mode = "fcn"
    return nngp, (tf.zeros_like(nngp) if ntk is None else ntk)


def _input_covariance(x1, x2, mode, outer):
    """K0 = x1·x2 / C; `outer`: all pairs (N1, N2, ...), else pairs i↔i (N, ...)."""
    channels = tf.cast(tf.shape(x1)[-1], x1.dtype)
    if mode == "fcn":
        if x1.shape.rank > 2:  # An image flattened first: mean over everything.
            x1 = tf.reshape(x1, [tf.shape(x1)[0], -1])
            x2 = tf.reshape(x2, [tf.shape(x2)[0], -1])
            channels = tf.cast(tf.shape(x1)[-1], x1.dtype)
        k = tf.matmul(x1, x2, transpose_b=True) if outer else tf.reduce_sum(x1 * x2, -1)
    elif mode == "full":
        equation = "ahwc,bijc->abhwij" if outer else "nhwc,nijc->nhwij"
        k = tf.einsum(equation, x1, x2)
    else:
        k = (tf.einsum("ahwc,bhwc->abhw", x1, x2) if outer
             else tf.reduce_sum(x1 * x2, -1))
    return k / channels


def _input_mode(steps):
    """Representation of the input covariance: that of the first step."""
    return steps[0][1] if steps else "fcn"


def _first_kernels(steps, x1, x2, outer):
    """NNGP after the first step(s) and the steps left to run.

    A first convolution is computed from image patches: K'(p, q) =
    σw²/(kh·kw·C) ⟨patch1(p), patch2(q)⟩ + σb², one matrix product instead of
    forming the input covariance of every pair of positions and shifting it.
    """
    mode = _input_mode(steps)
    if not steps or steps[0][0].kind != "conv":
        return _input_covariance(x1, x2, mode, outer), steps
    p = steps[0][0].params
    (kh, kw), (sh, sw) = p["kernel_size"], p["strides"]

    def patches(x):
        return tf.image.extract_patches(x, [1, kh, kw, 1], [1, sh, sw, 1], [1, 1, 1, 1],
                                        p["padding"].upper())

    p1, p2 = patches(x1), patches(x2)
    if mode == "full":
        k = tf.einsum("ahwk,bijk->abhwij" if outer else "nhwk,nijk->nhwij", p1, p2)
    else:
        k = tf.einsum("ahwk,bhwk->abhw", p1, p2) if outer else tf.reduce_sum(p1 * p2, -1)
    channels = tf.cast(tf.shape(x1)[-1], x1.dtype)
    return p["w2"] / (kh * kw * channels) * k + p["b2"], steps[1:]


def _self_variances(steps, x, polynomial=False):
    """Per-example self-covariances K(x, x)(p, p) before each activation step."""
    return _self_recursion(steps, x, polynomial)[0]


def _self_recursion(steps, x, polynomial=False):
    """The self-covariances before each activation, and K(x, x), Θ(x, x) (shape (N,)).

    Each activation reads its variances from the very kernel it transforms,
    so the correlation of an example with itself is exactly 1. The pair
    recursion computes the same entries with c = k12/√(k11 k22) rounded, and
    in the chaotic phase (c = 1 unstable) that error grows like χ1^depth.
    """
    nngp, rest = _first_kernels(steps, x, x, outer=False)
    records = []

    def variances(index, k, mode, spatial):
        var = _diagonal(k, mode, spatial)
        records.append(var)
        if mode == "full":
            return var[..., :, :, None, None], var[..., None, None, :, :]
        return var, var

    kernels = _propagate(rest, nngp, None if rest is steps else nngp, variances,
                         polynomial=polynomial)
    return records, kernels


def _broadcast_variances(vars1, vars2, steps, outer):
    """Provider of (var1, var2) for pairs built from per-example variances."""
    modes = [mode for op, mode, _ in steps if op.kind in ("relu", "erf")]

    def variances(index, k, mode, spatial):
        v1, v2 = vars1[index], vars2[index]
        if outer:  # v1: (b1, ...) -> (b1, 1, ...); v2: (b2, ...) -> (1, b2, ...)
            v1, v2 = v1[:, None], v2[None, :]
        if modes[index] == "full":
            v1, v2 = v1[..., :, :, None, None], v2[..., None, None, :, :]
        return v1, v2

    return variances


def _cross_kernels(steps, x1, x2, vars1, vars2, outer, polynomial=False):
    nngp, rest = _first_kernels(steps, x1, x2, outer)
    provider = _broadcast_variances(vars1, vars2, steps, outer)
    # After a first convolution Θ = K (the bias and weight terms of one layer).
    return _propagate(rest, nngp, None if rest is steps else nngp, provider,
                      polynomial=polynomial)


# Compiled recursions per architecture (the steps' repr), reused across calls.
_COMPILED = {}


def _compiled(steps):
    key = repr(steps)
    if key not in _COMPILED:
        _COMPILED[key] = _Compiled(steps)
    return _COMPILED[key]


class _Compiled:
    """tf.functions of one architecture (traced once per block shape).

    `xla()` gives the same functions compiled by XLA, with arccos/arcsin as
    fused polynomials (`_acos`, `_asin`): XLA fuses each layer's elementwise
    chain (arc-cosine kernel, shifted sums, pooling means) into loops over the
    block instead of writing every (block × positions²) intermediate to memory.
    Compiling takes seconds, so it pays only for large spatial kernels.
    """

    def __init__(self, steps, jit_compile=False):
        self.steps = steps
        self._xla = self if jit_compile else None
        options = dict(reduce_retracing=True, jit_compile=jit_compile)
        self.self_variances = tf.function(
            lambda x: _self_variances(steps, x, jit_compile), **options)
        self.self_recursion = tf.function(
            lambda x: _self_recursion(steps, x, jit_compile), **options)
        self.cross = tf.function(
            lambda x1, x2, v1, v2: _cross_kernels(steps, x1, x2, v1, v2, True, jit_compile),
            **options)
        self.pairwise = tf.function(
            lambda x1, x2, v1, v2: _cross_kernels(steps, x1, x2, v1, v2, False, jit_compile),
            **options)

    def xla(self):
        if self._xla is None:
            self._xla = _Compiled(self.steps, jit_compile=True)
        return self._xla


# Automatic XLA: when a call's spatial kernels hold more numbers than this
# (pairs of examples × positions or pairs of positions), compiling (3-5 s on
# the loaded 2-core machine) is worth it: XLA saved ~1e-7 s per number on GAP
# and ~2e-7 s on Flatten kernels (3× faster once compiled).
_XLA_MIN_ENTRIES = 1 << 26
# Bytes of one block's kernel on the XLA path (automatic batch_size).
_XLA_BLOCK_BYTES = 2 << 20
# Threads running compiled blocks side by side (at most the CPU count).
_XLA_WORKERS = 4


def _spatial_entries(steps, pairs):
    """Numbers in the largest per-pair kernel of the plan, times the pairs."""
    largest = 0
    for _, mode, spatial in steps:
        if mode == "full":
            largest = max(largest, (spatial[0] * spatial[1]) ** 2)
        elif mode == "diag":
            largest = max(largest, spatial[0] * spatial[1])
    return largest * pairs


def _pair_bytes(steps, input_shape, itemsize):
    """Bytes of one pair's kernel in the largest representation used."""
    largest = 1
    for _, mode, spatial in steps:
        if mode == "full":
            largest = max(largest, (spatial[0] * spatial[1]) ** 2)
        elif mode == "diag":
            largest = max(largest, spatial[0] * spatial[1])
    if len(input_shape) == 3:
        largest = max(largest, input_shape[2])
    return largest * itemsize


def _architecture(model, input_shape):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected `model` to be a keras.Model (Sequential or a chain functional "
            f"model). Received: model={model!r}"
        )
    return _plan(_model_ops(model), tuple(input_shape))


def _as_array(x, name, dtype):
    try:
        x = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected `{name}` to be an array of numbers. Received: {name}={x!r}"
        ) from None
    if x.ndim not in (2, 4) or x.shape[0] == 0:
        raise ValueError(
            f"Expected `{name}` of shape (N, features) or (N, height, width, channels) "
            f"with N ≥ 1. Received: {name}.shape={x.shape}"
        )
    return x


def _blocks(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _even_block(n, batch_size):
    """The block side ≤ batch_size that splits n into as few, equal blocks as possible."""
    count = -(-n // min(batch_size, n))
    return -(-n // count)


def _pad_examples(x, block):
    """x with zero examples appended up to a multiple of `block`."""
    extra = -len(x) % block
    if not extra:
        return x
    return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)], 0)


def infinite_kernels(model, x1, x2=None, *, batch_size=None, dtype="float64",
                     memory_budget=None, jit_compile=None):
    """Infinite-width NNGP and NTK of a model's architecture.

    The model is read as an architecture only (its widths and weights are
    ignored): hidden widths go to infinity under the NTK parameterization of
    `keras_ntk.NTKDense`/`NTKConv2D`. The kernels follow the recursion in the
    module docstring (neural-tangents `stax`, `parameterization="ntk"`):
    for a dense layer K' = σw² K + σb² and Θ' = K' + σw² Θ; for an activation
    K' = E[φ(u)φ(v)] and Θ' = Θ·E[φ'(u)φ'(v)] in closed form (arc-cosine kernel
    for ReLU, arcsine kernel for Erf); convolutions and pooling act on the
    spatial covariance.

    Cost: an FCN costs O(N1·N2·depth). A CNN keeps per pair of inputs the
    covariance between every position of x1 and every position of x2
    ((H·W)² numbers) up to the last pooling layer; after it (and throughout a
    CNN with a Flatten head and no pooling) only the H·W positions p = q are
    needed. Pairs are processed in blocks of `batch_size` × `batch_size`
    examples; with `x2=None` only blocks on and above the diagonal are
    computed.

    Args:
        model: a Sequential or chain functional Keras model made of
            `NTKDense`, `NTKConv2D`, `ReLU`/`Activation("relu")`, `Erf`,
            identity/linear, `AveragePooling2D`, `GlobalAveragePooling2D`,
            `Flatten` (nested such models allowed). Any other layer raises a
            ValueError naming it.
        x1: array (N1, features) or (N1, height, width, channels).
        x2: array with N2 examples, or None for x1.
        batch_size: examples per block side; None picks the largest block
            whose working memory fits `memory_budget` (with XLA: at most a
            2 MiB kernel per block, which stays in cache).
        dtype: "float64" (default) or "float32", the dtype of the computation.
        memory_budget: bytes for one block's working memory (default 1 GiB).
        jit_compile: compile the recursion with XLA (arccos/arcsin then
            evaluated by fused polynomials within 3 ulp, see `_acos`). None
            (default) does so when the spatial kernels of the call hold more
            than 2²⁶ numbers (on 8×8 images: a GAP head beyond ~180 examples,
            a Flatten head beyond ~1450), where it is about 3× faster;
            compiling takes a few seconds, so small calls run uncompiled.

    Returns:
        `InfiniteKernels(nngp, ntk)`, two numpy arrays of shape (N1, N2).

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras_ntk.NTKConv2D(1, 3, weight_std=1.4, bias_std=0.1),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras_ntk.NTKDense(1, weight_std=1.4, bias_std=0.1),
    ])
    x = np.random.normal(size=(20, 8, 8, 1))
    kernels = keras_ntk.infinite_kernels(model, x)  # .nngp, .ntk: (20, 20)
    ```
    """
    if dtype not in ("float64", "float32", tf.float64, tf.float32, np.float64, np.float32):
        raise ValueError(f"Expected `dtype` 'float64' or 'float32'. Received: dtype={dtype}")
    np_dtype = np.dtype(tf.as_dtype(dtype).as_numpy_dtype)
    x1 = _as_array(x1, "x1", np_dtype)
    same = x2 is None
    x2 = x1 if same else _as_array(x2, "x2", np_dtype)
    _validation.check_finite(x1, "x1")
    _validation.check_finite(None if same else x2, "x2")
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            "Expected x1 and x2 with the same example shape. "
            f"Received: x1.shape={x1.shape}, x2.shape={x2.shape}"
        )
    steps = _architecture(model, x1.shape[1:])
    n1, n2 = len(x1), len(x2)
    if jit_compile is None:
        pairs = n1 * (n1 + 1) // 2 if same else n1 * n2
        jit_compile = _spatial_entries(steps, pairs) > _XLA_MIN_ENTRIES
    elif not isinstance(jit_compile, bool):
        raise TypeError(
            "Expected `jit_compile` to be None, True or False. "
            f"Received: jit_compile={jit_compile!r}"
        )
    if batch_size is None:
        budget = _DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        pair = _pair_bytes(steps, x1.shape[1:], np_dtype.itemsize)
        batch_size = max(1, int(math.isqrt(max(budget // (pair * _LIVE_ARRAYS), 1))))
        if jit_compile:
            # XLA's fused passes over a block run faster while a block's kernel
            # stays in cache (measured: blocks of 6-8 pairs of 8×8 images, 2 MiB,
            # 1.5× faster than 52, 88 MiB).
            cached = max(1, int(math.isqrt(max(_XLA_BLOCK_BYTES // pair, 1))))
            batch_size = min(batch_size, cached)
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"Expected `batch_size` to be a positive int or None. Received: batch_size={batch_size}"
        )
    compiled = _compiled(steps)
    if jit_compile:
        compiled = compiled.xla()
    # Every block has the same shape (inputs padded with zero examples, whose
    # rows and columns are dropped) so that XLA compiles the block once; the
    # block side is evened out over the blocks to keep the padding small.
    b1, b2 = _even_block(n1, batch_size), _even_block(n2, batch_size)
    if same:
        b2 = b1
    x1 = _pad_examples(x1, b1)
    x2 = x1 if same else _pad_examples(x2, b2)
    # Self-covariances per example (the blocks of pairs read them), computed in
    # chunks of about batch_size² examples, a multiple of the block side.

    def self_terms(x, block):
        """Per-example variances before each activation, and the diagonal kernels."""
        chunk = max(batch_size * batch_size // block, 1) * block
        parts = [compiled.self_recursion(tf.constant(x[a:b])) for a, b in _blocks(len(x), chunk)]
        records = [p[0] for p in parts]
        variances = ([] if not records or not records[0] else
                     [tf.concat([r[i] for r in records], 0) for i in range(len(records[0]))])
        diagonal = [np.concatenate([p[1][i].numpy() for p in parts]) if parts
                    else np.zeros(0, np_dtype) for i in range(2)]
        return variances, diagonal

    vars1, diagonal = self_terms(x1, b1)
    vars2 = vars1 if same else self_terms(x2, b2)[0]
    nngp = np.zeros((len(x1), len(x2)), np_dtype)
    ntk = np.zeros((len(x1), len(x2)), np_dtype)
    rows = _blocks(len(x1), b1)
    cols = rows if same else _blocks(len(x2), b2)
    blocks = [(r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)
              if not same or j >= i]

    def compute(block):
        (r0, r1), (c0, c1) = block
        k, t = compiled.cross(
            tf.constant(x1[r0:r1]), tf.constant(x2[c0:c1]),
            [v[r0:r1] for v in vars1], [v[c0:c1] for v in vars2])
        nngp[r0:r1, c0:c1] = k.numpy()
        ntk[r0:r1, c0:c1] = t.numpy()
        if same and (r0, r1) != (c0, c1):
            nngp[c0:c1, r0:r1] = nngp[r0:r1, c0:c1].T
            ntk[c0:c1, r0:r1] = ntk[r0:r1, c0:c1].T

    if jit_compile and len(blocks) > 1:
        # A compiled cache-sized block keeps about 1.4 cores busy: run blocks
        # side by side (disjoint slices of the results; TensorFlow releases
        # the GIL while it computes).
        workers = min(_XLA_WORKERS, os.cpu_count() or 1, len(blocks))
        with concurrent.futures.ThreadPoolExecutor(workers) as executor:
            for _ in executor.map(compute, blocks):
                pass
    else:
        for block in blocks:
            compute(block)
    if same:
        # The diagonal from the self recursion (exact c = 1; see _self_recursion).
        index = np.arange(len(x1))
        nngp[index, index], ntk[index, index] = diagonal
    nngp, ntk = nngp[:n1, :n2], ntk[:n1, :n2]
    return InfiniteKernels(nngp, ntk)


def _pairwise_kernels(compiled, x1, x2):
    """Kernels of the pairs (x1[i], x2[i]) as tensors of shape (N,)."""
    v1 = compiled.self_variances(x1)
    v2 = compiled.self_variances(x2)
    return compiled.pairwise(x1, x2, v1, v2)


# ------------------------------------------------------------ tfp kernel


def _make_psd_kernel_class():
    import tensorflow_probability as tfp  # Lazy: heavy, and needs tf_keras.

    class NTKPsdKernel(tfp.math.psd_kernels.PositiveSemidefiniteKernel):
        """The infinite-width NTK or NNGP of a model as a tfp PSD kernel.

        The kernel plugs into `tfp.distributions.GaussianProcess` and
        `GaussianProcessRegressionModel`: the posterior of a GP with the NNGP
        kernel is Bayesian inference with the infinite network; with the NTK
        its mean is the infinite network trained to convergence by gradient
        descent on MSE (when the initial outputs are zero).

        Args:
            model: an architecture supported by `keras_ntk.infinite_kernels`.
            kind: "ntk" (default) or "nngp".
            input_shape: the example shape, default the model's input shape.
            dtype: "float64" (default) or "float32".
            name: the kernel's name.

        Example:

        ```python
        kernel = keras_ntk.infinite.NTKPsdKernel(model, kind="nngp")
        gp = tfp.distributions.GaussianProcessRegressionModel(
            kernel, index_points=x_test, observation_index_points=x_train,
            observations=y_train, observation_noise_variance=1e-2)
        mean = gp.mean()
        ```
        """

        def __init__(self, model, kind="ntk", input_shape=None, dtype="float64",
                     name="NTKPsdKernel"):
            parameters = dict(locals())
            if kind not in ("ntk", "nngp"):
                raise ValueError(f"Expected `kind` 'ntk' or 'nngp'. Received: kind={kind!r}")
            if input_shape is None:
                input_shape = tuple(model.input_shape[1:])
            self._model = model
            self._kind = kind
            self._example_shape = tuple(input_shape)
            self._compiled = _compiled(_architecture(model, self._example_shape))
            super().__init__(feature_ndims=len(self._example_shape),
                             dtype=tf.as_dtype(dtype), name=name, parameters=parameters)

        @classmethod
        def _parameter_properties(cls, dtype):
            return dict()

        def _pick(self, kernels):
            return kernels[1] if self._kind == "ntk" else kernels[0]

        def _apply(self, x1, x2, example_ndims=0):
            x1 = tf.convert_to_tensor(x1, self.dtype)
            x2 = tf.convert_to_tensor(x2, self.dtype)
            shape = tf.broadcast_dynamic_shape(tf.shape(x1), tf.shape(x2))
            x1 = tf.broadcast_to(x1, shape)
            x2 = tf.broadcast_to(x2, shape)
            lead = shape[:-self.feature_ndims]
            flat = tf.concat([[-1], shape[-self.feature_ndims:]], 0)
            values = self._pick(_pairwise_kernels(
                self._compiled, tf.reshape(x1, flat), tf.reshape(x2, flat)))
            return tf.reshape(values, lead)

        def _matrix(self, x1, x2):
            x1 = tf.convert_to_tensor(x1, self.dtype)
            x2 = tf.convert_to_tensor(x2, self.dtype)
            if x1.shape.rank != self.feature_ndims + 1 or x2.shape.rank != self.feature_ndims + 1:
                return super()._matrix(x1, x2)
            v1 = self._compiled.self_variances(x1)
            v2 = self._compiled.self_variances(x2)
            return self._pick(self._compiled.cross(x1, x2, v1, v2))

    return NTKPsdKernel


def __getattr__(name):
    if name == "NTKPsdKernel":
        cls = _make_psd_kernel_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
