"""Monte-Carlo NNGP and NTK: empirical kernels averaged over random initializations.

For a family of networks whose weights are drawn at random (a `model_fn`
building a freshly initialized Keras model), the NNGP kernel is the covariance
of the outputs over initializations and the NTK's expectation is the average
empirical NTK:

    K(x1, x2) = E_θ[f(x1; θ) · f(x2; θ)] / O,    Θ(x1, x2) = E_θ[J(x1; θ) J(x2; θ)ᵀ] / O

(O output units traced, as `empirical_ntk`). Both are estimated by the mean over
n samples, with the standard error of that mean, s/√n (s the sample standard
deviation of each entry over the samples). As the widths of an NTK-parameterized
network grow these tend to `keras_ntk.infinite_kernels` (Lee et al. 2019;
neural-tangents `monte_carlo_kernel_fn`); at a finite width the estimate is of
that width's expected kernel, which differs from the limit by O(1/width).
"""

import collections
import gc
import inspect

import keras
import numpy as np

from keras_ntk import _validation
from keras_ntk._architecture import architecture_key
from keras_ntk._batching import host_inputs, num_examples, slice_examples
from keras_ntk._weights import iter_layers
from keras_ntk.nngp import empirical_nngp
from keras_ntk.ntk import empirical_ntk

MonteCarloKernels = collections.namedtuple(
    "MonteCarloKernels", ["nngp", "ntk", "nngp_stderr", "ntk_stderr", "n_samples"])
MonteCarloKernels.__doc__ = """Monte-Carlo estimates of the NNGP and NTK.

Attributes:
    nngp: numpy array (N1, N2, *kernel axes), the mean over samples of
        f(x1)·f(x2)/O (None if not requested).
    ntk: numpy array, the mean over samples of the empirical NTK (None if not
        requested).
    nngp_stderr, ntk_stderr: the standard errors of those means, s/√n entry
        by entry (s the sample standard deviation, ddof=1).
    n_samples: the number n of random initializations averaged.
"""

# Examples compared, for the first sample, between a whole batch and one at a time.
_COUPLING_EXAMPLES = 4


def _sample_builder(model_fn):
    """model_fn as a function of the sample seed (seeding Keras itself for a
    zero-argument model_fn)."""
    try:
        parameters = inspect.signature(model_fn).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    required = [p for p in parameters if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise TypeError(
            "Expected `model_fn` to take no argument or one (the sample's seed). "
            f"Received: model_fn={model_fn!r} with arguments {[p.name for p in required]}")
    if required:
        return model_fn

    def build(seed):
        keras.utils.set_random_seed(seed)
        return model_fn()

    return build


_KNOWN_PAIRWISE = (
    keras.layers.InputLayer, keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
    keras.layers.Activation, keras.layers.ReLU, keras.layers.Flatten,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.LayerNormalization, keras.layers.Dropout, keras.layers.Add,
    keras.layers.Concatenate, keras.layers.MultiHeadAttention, keras.Model,
)


def _outputs(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)


def _check_pairwise(model, x):
    """Refuses a model whose output for one example depends on the others in its batch."""
    n = min(num_examples(x, "x1"), _COUPLING_EXAMPLES)
    if n < 2:
        return
    batch = _outputs(model, slice_examples(x, 0, n))
    alone = np.concatenate([_outputs(model, slice_examples(x, i, i + 1)) for i in range(n)])
    scale = max(np.max(np.abs(batch)), np.finfo(np.float32).tiny)
    if np.max(np.abs(batch - alone)) > 1e-4 * scale:
        suspects = [layer.name for layer in iter_layers(model, include_self=False)
                    if isinstance(layer, keras.layers.BatchNormalization)
                    or not isinstance(layer, _KNOWN_PAIRWISE)]
        raise ValueError(
            "Expected a model whose output for each example depends on that example only "
            "(in inference mode): its output changes with the other examples of the batch "
            "(a layer normalizing with batch statistics, as BatchNormalization in training "
            "mode does), so it has no kernel between pairs of inputs. Layers that could do "
            f"this: {suspects}. Received: model={model.name!r}")


class _Welford:
    """Running mean and sum of squared deviations of arrays (float64)."""

    def __init__(self):
        self.count, self.mean, self.squares = 0, None, None

    def add(self, value):
        value = np.asarray(value, np.float64)
        self.count += 1
        if self.mean is None:
            self.mean, self.squares = value.copy(), np.zeros_like(value)
            return
        delta = value - self.mean
        self.mean += delta / self.count
        self.squares += delta * (value - self.mean)

    def stderr(self):
        return np.sqrt(self.squares / (self.count - 1) / self.count)


def _check_get(get):
    names = (get,) if isinstance(get, str) else get
    try:
        names = tuple(names)
    except TypeError:
        names = None
    if not names or any(name not in ("nngp", "ntk") for name in names):
        raise ValueError(
            f"Expected `get` to be 'nngp', 'ntk' or a tuple of them. Received: get={get!r}")
    return set(names)


def monte_carlo_kernels(model_fn, x1, x2=None, *, n_samples=32, get=("nngp", "ntk"), seed=0,
                        trace_axes=(-1,), diagonal_axes=(), implementation="auto",
                        batch_size=None, memory_budget=None, dtype="float64", verbose=0):
    """Monte-Carlo NNGP and NTK: empirical kernels averaged over random initializations.

    Sample i (i = 0..n−1) is the model `model_fn(seed + i)` (or, for a
    zero-argument `model_fn`, `model_fn()` called after
    `keras.utils.set_random_seed(seed + i)`), run in inference mode. Per
    sample the NNGP entry is the product of the outputs f(x1)·f(x2) with the
    output axes in `trace_axes` averaged (`empirical_nngp` of the model's
    output) and the NTK is `empirical_ntk`; the result is their mean over the
    samples and its standard error s/√n (s: the sample standard deviation of
    each entry, ddof=1), the same conventions as neural-tangents
    `monte_carlo_kernel_fn`. For an NTK-parameterized network
    (`keras_ntk.NTKDense`, ...) the mean approaches `keras_ntk.infinite_kernels`
    as the widths grow; at finite width it estimates that width's expected
    kernel.

    Cost: one model build, one forward pass and one `empirical_ntk` per sample.
    Samples whose model has the architecture of the first (the same classes,
    configs, wiring and variable shapes: the usual case, model_fn builds one
    architecture) have their weights copied into the first model, so the
    compiled kernel functions are traced once, not once per sample; each
    sample's own model is released (and collected) before the next is built,
    and no model is reachable after the call. Memory: the kernels plus two
    accumulators of their shape.

    Args:
        model_fn: a callable returning a freshly initialized Keras model, taking
            either no argument or one (the sample's seed, an int).
        x1: inputs with N1 examples.
        x2: inputs with N2 examples, or None for x1.
        n_samples: number of random initializations, an int ≥ 2.
        get: "nngp", "ntk" or both (a tuple); the other fields are None.
        seed: int; sample i uses seed + i.
        trace_axes, diagonal_axes: output axes averaged / kept diagonal, as in
            `empirical_ntk` (default: the last axis averaged).
        implementation, batch_size, memory_budget: passed to `empirical_ntk`
            (`batch_size` also bounds the examples per forward pass of the NNGP).
        dtype: dtype of the per-sample kernels (default float64); the mean and
            standard error are accumulated in float64.
        verbose: 1 shows a `keras.utils.Progbar` over the samples.

    Returns:
        `MonteCarloKernels(nngp, ntk, nngp_stderr, ntk_stderr, n_samples)`,
        numpy float64 arrays of shape (N1, N2, *kernel axes).

    Example:

    ```python
    def mlp(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((4,)),
                                 keras_ntk.NTKDense(512, 1.4, 0.1, activation="relu"),
                                 keras_ntk.NTKDense(1, 1.4, 0.1)])

    mc = keras_ntk.monte_carlo_kernels(mlp, x, n_samples=64)
    mc.ntk, mc.ntk_stderr     # ≈ keras_ntk.infinite_kernels(mlp(0), x).ntk ± stderr
    ```
    """
    if not callable(model_fn):
        raise TypeError(
            "Expected `model_fn` to be a callable returning a Keras model. "
            f"Received: model_fn={model_fn!r}")
    n_samples = _validation.check_int(n_samples, "n_samples", 2)
    seed = _validation.check_int(seed, "seed", 0)
    wanted = _check_get(get)
    _validation.check_int(batch_size, "batch_size", 1, allow_none=True)
    _validation.check_float_dtype(dtype, allow_none=False)
    _validation.check_int(verbose, "verbose", 0, 2)
    x1, x2, _, _ = host_inputs(x1, x2)
    build = _sample_builder(model_fn)
    nngp, ntk = _Welford(), _Welford()
    progress = keras.utils.Progbar(n_samples) if verbose else None
    first, layout = None, None
    for i in range(n_samples):
        model = build(seed + i)
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"Expected `model_fn` to return a keras.Model. Received: {model!r} "
                f"(sample {i})")
        if not model.built:
            model(slice_examples(x1, 0, 1), training=False)
        if first is None:
            _check_pairwise(model, x1)
            first, layout = model, architecture_key(model, custom_classes=True)
            target = first
        elif layout is not None and architecture_key(model, custom_classes=True) == layout:
            first.set_weights(model.get_weights())
            target = first
        else:
            target = model
        del model  # The sample's own model, unless it is the first (kept as the target).
        if "nngp" in wanted:
            nngp.add(empirical_nngp(
                target, x1, x2, layer=_OutputOf(target), trace_axes=trace_axes,
                diagonal_axes=diagonal_axes, batch_size=batch_size or 256, dtype=dtype))
        if "ntk" in wanted:
            ntk.add(empirical_ntk(
                target, x1, x2, trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                implementation=implementation, batch_size=batch_size,
                memory_budget=memory_budget, dtype=dtype))
        target = None
        if progress is not None:
            progress.update(i + 1)
        # The sample's model is in a reference cycle (Keras layers ↔ model): a
        # young-generation collection frees it (13 ms; a full one takes ~1 s).
        gc.collect(1)
    del first
    return MonteCarloKernels(
        nngp.mean if "nngp" in wanted else None, ntk.mean if "ntk" in wanted else None,
        nngp.stderr() if "nngp" in wanted else None,
        ntk.stderr() if "ntk" in wanted else None, n_samples)


class _OutputOf:
    """x -> the model's output in inference mode (the "features" of the output NNGP)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        return self.model(x, training=False)


def clone_sampler(model):
    """A zero-argument model_fn: `keras.models.clone_model(model)`, freshly initialized
    (trained weights and BatchNorm statistics are not copied)."""

    def clone():
        return keras.models.clone_model(model)

    return clone
