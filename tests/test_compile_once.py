"""Compile once per model, not once per input size (issue 18 §3), off the default path.

`ntk_vector_product` (Θ blocks and "ntvp"), `empirical_ntk(training=True)` and
`empirical_ntk(per_layer=True)`: after a first call, calls at other N (and x2 of
another size) trace no compiled function, and padded rows never reach the results
(equal to float64 Jacobian references at the unpadded inputs); under a single-worker
strategy (conftest's MirroredStrategy, OneDeviceStrategy) the default path too. Traces are
counted with `experimental_get_tracing_count`, never timed.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from ntk_reference import mlp, reference

import keras_ntk
from keras_ntk import _batching, _block_factors


traces = _block_factors.trace_count


def close(actual, expected, message=""):
    """Elementwise to float32 precision (the model computes in float32; dtype="float64"
    is the contractions'): a padded row leaking in would be off by O(1)."""
    np.testing.assert_allclose(actual, expected, rtol=2e-5,
                               atol=2e-5 * np.abs(expected).max(), err_msg=message)


def _model():
    keras.utils.set_random_seed(0)
    return mlp(outputs=3)


def _x(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 5)).astype("float32")


def _v(n, columns, seed):
    shape = (n,) if columns is None else (n, columns)
    return np.random.default_rng(100 + seed).normal(size=shape)


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
@pytest.mark.parametrize("implementation", ["structured", "ntvp"])
def test_vector_products_at_new_sizes_trace_nothing(implementation):
    model = _model()
    call = lambda a, b, v: keras_ntk.ntk_vector_product(  # noqa: E731
        model, a, b, v, implementation=implementation, dtype="float64")
    x = _x(40, 0)
    call(x[:16], None, _v(16, 2, 0))
    seen = traces(model)
    assert seen > 0
    for n1, n2, columns in [(9, None, 2), (13, None, 2), (11, None, 2), (30, None, 2),
                            (13, 10, 2), (7, 15, 2), (23, 5, 2)]:
        x1 = x[:n1]
        x2 = None if n2 is None else x[n1:n1 + n2]
        v = _v(n1 if n2 is None else n2, columns, n1)
        expected = reference(model, x1, x2) @ v
        close(call(x1, x2, v), expected, f"{n1} x {n2}")
        assert traces(model) == seen, (n1, n2)


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
def test_ntvp_pads_columns_with_zeros_exactly():
    """Column counts share the ladder's rungs (5 and 6 one function); the zero columns
    and the padded rows add nothing."""
    model = _model()
    x = _x(11, 1)
    for columns in (5, 6, None):
        v = _v(11, columns, 3)
        close(keras_ntk.ntk_vector_product(model, x, None, v, implementation="ntvp",
                                           dtype="float64"), reference(model, x) @ v)
        if columns == 5:
            seen = traces(model)
        if columns == 6:
            assert traces(model) == seen


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
def test_training_mode_at_new_sizes_traces_nothing():
    """Training mode of a model whose layers keep examples apart: padded like inference."""
    model = _model()
    call = lambda a, b=None: keras_ntk.empirical_ntk(  # noqa: E731
        model, a, b, training=True, dtype="float64")
    x = _x(60, 2)
    call(x[:19])
    seen = traces(model)
    for n1, n2 in [(30, None), (13, 27), (10, None), (23, 9)]:
        x1, x2 = x[:n1], None if n2 is None else x[n1:n1 + n2]
        close(call(x1, x2), reference(model, x1, x2, training=True), f"{n1} x {n2}")
        assert traces(model) == seen, (n1, n2)


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
def test_training_mode_with_batchnorm_is_never_padded(monkeypatch):
    """BatchNorm in training mode couples the examples of a batch: no block, no padding."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    padded = []
    original = _batching.pad_examples
    monkeypatch.setattr(_batching, "pad_examples",
                        lambda x, size: padded.append(size) or original(x, size))
    for n in (7, 9):
        x = _x(n, n)
        close(keras_ntk.empirical_ntk(model, x, training=True, dtype="float64"),
              reference(model, x, training=True))
    assert padded == []


def _per_layer_reference(model, x1, x2):
    """{layer name: Θ_l(x1, x2)} averaged over the outputs, from float64 tape Jacobians."""
    keras.config.set_floatx("float64")
    try:
        clone = _model()
    finally:
        keras.config.set_floatx("float32")
    clone.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])

    def jacobians(x):
        with tf.GradientTape() as tape:
            y = clone(tf.constant(x, tf.float64))
        return y.shape[-1], tape.jacobian(y, clone.trainable_weights)

    (outputs, j1), (_, j2) = jacobians(x1), jacobians(x2)
    out = {}
    for layer, original in zip(clone.layers, model.layers):
        picked = [i for i, w in enumerate(clone.trainable_weights)
                  if any(w is lw for lw in layer.trainable_weights)]
        flat = lambda js, n: np.concatenate(  # noqa: E731
            [np.reshape(js[i].numpy(), (n, outputs, -1)) for i in picked], -1)
        a, b = flat(j1, len(x1)), flat(j2, len(x2))
        out[original.name] = np.einsum("nkp,mkp->nm", a, b) / outputs
    return out


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
@pytest.mark.parametrize("implementation", ["structured", "jacobian"])
def test_per_layer_kernels_at_new_sizes_trace_nothing(implementation):
    """Per-layer kernels through the block factors (one Θ_l per group from the same
    factors): no trace at new N or x2 sizes, each layer's kernel equal to its float64
    Jacobian kernel."""
    model = _model()
    x = _x(60, 4)
    call = lambda a, b=None: keras_ntk.empirical_ntk(  # noqa: E731
        model, a, b, per_layer=True, implementation=implementation, dtype="float64")
    call(x[:16])
    seen = traces(model)
    for n1, n2 in [(9, None), (30, None), (13, 10), (7, None), (20, 27)]:
        x1, x2 = x[:n1], None if n2 is None else x[n1:n1 + n2]
        parts = call(x1, x2)
        expected = _per_layer_reference(model, x1, x1 if x2 is None else x2)
        assert list(parts) == list(expected)
        for name in parts:
            close(parts[name], expected[name], f"{name} at {n1} x {n2}")
        assert traces(model) == seen, (n1, n2)


def test_reused_sizes_stay_within_the_bounds_of_extra_work():
    from keras_ntk._batching import block_costs, reused_sizes

    fits = lambda *sizes: True  # noqa: E731
    assert block_costs((300,), (256,), "square") == (4 * 256, 512 ** 2)  # 3 blocks, 4 passes
    assert block_costs((300, 77), (128, 96), "pair") == (3 * 224, 384 * 96)
    # Padding up: within 2x the examples passed and 4x the work.
    assert reused_sizes({(256,)}, (100,), (128,), fits, "square") == (256,)
    assert reused_sizes({(256,)}, (50,), (64,), fits, "square") == (64,)
    # Cutting Θ(x, x) into more blocks recomputes both sides of each block: 257 → 384.
    assert reused_sizes({(256,)}, (257,), (384,), fits, "square") == (384,)
    # A pass over one side ("ntvp") costs no more in blocks; the budget decides.
    assert reused_sizes({(256,)}, (1000,), (1000,), fits, "side") == (256,)
    assert reused_sizes({(256,)}, (1000,), (1000,), lambda c: False, "side") == (1000,)
    assert reused_sizes({(256,)}, (77,), (96,), fits, "side") == (256,)  # up to 4x padding
    assert reused_sizes({(256,)}, (40,), (48,), fits, "side") == (48,)
    # The target itself when it ran already; the cheapest candidate otherwise.
    assert reused_sizes({(12, 12), (16, 16)}, (12, 12), (12, 12), fits, "pair") == (12, 12)
    assert reused_sizes({(24, 24), (16, 16)}, (11, 13), (12, 16), fits, "pair") == (16, 16)


def test_no_size_is_reused_under_a_multi_worker_strategy(monkeypatch):
    # Each process's compiled sizes are its own history; the workers must cut the same
    # blocks, so only a call's own rung is used there.
    from keras_ntk import _distribute, ntk

    model = mlp(3)
    x = np.random.default_rng(0).normal(size=(10, 5)).astype("float32")
    s = ntk.kernel_setup(model, x, None, (-1,), (), "auto", None, None, False, None)
    assert _block_factors.budget_fits(s, None)(16, 16)
    monkeypatch.setattr(_distribute, "multi_worker_strategy", lambda: object())
    assert not _block_factors.budget_fits(s, None)(16, 16)


def test_the_default_budget_is_the_smallest_of_the_workers(monkeypatch):
    """Each worker reads its own available memory; under several workers the default
    budget is the smallest of theirs (gathered once per strategy), so that every worker
    cuts the same blocks. An explicit `memory_budget` is used as given."""
    from keras_ntk import _distribute, ntk

    model = mlp(3)
    x = np.random.default_rng(0).normal(size=(10, 5)).astype("float32")
    setup = lambda budget=None: ntk.kernel_setup(  # noqa: E731
        model, x, None, (-1,), (), "auto", None, budget, False, None)
    own = setup().budget

    class Cluster:  # a multi-worker strategy: weak-referenceable, no collectives
        pass

    cluster, asked = Cluster(), []

    def gather(strategy, values):
        asked.append(values)
        return np.array([values, [values[0] // 3]], dtype=float)

    monkeypatch.setattr(_distribute, "multi_worker_strategy", lambda: cluster)
    monkeypatch.setattr(_distribute, "gather", gather)
    assert setup().budget == own // 3
    assert setup().budget == own // 3 and asked == [[own]]  # gathered once
    assert setup(2**30 + 5).budget == 2**30 + 5


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
@pytest.mark.parametrize("name", ["cnn", "text", "two_outputs", "residual"])
def test_per_layer_block_factors_equal_the_fused_per_layer_kernels(name, monkeypatch):
    """Convolutions, token gathers, two outputs, a subclassed model: the per-layer kernels
    through the factors (N on a new rung, x2 given) equal the fused path's, and add up to
    the float64 Jacobian kernel."""
    from ntk_reference import MODELS, inputs_for

    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    x1, x2 = inputs_for(name, 19), inputs_for(name, 11, seed=1)
    call = lambda a, b=None: keras_ntk.empirical_ntk(  # noqa: E731
        model, a, b, per_layer=True, dtype="float64")
    call(x1[:16])
    seen = traces(model)
    through_factors = [call(x1), call(x1, x2)]
    assert traces(model) == seen
    monkeypatch.setattr(_block_factors, "MIN_SIZE", 10 ** 9)  # the fused path only
    for parts, second in zip(through_factors, [None, x2]):
        fused = call(x1, second)
        assert list(parts) == list(fused)
        for layer in parts:
            for a, b in zip(*(p if isinstance(p, list) else [p] for p in (parts[layer],
                                                                            fused[layer]))):
                close(a, b, layer)
        total = reference(model, x1, second)
        summed = [sum(p[i] for p in parts.values()) for i in range(len(total))] if isinstance(
            total, list) else sum(parts.values())
        for a, b in zip(summed if isinstance(total, list) else [summed],
                        total if isinstance(total, list) else [total]):
            close(a, b, "sum over layers")


# ------------------------------------------------------------------ under a strategy


def _strategy_call(case, model):
    if case == "default":
        return lambda a, b=None: keras_ntk.empirical_ntk(model, a, b, dtype="float64")
    if case == "vector":
        return lambda a, b=None: keras_ntk.ntk_vector_product(
            model, a, b, _v(len(a if b is None else b), 2, len(a)), dtype="float64")
    return lambda a, b=None: keras_ntk.empirical_ntk(model, a, b, per_layer=True,
                                                     dtype="float64")


def _strategy_reference(case, model, x1, x2):
    if case == "default":
        return reference(model, x1, x2)
    if case == "vector":
        return reference(model, x1, x2) @ _v(len(x1 if x2 is None else x2), 2, len(x1))
    return _per_layer_reference(model, x1, x1 if x2 is None else x2)


def _close_case(case, actual, expected, message):
    """`close` for one `_strategy_call` case's result (per-layer: the dicts' values in
    order, since the twin's layers have other names)."""
    if case == "per_layer":
        assert len(actual) == len(expected)
        actual, expected = list(actual.values()), list(expected.values())
    for a, e in zip(*(v if case == "per_layer" else [v] for v in (actual, expected))):
        close(a, e, message)


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
@pytest.mark.parametrize("case, strategy_name", [
    ("default", "mirrored"), ("vector", "mirrored"), ("per_layer", "mirrored"),
    ("default", "one_device")])
def test_new_sizes_under_a_single_worker_strategy_trace_nothing(case, strategy_name,
                                                                mirrored_strategy):
    """MirroredStrategy over two logical CPUs (conftest) or OneDeviceStrategy: after a
    first call, new N (new rungs) and x2 sizes go through the block factors (factor and
    pair tasks spread over the replicas) and trace nothing; results equal float64
    Jacobian references."""
    strategy = (mirrored_strategy if strategy_name == "mirrored"
                else tf.distribute.OneDeviceStrategy("/cpu:1"))
    with strategy.scope():
        model = _model()
    twin = _model()  # the references' model: tape Jacobians of mirrored variables fail
    twin.set_weights(model.get_weights())
    call = _strategy_call(case, model)
    x = _x(60, 5)
    with strategy.scope():
        call(x[:16])
    seen = traces(model)
    assert seen > 0
    for n1, n2 in [(30, None), (13, 10), (20, 27)]:  # new rungs (16: 2 blocks of 8)
        x1, x2 = x[:n1], None if n2 is None else x[n1:n1 + n2]
        with strategy.scope():
            actual = call(x1, x2)
        _close_case(case, actual, _strategy_reference(case, twin, x1, x2), f"{n1} x {n2}")
        assert traces(model) == seen, (n1, n2)


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
@pytest.mark.parametrize("case", ["default", "vector", "per_layer"])
def test_new_sizes_under_several_workers_trace_nothing(case, mirrored_strategy, monkeypatch):
    """The multi-worker path in one process: `multi_worker_strategy` names the
    MirroredStrategy (one worker of two replicas, as `_distribute` sees it), so blocks go
    through `run_tasks_on_workers` (factors computed by every worker, pairs split) and
    the path is decided alike by every worker (`_distribute.gather`). After a first call,
    new N and x2 sizes trace nothing and equal float64 Jacobian references; workers that
    decide differently keep the fused path (a new rung compiles), exact too."""
    from keras_ntk import _distribute

    monkeypatch.setattr(_distribute, "multi_worker_strategy", lambda: (
        mirrored_strategy if tf.distribute.has_strategy()
        and tf.distribute.in_cross_replica_context() else None))
    with mirrored_strategy.scope():
        model = _model()
    twin = _model()
    twin.set_weights(model.get_weights())
    call = _strategy_call(case, model)

    def check(x1, x2):
        with mirrored_strategy.scope():
            actual = call(x1, x2)
        _close_case(case, actual, _strategy_reference(case, twin, x1, x2),
                    f"{len(x1)} x {x2 if x2 is None else len(x2)}")

    x = _x(60, 5)
    check(x[:16], None)
    seen = traces(model)
    assert seen > 0
    for n1, n2 in [(30, None), (13, 10), (20, 27)]:  # new rungs: through the factors
        blocks = _distribute.counts["blocks"]
        check(x[:n1], None if n2 is None else x[n1:n1 + n2])
        assert traces(model) == seen, (n1, n2)
        assert _distribute.counts["blocks"] > blocks  # run by `run_tasks_on_workers`
    real_gather = _distribute.gather

    def disagree(strategy, values):  # another worker decides otherwise
        rows = real_gather(strategy, values)
        return np.concatenate([rows, rows + 1])

    monkeypatch.setattr(_distribute, "gather", disagree)
    check(x[:40], None)
    assert traces(model) > seen


@pytest.mark.usefixtures("small_factor_blocks")  # conftest
@pytest.mark.parametrize("case", ["default", "vector"])
def test_models_of_one_architecture_share_their_functions_under_a_mirrored_strategy(
        case, mirrored_strategy):
    """Under a MirroredStrategy (two logical CPUs) block and factor functions are shared by
    architecture, as without one: a second model's first call and its new sizes trace
    nothing, and its kernels are its own (float64 Jacobian references of a twin)."""
    x = _x(60, 6)
    with mirrored_strategy.scope():
        first = _model()
        _strategy_call(case, first)(x[:16])
    seen = traces(first)
    assert seen > 0
    with mirrored_strategy.scope():
        second = _model()
        second.set_weights([1.3 * w + 0.05 for w in first.get_weights()])
    twin = _model()
    twin.set_weights(second.get_weights())
    call = _strategy_call(case, second)
    for n1, n2 in [(16, None), (30, None), (13, 10)]:
        x1, x2 = x[:n1], None if n2 is None else x[n1:n1 + n2]
        with mirrored_strategy.scope():
            actual = call(x1, x2)
        close(actual, _strategy_reference(case, twin, x1, x2), f"{n1} x {n2}")
        assert traces(first, second) == seen, (n1, n2)
