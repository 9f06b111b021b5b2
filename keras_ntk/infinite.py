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

import numpy as np
import tensorflow as tf

from keras_ntk import _distribute, _validation
from keras_ntk._batching import block_ranges
from keras_ntk._kernel_plan import _architecture, unsupported_layers
from keras_ntk._kernel_recursion import _compiled
from keras_ntk.monte_carlo import clone_sampler, monte_carlo_kernels

class InfiniteKernels(collections.namedtuple("InfiniteKernels", ["nngp", "ntk"])):
    """The infinite-width kernels of a model.

    Attributes:
        nngp: numpy array (N1, N2), the NNGP kernel K(x1, x2): the covariance of
            the outputs of the randomly initialized infinite network.
        ntk: numpy array (N1, N2), the NTK Θ(x1, x2) (per output, the kernel is
            the identity across the output units).
        monte_carlo_layers: names of the layers without a closed form that made
            the kernels a Monte-Carlo estimate (`fallback="monte_carlo"`); () if exact.
        nngp_stderr, ntk_stderr: standard errors of a Monte-Carlo estimate (else None).
    """

    monte_carlo_layers = ()
    nngp_stderr = ntk_stderr = None

# Default working memory of one block of pairs (bytes).
_DEFAULT_MEMORY_BUDGET = 1 << 30
# Live arrays of the pair shape during one step of the recursion (estimate).
_LIVE_ARRAYS = 12


# Automatic XLA: when a call's spatial kernels hold more numbers than this
# (pairs of examples × positions or pairs of positions) it is compiled by XLA,
# which fuses each layer's elementwise chain (2-3× faster once compiled). Its
# first call costs about as much as the uncompiled graph's (tracing, graph
# optimization), so XLA takes over where eager execution stops.
_XLA_MIN_ENTRIES = 1 << 22
# Smaller calls (numbers in the kernels of all pairs, as `_spatial_entries`)
# run op by op: tracing the recursion into a graph takes 1-10 s, which is all
# of a small call's time (a 5-image residual CNN: 0.2 s instead of 4 s).
_EAGER_MAX_ENTRIES = 1 << 22
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


def _as_array(x, name, dtype):
    try:
        x = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected `{name}` to be an array of numbers. Received: {name}={x!r}"
        ) from None
    if x.ndim not in (2, 3, 4) or x.shape[0] == 0:
        raise ValueError(
            f"Expected `{name}` of shape (N, features), (N, length, channels) or "
            "(N, height, width, channels) "
            f"with N ≥ 1. Received: {name}.shape={x.shape}"
        )
    return x


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
                     memory_budget=None, jit_compile=None, all_depths=False, fallback=None,
                     n_samples=64, seed=0):
    """Infinite-width NNGP and NTK of a model's architecture.

    The model is read as an architecture only: hidden widths go to infinity
    under the NTK parameterization of `keras_ntk.NTKDense`/`NTKConv2D` (their
    widths are ignored), or the standard parameterization of plain Keras
    layers (whose widths set σw² and the NTK's fan-in terms, as
    neural-tangents' `parameterization="standard"`). The kernels follow the recursion in the
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
        model: a Sequential or functional Keras model (a graph: `Add`,
            `Average`, `Concatenate` on channels, nested models) of
            `NTKDense`/`NTKConv2D` (NTK parameterization), plain `Dense`/
            `Conv1D`/`Conv2D` (standard parameterization, σw² = Var(W)·fan_in
            from the initializer), activations (closed forms for ReLU,
            LeakyReLU, Erf, sign, sin, cos; Gauss-Hermite quadrature for other
            elementwise Keras activations), Dropout/Identity, BatchNormalization
            (inference), LayerNormalization (no center/scale), average pooling
            1-D/2-D, global average pooling, Flatten. Any other layer raises a
            ValueError naming it and the reason (docs/infinite.md has the table).
        x1: array (N1, features), (N1, length, channels) or (N1, height, width,
            channels).
        x2: array with N2 examples, or None for x1.
        batch_size: examples per block side; None picks the largest block
            whose working memory fits `memory_budget` (with XLA: at most a
            2 MiB kernel per block, which stays in cache).
        dtype: "float64" (default) or "float32", the dtype of the computation.
        memory_budget: bytes for one block's working memory (default 1 GiB).
        jit_compile: compile the recursion with XLA (arccos/arcsin then
            evaluated by fused polynomials within 3 ulp, see `_acos`). None
            (default) does so when the spatial kernels of the call hold more
            than 2²² numbers (on 8×8 images: a GAP head beyond ~45 examples,
            a Flatten head beyond ~360), where it is 2-3× faster; compiling
            takes about a second, so smaller calls run op by op.
        all_depths: also return the kernels at the output of every
            `NTKDense` layer acting on flat inputs, from the same single pass
            through the recursion. For an FCN whose layers all share σw², σb²
            (`experiments.models.ntk_fcn(depth=D)`), index d is the kernel of
            the same network with d hidden layers (d = 0..D): a whole depth
            sweep for the cost of the deepest network.
        fallback: None (layers without a closed form raise a ValueError) or
            "monte_carlo": if any layer has no closed form (MaxPooling,
            attention, ...), the whole kernel is estimated by
            `keras_ntk.monte_carlo_kernels` over `n_samples` re-initialized
            copies of the model (`keras.models.clone_model`) at the model's
            own widths (build it wide: the estimate is that width's expected
            kernel), seeds `seed + i`, in inference mode; the result names
            those layers in `.monte_carlo_layers` and carries
            `.nngp_stderr`, `.ntk_stderr`. A model whose outputs couple the
            examples of a batch is refused.
        n_samples, seed: of the Monte-Carlo fallback.

    Returns:
        `InfiniteKernels(nngp, ntk)`, two numpy arrays of shape (N1, N2);
        with `all_depths=True` of shape (L, N1, N2), L the number of dense
        layers on flat inputs (index −1: the model's output).

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
    if fallback not in (None, "monte_carlo"):
        raise ValueError(
            f"Expected `fallback` None or 'monte_carlo'. Received: fallback={fallback!r}")
    if fallback == "monte_carlo":
        # Layers without a closed form make the whole kernel a Monte-Carlo estimate
        # over re-initialized copies of the model at its own widths.
        missing = tuple(error.layer.name for error in unsupported_layers(model))
        if missing:
            if all_depths:
                raise ValueError(
                    "Expected `all_depths=False` with a Monte-Carlo fallback (it estimates the "
                    f"output's kernels only). Received: monte_carlo_layers={missing}")
            mc = monte_carlo_kernels(clone_sampler(model), x1, None if same else x2,
                                     n_samples=n_samples, seed=seed, batch_size=batch_size,
                                     memory_budget=memory_budget, dtype="float64")
            result = InfiniteKernels(mc.nngp.astype(np_dtype), mc.ntk.astype(np_dtype))
            result.monte_carlo_layers = missing
            result.nngp_stderr, result.ntk_stderr = mc.nngp_stderr, mc.ntk_stderr
            return result
    steps = _architecture(model, x1.shape[1:])
    _validation.check_bool(all_depths, "all_depths")
    depth_count = sum(op.kind == "dense" and mode == "fcn" for op, mode, _ in steps)
    if all_depths and not depth_count:
        raise ValueError("`all_depths=True` returns the kernels after each NTKDense layer on "
                         f"flat inputs, and the model has none. Received: model={model.name!r}")
    n1, n2 = len(x1), len(x2)
    pairs = n1 * (n1 + 1) // 2 if same else n1 * n2
    if jit_compile is None:
        jit_compile = _spatial_entries(steps, pairs) > _XLA_MIN_ENTRIES
    elif not isinstance(jit_compile, bool):
        raise TypeError(
            "Expected `jit_compile` to be None, True or False. "
            f"Received: jit_compile={jit_compile!r}"
        )
    if batch_size is None:
        budget = _DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        pair = _pair_bytes(steps, x1.shape[1:], np_dtype.itemsize)
        live = _LIVE_ARRAYS + (2 * depth_count if all_depths else 0)
        # Quadrature holds a few arrays deg times the kernel's size.
        live += max([4 * op.params["deg"] for op, _, _ in steps if op.kind == "numerical"],
                    default=0)
        batch_size = max(1, int(math.isqrt(max(budget // (pair * live), 1))))
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
    elif _spatial_entries(steps, n1 * n2) + n1 * n2 <= _EAGER_MAX_ENTRIES:
        compiled = compiled.eager()
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
        # The self recursion has N kernels, not N², so unless they are many it
        # runs op by op: tracing and compiling it (XLA: ~1 s) cost more than
        # running it (a Flatten head, N = 600: 0.07 s).
        small = _spatial_entries(steps, len(x)) + len(x) <= _EAGER_MAX_ENTRIES
        recursion = compiled.eager() if small else compiled
        parts = [recursion.self_recursion(tf.constant(x[a:b]), all_depths)
                 for a, b in block_ranges(len(x), chunk)]
        records = [p[0] for p in parts]
        variances = ([] if not records or not records[0] else
                     [tf.concat([r[i] for r in records], 0) for i in range(len(records[0]))])
        diagonal = [np.concatenate([p[1][i].numpy() for p in parts], axis=-1) for i in range(2)]
        return variances, diagonal

    vars1, diagonal = self_terms(x1, b1)
    vars2 = vars1 if same else self_terms(x2, b2)[0]
    shape = ((depth_count,) if all_depths else ()) + (len(x1), len(x2))
    nngp, ntk = np.zeros(shape, np_dtype), np.zeros(shape, np_dtype)
    rows = block_ranges(len(x1), b1)
    cols = rows if same else block_ranges(len(x2), b2)
    blocks = [(r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)
              if not same or j >= i]

    def compute(block):
        (r0, r1), (c0, c1) = block
        k, t = compiled.cross(
            tf.constant(x1[r0:r1]), tf.constant(x2[c0:c1]),
            [v[r0:r1] for v in vars1], [v[c0:c1] for v in vars2], all_depths)
        nngp[..., r0:r1, c0:c1] = k.numpy()
        ntk[..., r0:r1, c0:c1] = t.numpy()
        if same and (r0, r1) != (c0, c1):
            nngp[..., c0:c1, r0:r1] = np.swapaxes(nngp[..., r0:r1, c0:c1], -1, -2)
            ntk[..., c0:c1, r0:r1] = np.swapaxes(ntk[..., r0:r1, c0:c1], -1, -2)

    blocks = _distribute.worker_share(blocks)  # All unless several workers are in scope.
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
    nngp, ntk = _distribute.sum_over_workers(nngp, ntk)
    if same:
        # The diagonal from the self recursion (exact c = 1; see _self_recursion).
        index = np.arange(len(x1))
        nngp[..., index, index], ntk[..., index, index] = diagonal
    nngp, ntk = nngp[..., :n1, :n2], ntk[..., :n1, :n2]
    return InfiniteKernels(nngp, ntk)


def __getattr__(name):
    # NTKPsdKernel lives in keras_ntk._infinite_tfp (imports TFP, which is heavy).
    if name == "NTKPsdKernel":
        from keras_ntk import _infinite_tfp

        return _infinite_tfp.NTKPsdKernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
