"""Tests of `keras_ntk._batching`: blocks, their placement and the compiled-function cache.

The block layer is tested with a kernel written in numpy, Θ(x1, x2)[n, m, a, b] =
x1[n, a] x2[m, b] + x1[n, b] x2[m, a] / 2 (not symmetric in a, b, so a mirrored block
placed without swapping its paired axes would be wrong), against the kernel of the
whole inputs at once.
"""

import gc
import weakref

import numpy as np
import pytest

import keras_ntk
from keras_ntk import _batching
from keras_ntk._batching import (
    block_ranges, bucket, compiled, gather_examples, kernel_tasks, ladder_sizes, model_cache,
    num_examples, pad_examples, padded_size, run_tasks, slice_examples, to_host)
from keras_ntk._output_axes import OutputAxes
from ntk_reference import (  # noqa: F401 (plain_graphs: a fixture)
    IMPLEMENTATIONS, assert_close, cnn, inputs_for, mlp, plain_graphs, reference, rel_error,
    slow_unless)

D = 3  # output entries per example; the kernel keeps both output axes (trace_axes=())


def toy_kernel(x1, x2):
    x1, x2 = np.asarray(x1), np.asarray(x2)
    return np.einsum("na,mb->nmab", x1, x2) + 0.5 * np.einsum("nb,ma->nmab", x1, x2)


def blocked(x1, x2, block, pad=False):
    """The toy kernel through kernel_tasks + run_tasks; returns it and the block calls."""
    calls = []

    def block_function(same):
        def fn(*args):
            calls.append((same, tuple(len(a) for a in args)))
            return [toy_kernel(args[0], args[0] if same else args[1])]
        return fn

    n1 = num_examples(x1, "x1")
    n2 = n1 if x2 is None else num_examples(x2, "x2")
    results = [np.zeros((n1, n2, D, D))]
    tasks = kernel_tasks(block_function, results, [OutputAxes((D,), (), ())],
                         x1, x2, n1, n2, block, pad=pad)
    run_tasks(tasks, verbose=0)
    return results[0], calls


@pytest.mark.parametrize("block", [1, 3, 7, 10])
def test_blocks_of_x_with_itself_are_mirrored_into_the_whole_kernel(block):
    x = np.random.default_rng(0).normal(size=(7, D))
    kernel, calls = blocked(x, None, block)
    np.testing.assert_allclose(kernel, toy_kernel(x, x), rtol=1e-12)
    row_blocks = -(-7 // block)
    # Only blocks on and above the diagonal are computed.
    assert len(calls) == row_blocks * (row_blocks + 1) // 2
    assert sum(same for same, _ in calls) == row_blocks


@pytest.mark.parametrize("block", [2, 4, 9])
def test_blocks_of_x1_and_x2_fill_the_whole_kernel(block):
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(7, D)), rng.normal(size=(5, D))
    kernel, calls = blocked(x1, x2, block)
    np.testing.assert_allclose(kernel, toy_kernel(x1, x2), rtol=1e-12)
    assert len(calls) == -(-7 // block) * -(-5 // block)
    assert not any(same for same, _ in calls)


def test_block_ranges_slices_and_gathers_of_host_structures():
    assert block_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    x = {"a": np.arange(10).reshape(5, 2), "b": np.arange(5)}
    host = to_host(x, "x")
    assert num_examples(host, "x") == 5
    np.testing.assert_array_equal(slice_examples(host, 1, 3)["a"], [[2, 3], [4, 5]])
    np.testing.assert_array_equal(gather_examples(host, np.array([4, 0]))["b"], [4, 0])
    with pytest.raises(ValueError, match="Received: x with leading sizes"):
        num_examples({"a": np.zeros((2, 1)), "b": np.zeros(3)}, "x")


class _Owner:
    """Stands for a model: the cache is keyed by it, weakly."""


def test_compiled_functions_are_cached_per_owner_and_key_and_freed_with_it():
    owner = _Owner()
    built = []

    def builder(x):
        built.append(1)
        return x * 2.0

    first = compiled(owner, ("jacobian", "k"), builder)
    assert compiled(owner, ("jacobian", "k"), builder) is first
    assert compiled(owner, ("jacobian", "other"), builder) is not first
    assert float(first(np.float32(3.0))) == 6.0
    assert len(model_cache(owner)) == 2
    ref = weakref.ref(owner)
    del owner, first
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ fixed (padded) block shapes


def test_the_ladder_of_block_sizes():
    assert ladder_sizes(100) == [128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    ladder_sizes(100).pop()  # a fresh list each time (the ladder is remembered)
    assert ladder_sizes(100)[-1] == 1 and bucket(100) == 128
    assert [bucket(n) for n in (1, 5, 8, 9, 13, 256, 257, 1797)] == [
        1, 6, 8, 12, 16, 256, 384, 2048]
    # One block: padded to the ladder; several: every block padded to the block size.
    assert [padded_size(n, 64) for n in (5, 40, 64, 65, 1000)] == [6, 48, 64, 64, 64]
    x = {"a": np.arange(6).reshape(3, 2), "b": np.array([4, 5, 6])}
    padded = pad_examples(x, 5)
    np.testing.assert_array_equal(padded["a"], [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(padded["b"], [4, 5, 6, 6, 6])


@pytest.mark.parametrize("n1, n2, block", [(7, None, 3), (7, None, 16), (10, 5, 4), (5, 11, 8)])
def test_padded_blocks_have_fixed_shapes_and_give_the_unpadded_kernel(n1, n2, block):
    rng = np.random.default_rng(2)
    x1 = rng.normal(size=(n1, D))
    x2 = None if n2 is None else rng.normal(size=(n2, D))
    kernel, calls = blocked(x1, x2, block, pad=True)
    np.testing.assert_allclose(kernel, toy_kernel(x1, x1 if x2 is None else x2), rtol=1e-12)
    p1 = padded_size(n1, block)
    p2 = p1 if n2 is None else padded_size(n2, block)
    for same, sizes in calls:
        assert sizes == ((p1,) if same else (p1, p1 if n2 is None else p2))


def _tracing_counts(model):
    functions = _batching.block_functions(model)
    return sum(f._plain.experimental_get_tracing_count()
               + (f._xla.experimental_get_tracing_count() if f._xla is not None else 0)
               for f in functions), len(functions)


def _jacobian64(model, x):
    """J(x) from a whole-batch Jacobian, float64 (one scalar output): Θ = J Jᵀ."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        y = model(x, training=False)
    return np.concatenate([np.reshape(np.asarray(j, np.float64), (len(x), -1))
                           for j in tape.jacobian(y, model.trainable_weights)], 1)


@pytest.mark.parametrize(
    "implementation", ["structured", pytest.param("jacobian", marks=pytest.mark.slow)])
def test_one_compiled_function_serves_every_size_of_a_rung(implementation, monkeypatch):
    """Sizes 9..12 share the rung 12 (one block), 20 and 30 blocks of 8: no retrace,
    kernels equal to the float64 Jacobian kernel of the unpadded inputs (BatchNorm in
    inference mode included: padding must not touch the other examples)."""
    import keras

    import keras_ntk

    monkeypatch.setattr(_batching, "_JIT", "0")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(16, activation="tanh"),
        keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    bn = model.layers[1]
    bn.moving_mean.assign(np.linspace(-0.2, 0.2, 16))
    bn.moving_variance.assign(np.linspace(0.5, 1.5, 16))
    x = np.random.default_rng(3).normal(size=(30, 5)).astype("float32")
    jac = _jacobian64(model, x)
    theta = jac @ jac.T
    call = lambda a, b=None, **kw: keras_ntk.empirical_ntk(  # noqa: E731
        model, a, b, implementation=implementation, dtype="float64", **kw)
    call(x[:12])
    seen = _tracing_counts(model)
    np.testing.assert_allclose(call(x[:9]), theta[:9, :9], rtol=1e-5, atol=1e-7)
    assert _tracing_counts(model) == seen
    np.testing.assert_allclose(call(x[:11], x[11:21]), theta[:11, 11:21], rtol=1e-5, atol=1e-7)
    # Only the x1 × x2 function (rungs 12 × 12) is new; a second x1 × x2 call reuses it.
    assert _tracing_counts(model)[0] == seen[0] + 1
    np.testing.assert_allclose(call(x[:10], x[19:]), theta[:10, 19:], rtol=1e-5, atol=1e-7)
    assert _tracing_counts(model)[0] == seen[0] + 1
    call(x[:20], batch_size=8)
    blocks = _tracing_counts(model)
    np.testing.assert_allclose(call(x, batch_size=8), theta, rtol=1e-5, atol=1e-7)
    assert _tracing_counts(model) == blocks
# ----------------------------------------------------------------- through empirical_ntk


@pytest.mark.usefixtures("plain_graphs")
@pytest.mark.parametrize(
    "implementation", [slow_unless(i == "structured", i) for i in IMPLEMENTATIONS])
def test_blocks_with_n_not_divisible_by_batch_size(implementation):
    model = mlp()
    x1, x2 = inputs_for("mlp", 11), inputs_for("mlp", 7, seed=1)
    assert_close(
        keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(), batch_size=4,
                                implementation=implementation),
        reference(model, x1, x2, trace_axes=()),
    )
    # x2=None: the mirrored blocks must swap the paired output axes as well.
    assert_close(
        keras_ntk.empirical_ntk(model, x1, trace_axes=(), batch_size=4,
                                implementation=implementation),
        reference(model, x1, None, trace_axes=()),
    )


@pytest.mark.usefixtures("plain_graphs")
def test_repeated_calls_do_not_retrace():
    model = mlp()
    x = inputs_for("mlp", 8)
    first = keras_ntk.empirical_ntk(model, x, implementation="structured")
    functions = _batching.block_functions(model)
    assert functions
    cache = dict(_batching._COMPILED[model])
    counts = [f._plain.experimental_get_tracing_count()
              + (f._xla.experimental_get_tracing_count() if f._xla is not None else 0)
              for f in functions]
    model.layers[0].kernel.assign(model.layers[0].kernel * 1.5)
    second = keras_ntk.empirical_ntk(model, x, implementation="structured")
    again = [f._plain.experimental_get_tracing_count()
             + (f._xla.experimental_get_tracing_count() if f._xla is not None else 0)
             for f in functions]
    assert again == counts and len(_batching._COMPILED[model]) == len(cache)
    # The cached function reads the current weights, not the traced ones.
    assert rel_error(second, first) > 1e-2
    assert_close(second, reference(model, x))


@pytest.mark.usefixtures("plain_graphs")
def test_progbar_over_blocks(capsys):
    model = mlp()
    x = inputs_for("mlp", 9)
    kernel = keras_ntk.empirical_ntk(model, x, batch_size=3, verbose=1)
    assert "6/6" in capsys.readouterr().out  # 3 diagonal + 3 upper blocks
    assert_close(kernel, reference(model, x))


@pytest.mark.usefixtures("plain_graphs")
def test_mirrored_strategy_equals_single_device(mirrored_strategy):
    assert mirrored_strategy.num_replicas_in_sync == 2
    strategy = mirrored_strategy
    with strategy.scope():
        model = mlp()
    x = inputs_for("mlp", 9)
    single = keras_ntk.empirical_ntk(model, x, batch_size=3)
    with strategy.scope():
        # 6 blocks (3 on the diagonal) over 2 replicas.
        mirrored = keras_ntk.empirical_ntk(model, x, batch_size=3)
    np.testing.assert_allclose(mirrored, single, rtol=1e-5, atol=1e-6 * np.abs(single).max())
    assert_close(mirrored, reference(model, x))


@pytest.mark.usefixtures("plain_graphs")
def test_xla_path_matches_plain_graphs(monkeypatch):
    model = cnn()
    x1, x2 = inputs_for("cnn", 5), inputs_for("cnn", 3, seed=1)
    expected = reference(model, x1, x2, trace_axes=())
    monkeypatch.setattr(_batching, "_JIT", "1")  # XLA errors are raised, not hidden
    for implementation in ("structured", "jacobian"):
        actual = keras_ntk.empirical_ntk(model, x1, x2, trace_axes=(),
                                         implementation=implementation)
        assert_close(actual, expected)
    functions = _batching.block_functions(model)
    assert functions and all(f._xla is not None for f in functions)


# ------------------------------------------------------------------ one function per architecture


def _three_layer_mlp(width=16, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(width, activation="tanh"),
                             keras.layers.Dense(width, activation="relu"),
                             keras.layers.Dense(1)])


def test_models_of_one_architecture_share_one_compiled_function(monkeypatch):
    """Weights are arguments: a second model of the architecture is not traced again,
    its kernel is its own (float64 Jacobian reference), and no model is held."""
    import collections

    import keras

    monkeypatch.setattr(_batching, "_JIT", "0")
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())
    x = np.random.default_rng(4).normal(size=(8, 5)).astype("float32")
    refs, kernels = [], []
    for seed in range(3):
        model = _three_layer_mlp(seed=seed)
        kernel = keras_ntk.empirical_ntk(model, x, implementation="structured")
        jac = _jacobian64(model, x)
        np.testing.assert_allclose(kernel, jac @ jac.T, rtol=1e-4, atol=1e-6)
        kernels.append(kernel)
        refs.append(weakref.ref(model))
        del model
    assert len(_batching._SHARED) == 1
    (entry,) = _batching._SHARED.values()
    assert entry.shareable and entry.fn._plain.experimental_get_tracing_count() == 1
    assert np.abs(kernels[0] - kernels[1]).max() > 1e-3 * np.abs(kernels[0]).max()
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0
    # Another width is another architecture; a renamed layer is not.
    wider = _three_layer_mlp(width=24)
    assert _batching.architecture_key(wider) != _batching.architecture_key(_three_layer_mlp())
    renamed = keras.Sequential([keras.Input((5,)),
                                keras.layers.Dense(16, activation="tanh", name="first"),
                                keras.layers.Dense(16, activation="relu"),
                                keras.layers.Dense(1, name="head")], name="other")
    assert _batching.architecture_key(renamed) == _batching.architecture_key(_three_layer_mlp())
    other_activation = keras.Sequential([keras.Input((5,)), keras.layers.Dense(16),
                                         keras.layers.Dense(16, activation="relu"),
                                         keras.layers.Dense(1)])
    assert _batching.architecture_key(other_activation) != _batching.architecture_key(wider)
    assert _batching.architecture_key(other_activation) != _batching.architecture_key(
        _three_layer_mlp())


@pytest.mark.parametrize("implementation", ["structured", "jacobian"])
def test_per_layer_kernels_are_shared_by_architecture(implementation, monkeypatch):
    """`per_layer=True`: a second model of the architecture is not traced again (its
    groups of weights, as indices, are part of the key), and each layer's kernel is its
    own (float64 Jacobian reference)."""
    import collections

    monkeypatch.setattr(_batching, "_JIT", "0")
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())
    x = np.random.default_rng(5).normal(size=(6, 5)).astype("float32")
    for seed in range(2):
        model = _three_layer_mlp(seed=seed)
        parts = keras_ntk.empirical_ntk(model, x, per_layer=True, implementation=implementation)
        jac = _jacobian64(model, x)
        start = 0
        for layer in model.layers:
            size = sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
            own = jac[:, start:start + size]
            np.testing.assert_allclose(parts[layer.name], own @ own.T, rtol=1e-4, atol=1e-6)
            start += size
    fused = [e for key, e in _batching._SHARED.items() if key[1][0] == "shared"]
    assert len(fused) == 1 and fused[0].shareable
    assert fused[0].fn._plain.experimental_get_tracing_count() == 1


def test_unknown_architectures_and_direct_variable_reads_keep_functions_of_their_own(
        monkeypatch):
    import collections

    import keras
    import tensorflow as tf

    monkeypatch.setattr(_batching, "_JIT", "0")
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())

    class Scale(keras.layers.Layer):  # a custom layer: its call is not described by a config
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w

    custom = keras.Sequential([keras.Input((5,)), Scale(), keras.layers.Dense(1)])
    assert _batching.architecture_key(custom) is None
    x = np.random.default_rng(5).normal(size=(6, 5)).astype("float32")
    jac = _jacobian64(custom, x)
    np.testing.assert_allclose(keras_ntk.empirical_ntk(custom, x), jac @ jac.T,
                               rtol=1e-4, atol=1e-6)
    assert not _batching._SHARED

    # A shared builder that reads a variable directly (not through the substitution)
    # is found out at its first trace and the architecture is no longer shared.
    model = _three_layer_mlp()
    hidden = tf.Variable(2.0)
    first = _batching.shared_compiled(model, ("probe",), lambda state, values, xb: xb * hidden,
                                      None)
    np.testing.assert_allclose(first(np.ones(3, np.float32)), 2.0)
    assert _batching.shared_compiled(model, ("probe",), None, None) is None


# ----------------------------------------------------------------- per-call host cost (issue 18)


def _deep_mlp(layers=10):
    import keras

    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((5,))] + [
        keras.layers.Dense(5, activation="tanh") for _ in range(layers - 1)
    ] + [keras.layers.Dense(2)])


@pytest.mark.usefixtures("plain_graphs")
@pytest.mark.parametrize("implementation, blocks", [
    ("ntvp", 0),  # a model's own block function: checked before any block
    ("auto", 1),  # shared by architecture: checked in the first block's own call
])
def test_many_weights_are_checked_for_finiteness_on_the_device(implementation, blocks,
                                                               monkeypatch):
    """Above `_DEVICE_CHECK_FROM` weights one fused device call checks them (or the
    shared block function's own flags); the error still names the weight, the index and
    the value planted there, and no kernel is returned."""
    from keras_ntk import _validation
    from keras_ntk import ntk as ntk_module

    model = _deep_mlp()
    x = inputs_for("mlp", 6)
    assert len(model.trainable_weights) > _validation._DEVICE_CHECK_FROM
    _validation.check_finite_weights(model.trainable_weights)  # all finite: passes
    kernel = model.layers[6].kernel
    planted = np.asarray(kernel.value).copy()
    planted[2, 1] = -np.inf
    kernel.assign(planted)
    ran, run_tasks = [], ntk_module.run_tasks
    monkeypatch.setattr(ntk_module, "run_tasks", lambda tasks, verbose: run_tasks(
        [(lambda *a, fn=fn: ran.append(fn) or fn(*a), args, done)
         for fn, args, done in tasks], verbose))

    def refused(match):
        ran.clear()
        with pytest.raises(_validation.NonFiniteError, match=match):
            keras_ntk.empirical_ntk(model, x, implementation=implementation)
        assert len(ran) == blocks

    refused(rf"Received: weight '{kernel.path}'\[2, 1\]=-inf \(the only")
    bias = model.layers[8].bias
    bias.assign(np.full(bias.shape, np.nan, "float32"))
    refused(rf"Received: weight '{kernel.path}'\[2, 1\]=-inf")  # the first one is named
    kernel.assign(np.where(np.isfinite(planted), planted, 0.5))
    refused(rf"'{bias.path}'\[0\]=nan \(the first of 5 non-finite")


@pytest.mark.usefixtures("plain_graphs")
def test_a_repeated_call_reuses_its_plan_and_block_functions():
    """The plan (per weights, input signature and options) and its compiled block
    function are cached: a repeated call neither traces nor builds them again; other
    options get a plan of their own, each exact."""
    from keras_ntk import ntk as ntk_module

    model = _deep_mlp(3)
    x = inputs_for("mlp", 7)
    setup = lambda **kw: ntk_module.kernel_setup(  # noqa: E731
        model, x, None, kw.get("trace_axes", (-1,)), (), "structured", None, None, False,
        None)
    keras_ntk.empirical_ntk(model, x, implementation="structured")
    first = setup()
    fn = ntk_module._block_function(first, True)
    counts = _tracing_counts(model)
    model.layers[0].kernel.assign(model.layers[0].kernel * 0.5)
    assert_close(keras_ntk.empirical_ntk(model, x, implementation="structured"),
                 reference(model, x))
    again = setup()
    assert again.plan is first.plan and ntk_module._block_function(again, True) is fn
    assert _tracing_counts(model) == counts
    full = setup(trace_axes=())
    assert full.plan is not first.plan
    assert_close(keras_ntk.empirical_ntk(model, x, trace_axes=(), implementation="structured"),
                 reference(model, x, trace_axes=()))
    assert_close(keras_ntk.empirical_ntk(model, x, trace_axes=[], implementation="structured"),
                 reference(model, x, trace_axes=()))


# ----------------------------------------------------------------- block factors (new N)


def _factor_tracing_counts(model, block_factors):
    """Traces of the model's block functions (factor functions included) and of the pair
    functions."""
    pairs = list(block_factors._PAIR_FUNCTIONS.values())
    return _tracing_counts(model)[0] + sum(
        f._plain.experimental_get_tracing_count()
        + (f._xla.experimental_get_tracing_count() if f._xla is not None else 0) for f in pairs)


def test_choose_size_reuses_compiled_sizes_within_bounds():
    from keras_ntk._block_factors import MAX_PAIRS, MAX_SIZE, MIN_SIZE, choose_size

    assert choose_size(set(), MIN_SIZE // 2, MIN_SIZE // 2, 4096) is None  # fused path
    assert choose_size(set(), 1797, 1797, 4096) == MAX_SIZE  # capped
    assert choose_size(set(), 200, 200, 4096) == min(256, MAX_SIZE)
    # A compiled size up to 2x the target is padded up to; a smaller one is used in blocks.
    assert choose_size({MAX_SIZE}, MAX_SIZE // 2 + 1, 3, 4096) == MAX_SIZE
    assert choose_size({MAX_SIZE // 2}, 3 * MAX_SIZE, 3 * MAX_SIZE, 4096) == MAX_SIZE // 2
    # Too many pairs of blocks of a small compiled size: the target is compiled instead.
    many = int(np.sqrt(MAX_PAIRS)) + 1
    assert choose_size({MAX_SIZE // 2}, many * MAX_SIZE // 2, many * MAX_SIZE // 2,
                       4096) == MAX_SIZE
    # The target follows the block the budget allows (a compiled larger size is
    # offered; factor_tasks checks it against the budget).
    assert choose_size(set(), MAX_SIZE, MAX_SIZE, MAX_SIZE // 2) == MAX_SIZE // 2
    assert choose_size({MAX_SIZE}, MAX_SIZE, MAX_SIZE, MAX_SIZE // 2) == MAX_SIZE


@pytest.mark.parametrize("implementation", [
    "structured", pytest.param("jacobian", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["cnn", "text"])
def test_block_factors_give_the_float64_jacobian_kernel(name, implementation,
                                                         small_factor_blocks):
    """N not a multiple of the block (19, 11), x2 given and None, traced and untraced
    output axes: equal to the float64 Jacobian kernel; the factor path was taken."""
    from ntk_reference import MODELS

    model = MODELS[name]()
    x1, x2 = inputs_for(name, 19), inputs_for(name, 11, seed=1)
    for trace_axes in [(-1,), ()]:
        call = lambda a, b=None: keras_ntk.empirical_ntk(  # noqa: E731
            model, a, b, trace_axes=trace_axes, implementation=implementation,
            dtype="float64")
        call(x1[:5])  # compiles the fused rung 6 and the factors of blocks of 6
        seen = _factor_tracing_counts(model, small_factor_blocks)
        for second in [None, x2]:
            assert_close(call(x1, second), reference(model, x1, second, trace_axes=trace_axes))
        assert _factor_tracing_counts(model, small_factor_blocks) == seen  # through factors


def test_every_new_n_reuses_the_two_factor_functions(small_factor_blocks):
    """After one call at 19 examples (fused rung 24, factors of blocks of 8), new sizes
    (30, 13 × 27, 10, 50) run without a trace, with the float64 Jacobian kernel (one scalar output, BatchNorm in
    inference mode: padding must not touch the other examples)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(16, activation="tanh"),
        keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    model.layers[1].moving_mean.assign(np.linspace(-0.2, 0.2, 16))
    x = np.random.default_rng(3).normal(size=(50, 5)).astype("float32")
    jac = _jacobian64(model, x)
    theta = jac @ jac.T
    call = lambda a, b=None: keras_ntk.empirical_ntk(  # noqa: E731
        model, a, b, implementation="structured", dtype="float64")
    np.testing.assert_allclose(call(x[:19]), theta[:19, :19], rtol=1e-5, atol=1e-7)
    seen = _factor_tracing_counts(model, small_factor_blocks)
    assert seen == 3  # the fused rung 24, the factors of a block of 8, the pair of two blocks
    np.testing.assert_allclose(call(x[:30]), theta[:30, :30], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(call(x[:13], x[23:]), theta[:13, 23:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(call(x[40:]), theta[40:, 40:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(call(x), theta, rtol=1e-5, atol=1e-7)
    assert _factor_tracing_counts(model, small_factor_blocks) == seen
    # Factors that do not fit the memory budget: the fused blocks of today (traced, exact).
    small_factor_blocks.factor_bytes = lambda *args: 2**40
    np.testing.assert_allclose(call(x), theta, rtol=1e-5, atol=1e-7)
    assert _factor_tracing_counts(model, small_factor_blocks) == seen + 1


def test_a_first_call_compiles_the_factor_functions_after_the_fused_blocks(
        small_factor_blocks, monkeypatch):
    """The factor functions run after the last fused block (allocated first, their buffers
    stayed resident in TensorFlow's CPU memory pool under the fused blocks': the memory
    estimate's `_costs.factor_stage`); the kernel is the reference."""
    from keras_ntk import ntk as ntk_module

    events = []
    fused_function, factor_function = ntk_module._block_function, \
        small_factor_blocks._factor_function

    def recorded(name, fn):
        def call(*args):
            events.append(name)
            return fn(*args)
        return call

    monkeypatch.setattr(ntk_module, "_block_function",
                        lambda s, same: recorded("fused", fused_function(s, same)))
    monkeypatch.setattr(small_factor_blocks, "_factor_function",
                        lambda *args: recorded("factors", factor_function(*args)))
    model = mlp()
    x = inputs_for("mlp", 14)
    kernel = keras_ntk.empirical_ntk(model, x, trace_axes=(), implementation="structured",
                                     memory_budget=10**10, batch_size=None)
    assert_close(kernel, reference(model, x, trace_axes=()))
    assert events == ["fused", "factors"]  # one fused block of 16 (padded), then factors
    keras_ntk.empirical_ntk(model, x[:9], trace_axes=(), implementation="structured")
    assert events == ["fused", "factors", "factors", "factors"]  # two blocks of 8 (rung 12)


def test_a_first_call_of_one_block_compiles_the_factor_functions_too(small_factor_blocks):
    """One block (6 examples: padded to 6, the fused function) also compiles the factors
    and the pair of blocks of 6: a larger N (17 × 9, 23) or a smaller one on another rung
    (4) then traces nothing."""
    model = mlp()
    x = inputs_for("mlp", 23)
    call = lambda a, b=None: keras_ntk.empirical_ntk(  # noqa: E731
        model, a, b, trace_axes=(), implementation="structured")
    assert_close(call(x[:6]), reference(model, x[:6], trace_axes=()))
    seen = _factor_tracing_counts(model, small_factor_blocks)
    assert seen == 3  # the fused block, the factors of a block, the pair of two blocks
    assert_close(call(x[:17], x[14:]), reference(model, x[:17], x[14:], trace_axes=()))
    assert_close(call(x), reference(model, x, trace_axes=()))
    # A smaller N (rung 4) is padded up to the compiled block of 6, not compiled anew.
    assert_close(call(x[:4]), reference(model, x[:4], trace_axes=()))
    assert _factor_tracing_counts(model, small_factor_blocks) == seen


@pytest.mark.parametrize("runner, offset", [("run_tasks", 0), ("workers", 0), ("workers", 1)])
def test_a_short_round_computes_each_block_once(runner, offset, mirrored_strategy,
                                                 monkeypatch):
    """Two replicas, one or three blocks, through `run_tasks` (a MirroredStrategy) or
    `run_tasks_on_workers` (one worker of two local replicas; the round's rotation starts
    at `offset`): a replica without a block of its own returns zeros instead of computing
    a block again, and every block reaches its own on_done."""
    import tensorflow as tf

    from keras_ntk import _distribute

    monkeypatch.setattr(_distribute, "_offset", [offset])
    for count in (1, 3):
        calls, results = [], {}

        def task(i):
            def fn(x):
                calls.append(i)
                return [x * (i + 1), tf.reduce_sum(x)[None]]
            return fn, (np.full((2, 3), 1.0, np.float32),), (
                lambda out, i=i: results.update({i: out}))

        tasks = [task(i) for i in range(count)]
        with mirrored_strategy.scope():
            if runner == "run_tasks":
                run_tasks(tasks, verbose=0)
            else:
                _distribute.run_tasks_on_workers(mirrored_strategy, tasks)
        assert sorted(calls) == list(range(count)), count
        for i in range(count):
            np.testing.assert_allclose(results[i][0], np.full((2, 3), i + 1.0))
            np.testing.assert_allclose(results[i][1], [6.0])


def test_a_seen_argument_signature_goes_straight_to_its_concrete_function(mirrored_strategy):
    """Eager, no strategy: the second call with arguments of a seen signature (other
    variables of the same shape and dtype) skips `tf.function`'s dispatch and computes with
    its own arguments; a new shape, any call under a strategy and distributed variables
    go through it."""
    import tensorflow as tf

    fn = _batching._JitFallback(lambda values, x: x * values[0], jit=False)

    class Counted:  # the tf.function, its calls counted
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, *args):
            self.calls += 1
            return self.inner(*args)

        def get_concrete_function(self, *args):
            return self.inner.get_concrete_function(*args)

    fn._plain = counted = Counted(fn._plain)
    x = np.ones(3, np.float32)
    np.testing.assert_allclose(fn([tf.Variable(2.0)], x), 2.0)
    np.testing.assert_allclose(fn([tf.Variable(3.0)], x), 3.0)
    assert counted.calls == 1
    np.testing.assert_allclose(fn([tf.Variable(3.0)], np.ones(4, np.float32)), 3.0)
    assert counted.calls == 2
    with mirrored_strategy.scope():
        np.testing.assert_allclose(fn([tf.constant(5.0)], x), 5.0)
        mirrored = tf.Variable(6.0)
    assert counted.calls == 3
    np.testing.assert_allclose(fn([mirrored], x), 6.0)  # a distributed variable: dispatched
    np.testing.assert_allclose(fn([mirrored], x), 6.0)
    assert counted.calls == 5
    # A default argument left out: the concrete function may not bind the call; the
    # function then keeps dispatching, with the same results.
    scaled = _batching._JitFallback(lambda x, k=2.0: x * k, jit=False)
    for _ in range(3):
        np.testing.assert_allclose(scaled(x), 2.0)
