"""The layer-by-layer recursion of the infinite-width NNGP and NTK (pure tensor maths).

The equations are in `keras_ntk.infinite`'s docstring. A plan is a list of
(op, mode, spatial) from `keras_ntk.infinite._plan`; kernels have any leading
shape (a block of pairs of examples, or pairs i↔i), then nothing ("fcn"), the
spatial diagonal (H, W) ("diag") or positions × positions (H, W, H, W)
("full"). The compiled form (tf.functions per architecture structure, σ
values as arguments, a bounded cache) is at the end; `keras_ntk.infinite`
runs it in blocks.
"""

import collections
import math

import numpy as np
import tensorflow as tf

from keras_ntk._arcsine import _acos, _asin
from keras_ntk._kernel_plan import _input_mode, _Op, _same_padding


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


def _relu(nngp, ntk, var1, var2, polynomial=False, separable=False):
    """Arc-cosine kernel; `polynomial`: arccos by `_acos` (for XLA) instead of tf.acos.

    `separable` (pairs of different examples, var1 and var2 broadcast from per-example
    variances): with `polynomial`, c = k12·(1/√k11)·(1/√k22) from the per-example
    factors, one square root and one division fewer per entry in XLA's fused loop
    (the ReLU 30% faster on a Flatten head's diagonal kernels; not used on full
    position × position covariances, where it was slower). Not for an example with
    itself, where c must be exactly 1.
    """
    if polynomial and separable:
        root1, root2 = tf.sqrt(var1), tf.sqrt(var2)
        inverse1 = tf.math.divide_no_nan(tf.ones_like(root1), root1)
        inverse2 = tf.math.divide_no_nan(tf.ones_like(root2), root2)
        norm = root1 * root2
        cos = tf.clip_by_value(nngp * inverse1 * inverse2, -1.0, 1.0)
    else:
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


def _abrelu(nngp, ntk, var1, var2, a, b, polynomial=False, separable=False):
    """φ(x) = a·min(x, 0) + b·max(x, 0) (LeakyReLU: a = slope, b = 1).

    φ = b·relu(x) − a·relu(−x), so E[φ(u)φ(v)] = (a² + b²)R(c) − 2ab·R(−c)
    with R the ReLU kernel, R(c) − R(−c) = k12/2; E[φ'φ'] = (a² + b²)(π − θ)/(2π)
    + 2ab·θ/(2π).
    """
    relu_k, relu_t = _relu(nngp, tf.ones_like(nngp), var1, var2, polynomial, separable)
    new_nngp = (a - b) ** 2 * relu_k + a * b * nngp
    dot = (a * a + b * b) * relu_t + 2 * a * b * (0.5 - relu_t)
    return new_nngp, ntk * dot


def _erf(nngp, ntk, var1, var2, polynomial=False):
    """Arcsine kernel; `polynomial`: arcsin by `_asin` (for XLA) instead of tf.asin."""
    d = (1.0 + 2.0 * var1) * (1.0 + 2.0 * var2)
    ratio = tf.clip_by_value(2.0 * nngp / tf.sqrt(d), -1.0, 1.0)
    new_nngp = (2.0 / math.pi) * (_asin(ratio) if polynomial else tf.asin(ratio))
    dot = (4.0 / math.pi) / tf.sqrt(tf.maximum(d - 4.0 * nngp * nngp, 0.0))
    return new_nngp, ntk * dot


def _sign(nngp, ntk, var1, var2, polynomial=False):
    """E[sign u sign v] = 2/π·arcsin(c); the derivative is 0 almost everywhere (Θ' = 0)."""
    c = tf.clip_by_value(tf.math.divide_no_nan(nngp, tf.sqrt(var1 * var2)), -1.0, 1.0)
    return (2.0 / math.pi) * (_asin(c) if polynomial else tf.asin(c)), tf.zeros_like(nngp)


def _sin_cos(nngp, ntk, var1, var2, kind):
    """E[sin u sin v] = e^{−(k11+k22)/2} sinh k12, E[cos u cos v] = e^{…} cosh k12."""
    damping = tf.exp(-0.5 * (var1 + var2))
    odd, even = damping * tf.sinh(nngp), damping * tf.cosh(nngp)
    return (odd, ntk * even) if kind == "sin" else (even, ntk * odd)


def _numerical(nngp, ntk, var1, var2, fn, deg):
    """E[φ(u)φ(v)], E[φ'(u)φ'(v)] by Gauss-Hermite quadrature on the 2-D Gaussian.

    As neural-tangents' ElementwiseNumerical: u = √(2k11)·x, v = k12/√(k11/2)·x
    + √(2(k22 − k12²/k11))·y over the deg × deg product rule (weights w_i w_j/π);
    φ' by automatic differentiation. The outer sum is a Python loop, so memory
    is deg times the kernel's.
    """
    nodes, weights = np.polynomial.hermite.hermgauss(deg)
    dtype = nngp.dtype
    var1 = var1 + tf.zeros_like(nngp)
    var2 = var2 + tf.zeros_like(nngp)
    safe1 = tf.maximum(var1, 1e-30)
    residual = tf.sqrt(tf.maximum(2.0 * (var2 - nngp * nngp / safe1), 0.0))[..., None]
    scale_u = tf.sqrt(2.0 * var1)[..., None]
    slope = (nngp / tf.sqrt(safe1 / 2.0))[..., None]
    y = tf.constant(nodes, dtype)
    wy = tf.constant(weights, dtype)

    def values(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            f = tf.cast(fn(z), dtype)
        return f, tape.gradient(f, z)

    new_nngp, dot = 0.0, 0.0
    for xi, wi in zip(nodes, weights):
        fu, du = values(scale_u * xi)
        fv, dv = values(slope * xi + residual * y)
        new_nngp += wi * tf.reduce_sum(wy * fu * fv, -1)
        dot += wi * tf.reduce_sum(wy * du * dv, -1)
    return new_nngp / math.pi, ntk * dot / math.pi


def _pool(k, mode, spatial, p):
    mh = _pool_matrix(spatial[0], p["pool_size"][0], p["strides"][0], p["padding"], k.dtype)
    mw = _pool_matrix(spatial[1], p["pool_size"][1], p["strides"][1], p["padding"], k.dtype)
    return tf.einsum("...abcd,ia,jb,kc,ld->...ijkl", k, mh, mw, mh, mw)


_VARIANCE_STEPS = ("relu", "erf", "abrelu", "sign", "sin", "cos", "numerical", "layernorm")


def _activation(op, nngp, ntk, var1, var2, polynomial, separable=False):
    p = op.params
    ntk = 0.0 if ntk is None else ntk
    if op.kind == "relu":
        return _relu(nngp, ntk, var1, var2, polynomial, separable)
    if op.kind == "erf":
        return _erf(nngp, ntk, var1, var2, polynomial)
    if op.kind == "abrelu":
        return _abrelu(nngp, ntk, var1, var2, p["a"], p["b"], polynomial, separable)
    if op.kind == "sign":
        return _sign(nngp, ntk, var1, var2, polynomial)
    if op.kind in ("sin", "cos"):
        return _sin_cos(nngp, ntk, var1, var2, op.kind)
    if op.kind == "numerical":
        return _numerical(nngp, ntk, var1, var2, p["fn"], p["deg"])
    # LayerNorm over features of centred inputs (neural-tangents' LayerNorm).
    norm = tf.sqrt((var1 + p["eps"]) * (var2 + p["eps"]))
    return nngp / norm, ntk / norm


def _step(op, mode, spatial, inputs, variances, index, polynomial, separable=False):
    """One step on its input values [(K, Θ or None)]: returns (K, Θ or None)."""
    p = op.params
    nngp, ntk = inputs[0]
    if op.kind in ("dense", "affine", "conv"):
        if op.kind == "conv":
            area = p["kernel_size"][0] * p["kernel_size"][1]
            args = (mode, spatial, p["kernel_size"], p["strides"], p["padding"])
            shift = lambda k: _shifted_sum(k, *args) / area
        else:
            shift = lambda k: k
        s = shift(nngp)
        own = p["tw"] * s + p["tb"]
        new_nngp = p["w2"] * s + p["b2"]
        return new_nngp, own if ntk is None else own + p["w2"] * shift(ntk)
    if op.kind in _VARIANCE_STEPS:
        var1, var2 = variances(index, nngp, mode, spatial)
        # Not on full covariances: there XLA fused the per-example factors badly
        # (a residual CNN's blocks 2.5× slower, measured).
        separable = separable and mode != "full"
        return _activation(op, nngp, ntk, var1, var2, polynomial, separable)
    if op.kind == "avgpool":
        return _pool(nngp, mode, spatial, p), None if ntk is None else _pool(ntk, mode, spatial, p)
    if op.kind == "gap":
        gap = lambda k: tf.reduce_mean(k, axis=[-4, -3, -2, -1])
        return gap(nngp), None if ntk is None else gap(ntk)
    if op.kind == "flatten":
        if mode == "fcn":
            return nngp, ntk
        flat = lambda k: tf.reduce_mean(_diagonal(k, mode, spatial), axis=[-2, -1])
        return flat(nngp), None if ntk is None else flat(ntk)
    weights = p["weights"] if op.kind == "concat" else [p["scale"]] * len(inputs)
    new_nngp = tf.add_n([w * k for w, (k, _) in zip(weights, inputs)])
    ntks = [w * t for w, (_, t) in zip(weights, inputs) if t is not None]
    return new_nngp, tf.add_n(ntks) if ntks else None


def _propagate(steps, values, variances, polynomial=False, depths=None, start=0,
               separable=False):
    """Runs the recursion (a graph in topological order) on kernels of any leading shape.

    `values`: {step index: (K, Θ or None, mode)}, −1 the input; `Θ = None`
    stands for a zero NTK (before the first layer with weights), which saves
    its arithmetic. `variances(i, nngp, mode, spatial)` returns (var1, var2)
    broadcastable to nngp, the self-covariances at each position for the i-th
    step that needs them. Values are dropped after their last use. `depths`: a
    list that receives (K, Θ) at the output of every dense layer on flat
    kernels (`all_depths`). `separable`: the variances are per-example ones
    broadcast to pairs of different examples (`_relu`). Returns the last step's (K, Θ).
    """
    last_use = {}
    for i, (op, _, _) in enumerate(steps):
        for j in op.inputs:
            last_use[j] = i
    index = sum(op.kind in _VARIANCE_STEPS for op, _, _ in steps[:start])
    for i in range(start, len(steps)):
        op, mode, spatial = steps[i]
        inputs = []
        for j in op.inputs:
            nngp, ntk, held = values[j]
            if held == "full" and mode == "diag":
                nngp = _diagonal(nngp, "full", spatial)
                ntk = None if ntk is None else _diagonal(ntk, "full", spatial)
            inputs.append((nngp, ntk))
        nngp, ntk = _step(op, mode, spatial, inputs, variances, index, polynomial, separable)
        index += op.kind in _VARIANCE_STEPS
        out_mode = "fcn" if op.kind in ("gap", "flatten") else mode
        values[i] = (nngp, ntk, out_mode)
        if depths is not None and op.kind == "dense" and mode == "fcn":
            depths.append((nngp, tf.zeros_like(nngp) if ntk is None else ntk))
        for j in set(op.inputs):
            if last_use.get(j) == i:
                del values[j]
    nngp, ntk, _ = values[len(steps) - 1] if steps else values[-1]
    return nngp, (tf.zeros_like(nngp) if ntk is None else ntk)


def _as_image(x):
    """1-D inputs (N, length, C) as (N, 1, length, C)."""
    return x[:, None] if x.shape.rank == 3 else x


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


def _first_kernels(steps, x1, x2, outer):
    """The values before the graph runs and the index of the first step left.

    A first convolution that alone reads the input is computed from image
    patches: S(K)(p, q) = ⟨patch1(p), patch2(q)⟩/(kh·kw·C), one matrix product
    instead of forming the input covariance of every pair of positions and
    shifting it.
    """
    x1, x2 = _as_image(x1), _as_image(x2)
    mode = _input_mode(steps)
    readers = [i for i, (op, _, _) in enumerate(steps) if -1 in op.inputs]
    if not steps or steps[0][0].kind != "conv" or readers != [0]:
        return {-1: (_input_covariance(x1, x2, mode, outer), None, mode)}, 0
    op, mode, _ = steps[0]
    p = op.params
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
    s = k / (kh * kw * channels)
    return {0: (p["w2"] * s + p["b2"], p["tw"] * s + p["tb"], mode)}, 1


def _self_recursion(steps, x, polynomial=False, all_depths=False):
    """The self-covariances before each activation, and K(x, x), Θ(x, x) (shape (N,)).

    Each activation reads its variances from the very kernel it transforms,
    so the correlation of an example with itself is exactly 1. The pair
    recursion computes the same entries with c = k12/√(k11 k22) rounded, and
    in the chaotic phase (c = 1 unstable) that error grows like χ1^depth.
    `all_depths`: K and Θ at every dense layer's output, shape (depths, N).
    """
    values, start = _first_kernels(steps, x, x, outer=False)
    records = []

    def variances(index, k, mode, spatial):
        var = _diagonal(k, mode, spatial)
        records.append(var)
        if mode == "full":
            return var[..., :, :, None, None], var[..., None, None, :, :]
        return var, var

    depths = [] if all_depths else None
    kernels = _propagate(steps, values, variances, polynomial, depths, start)
    return records, _stack(depths) if all_depths else kernels


def _stack(depths):
    return tf.stack([k for k, _ in depths]), tf.stack([t for _, t in depths])


def _broadcast_variances(vars1, vars2, steps, outer):
    """Provider of (var1, var2) for pairs built from per-example variances."""
    modes = [mode for op, mode, _ in steps if op.kind in _VARIANCE_STEPS]

    def variances(index, k, mode, spatial):
        v1, v2 = vars1[index], vars2[index]
        if outer:  # v1: (b1, ...) -> (b1, 1, ...); v2: (b2, ...) -> (1, b2, ...)
            v1, v2 = v1[:, None], v2[None, :]
        if modes[index] == "full":
            v1, v2 = v1[..., :, :, None, None], v2[..., None, None, :, :]
        return v1, v2

    return variances


def _cross_kernels(steps, x1, x2, vars1, vars2, outer, polynomial=False, all_depths=False):
    values, start = _first_kernels(steps, x1, x2, outer)
    provider = _broadcast_variances(vars1, vars2, steps, outer)
    depths = [] if all_depths else None
    kernels = _propagate(steps, values, provider, polynomial, depths, start, separable=True)
    return _stack(depths) if all_depths else kernels


# ------------------------------------------------------------ compiled recursions

_WEIGHTED = ("dense", "conv", "affine")
_NUMBERS = ("w2", "b2", "tw", "tb")


def _variances_of(steps):
    """(σw², σb², tw, tb) of every step with weights, an (n, 4) float64 array."""
    rows = [[op.params[k] for k in _NUMBERS] for op, _, _ in steps if op.kind in _WEIGHTED]
    return np.array(rows, np.float64).reshape(-1, 4)


def _structure(steps):
    """The plan without its variances: the compile-cache key."""
    return repr([(op.kind, op.inputs, {k: v for k, v in op.params.items() if k not in _NUMBERS},
                  mode, spatial) for op, mode, spatial in steps])


def _bind(steps, variances):
    """The steps with σw², σb² read from the (n, 2) tensor `variances`."""
    bound, i = [], 0
    for op, mode, spatial in steps:
        if op.kind in _WEIGHTED:
            inputs = op.inputs
            op = _Op(op.kind, **{**op.params, **{k: variances[i, n] for n, k in enumerate(_NUMBERS)}})
            op.inputs = inputs
            i += 1
        bound.append((op, mode, spatial))
    return bound


# Compiled recursions per architecture *structure*: σw², σb² are arguments, so
# a phase diagram over σ reuses one compiled set per depth. Least recently used
# structures beyond the bound are dropped (their tf.functions are then freed).
_COMPILED = collections.OrderedDict()
_COMPILED_LIMIT = 16


def _compiled(steps):
    """The compiled recursions of `steps`, bound to its variances."""
    key = _structure(steps)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
    else:
        _COMPILED[key] = _Compiled(steps)
        while len(_COMPILED) > _COMPILED_LIMIT:
            _COMPILED.popitem(last=False)
    return _Bound(_COMPILED[key], _variances_of(steps))


class _Compiled:
    """tf.functions of one architecture structure (traced once per block shape).

    Every function takes the (n, 2) tensor of (σw², σb²) per weighted layer
    first. `xla()` gives the same functions compiled by XLA, with
    arccos/arcsin as fused polynomials (`_acos`, `_asin`): XLA fuses each
    layer's elementwise chain (arc-cosine kernel, shifted sums, pooling means)
    into loops over the block instead of writing every (block × positions²)
    intermediate to memory. Compiling takes seconds, so it pays only for large
    spatial kernels.
    """

    def __init__(self, steps, jit_compile=False, eager=False):
        self.steps = steps
        self._xla = self if jit_compile else None
        self._eager = self if eager else None
        # No autograph: the recursion has no tensor-dependent control flow, and
        # converting its Python was ~90% of a trace (6.8 of 7.2 s, cnn2_flatten).
        options = dict(reduce_retracing=True, jit_compile=jit_compile, autograph=False)

        def function(fn):
            return fn if eager else tf.function(fn, **options)

        polynomial = jit_compile
        self.self_recursion = function(
            lambda s, x: _self_recursion(_bind(steps, s), x, polynomial))
        self.self_recursion_depths = function(
            lambda s, x: _self_recursion(_bind(steps, s), x, polynomial, True))
        self.cross = function(lambda s, x1, x2, v1, v2: _cross_kernels(
            _bind(steps, s), x1, x2, v1, v2, True, polynomial))
        self.cross_depths = function(lambda s, x1, x2, v1, v2: _cross_kernels(
            _bind(steps, s), x1, x2, v1, v2, True, polynomial, True))
        self.pairwise = function(lambda s, x1, x2, v1, v2: _cross_kernels(
            _bind(steps, s), x1, x2, v1, v2, False, polynomial))

    def xla(self):
        if self._xla is None:
            self._xla = _Compiled(self.steps, jit_compile=True)
        return self._xla

    def eager(self):
        """The same functions run op by op (no tracing: seconds saved on small kernels)."""
        if self._eager is None:
            self._eager = _Compiled(self.steps, eager=True)
        return self._eager


class _Bound:
    """A `_Compiled` with the variances of one model: calls pass them as a tensor."""

    def __init__(self, compiled, variances):
        self.compiled, self.variances = compiled, variances

    def xla(self):
        return _Bound(self.compiled.xla(), self.variances)

    def eager(self):
        return _Bound(self.compiled.eager(), self.variances)

    def _s(self, x):
        return tf.constant(self.variances, tf.as_dtype(x.dtype))

    def self_recursion(self, x, all_depths=False):
        fn = self.compiled.self_recursion_depths if all_depths else self.compiled.self_recursion
        return fn(self._s(x), x)

    def self_variances(self, x):
        return self.compiled.self_recursion(self._s(x), x)[0]

    def cross(self, x1, x2, v1, v2, all_depths=False):
        fn = self.compiled.cross_depths if all_depths else self.compiled.cross
        return fn(self._s(x1), x1, x2, v1, v2)

    def pairwise(self, x1, x2, v1, v2):
        return self.compiled.pairwise(self._s(x1), x1, x2, v1, v2)
