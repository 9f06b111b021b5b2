"""Blocks, compiled block functions and their placement on replicas.

The layer between a kernel function and the user's arrays, after
neural-tangents' `_src/batching.py`: inputs stay on the host, the kernel is
computed one block of x1 × x2 examples at a time by a compiled function
(cached per model and options), blocks are spread over the replicas of a
`tf.distribute` strategy, and each block is written into the host result.
The kernel functions themselves never know about blocks.
"""

import collections
import contextlib
import functools
import logging
import os
import threading
import weakref

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.ops.resource_variable_ops import ResourceVariable as _ResourceVariable

from keras_ntk import _architecture, _distribute, _validation
from keras_ntk._output_axes import swap_pairs

# Compiled block functions, per model and options, so that repeated calls
# (a callback computing the kernel every epoch) do not retrace.
_COMPILED = weakref.WeakKeyDictionary()

# XLA compilation of the block functions. "auto": try XLA, fall back to plain
# graphs when XLA cannot compile a model. Overridable for debugging through
# the environment variable KERAS_NTK_JIT=0/1.
_JIT = os.environ.get("KERAS_NTK_JIT", "auto")
_LOGGER = logging.getLogger("keras_ntk")


def to_host(x, name):
    if x is None:
        return None
    try:
        return tf.nest.map_structure(lambda t: np.asarray(t), x)
    except Exception as e:  # noqa: BLE001 - report what was received
        raise TypeError(
            f"Expected `{name}` to be an array or a structure of arrays. "
            f"Received: {name}={type(x)}"
        ) from e


def num_examples(x, name):
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in tf.nest.flatten(x)}
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        raise ValueError(
            f"Expected `{name}` to hold a non-empty batch with the same leading size "
            f"in every input. Received: {name} with leading sizes {sorted(sizes)}"
        )
    return sizes.pop()


def host_inputs(x1, x2):
    """`x1` and `x2` (or None) as host arrays, checked before any work.

    Non-empty batches, matching example shapes and finite values; returns
    `(x1, x2, n1, n2)` with `n2 = n1` when `x2` is None.
    """
    x1 = to_host(x1, "x1")
    n1 = num_examples(x1, "x1")
    n2 = n1
    if x2 is not None:
        x2 = to_host(x2, "x2")
        n2 = num_examples(x2, "x2")
        _validation.check_matching_inputs(x1, x2)
    _validation.check_finite(x1, "x1")
    _validation.check_finite(x2, "x2")
    return x1, x2, n1, n2


@contextlib.contextmanager
def frozen_state(model, training):
    """Restores the non-trainable variables (BatchNorm statistics) a training-mode
    forward pass moves: computing a kernel must not change the model."""
    if not training:
        yield
        return
    saved = [(v, v.numpy()) for v in model.non_trainable_weights]
    try:
        yield
    finally:
        for v, value in saved:
            v.assign(value)


def slice_examples(x, start, stop):
    return tf.nest.map_structure(lambda t: t[start:stop], x)


def gather_examples(x, index):
    """The examples `index` of host inputs (numpy fancy indexing per input)."""
    return tf.nest.map_structure(lambda t: t[index], x)


def block_ranges(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


# ----------------------------------------------------------------- fixed block shapes
#
# A compiled block function is traced (and compiled by XLA) once per input
# shape, which costs 10-100x a warm call. Blocks are therefore padded to a
# few fixed sizes, the ladder 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ... (2^k and
# 3·2^(k-1)): every call whose sizes fall on the same rungs reuses the same
# compiled functions. Padding repeats the block's last example (a valid
# input for any model, unlike zeros for e.g. a log or an Embedding); the
# padded rows and columns are discarded. Exact because examples are
# independent in inference mode (training-mode BatchNorm couples them: those
# blocks are never padded).


def ladder_sizes(top):
    """The ladder 1, 2, 3, 4, 6, 8, 12, ... from `bucket(top)` down to 1, largest first."""
    return list(_ladder(top))


@functools.lru_cache(maxsize=1024)
def _ladder(top):
    # Remembered: every call's planning asks for it dozens of times (block sizes tried
    # per implementation), 0.2 ms of a warm MLP call's 0.25 ms of `kernel_setup`.
    sizes, b = [], 1
    while True:
        for c in (b, 3 * b // 2) if b >= 2 else (b,):
            sizes.append(c)
            if c >= top:
                return tuple(sorted(set(sizes), reverse=True))
        b *= 2


def bucket(n):
    """The smallest ladder size ≥ n (n itself on the ladder: 8, 12, 16, 24, ...)."""
    return _ladder(n)[0]


def padded_size(n, block):
    """The fixed leading size of the blocks of `n` examples cut into `block`s."""
    return min(block, bucket(n))


def pad_examples(x, size):
    """Host inputs with `size` examples: the last example repeated to fill up."""
    def pad(t):
        missing = size - t.shape[0]
        if missing <= 0:
            return t
        return np.concatenate([t, np.repeat(t[-1:], missing, axis=0)], axis=0)
    return tf.nest.map_structure(pad, x)


def padded_slice(x, start, stop, size):
    """Examples start:stop of host inputs, padded to `size` (None: not padded)."""
    part = slice_examples(x, start, stop)
    return part if size is None else pad_examples(part, size)


# A new N should not even need a new rung once the model has been seen: `kernel_tasks`
# given `fits` first looks at the sizes its compiled functions have already run at
# (`traced_sizes`) and reuses one (`reused_sizes`) within the memory budget, when that
# costs at most MAX_EXTRA_PASSES× the examples passed through the model (forward and
# backward: the block functions' main cost on CPU, measured) and MAX_EXTRA_WORK× the
# padded contraction work of the target sizes. A smaller size cutting Θ(x, x) into b²
# blocks passes b²·c examples (each off-diagonal block recomputes both sides), so in
# practice a larger size is reused (N up to the size seen) and a smaller one only
# where the target is cut into blocks too.
MAX_EXTRA_PASSES = 2
MAX_EXTRA_WORK = 4


def traced_sizes(fn):
    """The set of padded sizes (tuples) compiled block function `fn` has run at (its
    shared function's, for one shared by architecture); updated by the callers."""
    owner = getattr(getattr(fn, "shared", None), "fn", fn)
    if not hasattr(owner, "traced_sizes"):
        owner.traced_sizes = set()
    return owner.traced_sizes


def block_costs(ns, sizes, kind):
    """(examples passed through the model, padded contraction work) of `ns` examples per
    side in blocks of `sizes`: kind "square" for Θ(x, x) (blocks on and above the
    diagonal; off-diagonal blocks pass both sides), "pair" for Θ(x1, x2), "side" for a
    pass over the examples of one side (the VJPs/JVPs of "ntvp")."""
    counts = [-(-n // c) for n, c in zip(ns, sizes)]
    if kind == "square":
        (b,), (c,) = counts, sizes
        return b * b * c, (b * c) ** 2
    if kind == "pair":
        blocks = counts[0] * counts[1]
        return blocks * (sizes[0] + sizes[1]), blocks * sizes[0] * sizes[1]
    return counts[0] * sizes[0], counts[0] * sizes[0]


def reused_sizes(traced, ns, target, fits, kind):
    """The padded sizes (one per side) for `ns` examples per side: among `traced` (size
    tuples a compiled function ran at) the cheapest (`block_costs`) that `fits(*sizes)`
    the budget and costs at most MAX_EXTRA_PASSES× the passes (MAX_EXTRA_WORK× for a
    "side": its blocks repeat nothing) and MAX_EXTRA_WORK× the work of `target`; else
    `target`."""
    passes, work = block_costs(ns, target, kind)
    usable = []
    for t in traced:
        if len(t) != len(ns) or tuple(t) == tuple(target):
            continue
        p, w = block_costs(ns, t, kind)
        extra = MAX_EXTRA_WORK if kind == "side" else MAX_EXTRA_PASSES  # side: no recompute
        if p <= extra * passes and w <= MAX_EXTRA_WORK * work and fits(*t):
            usable.append(((p, w, t), t))
    if tuple(target) in traced or not usable:
        return tuple(target)
    return min(usable)[1]


def kernel_tasks(block_function, results, out_axes, x1, x2, n1, n2, block, pad=True,
                 fits=None, place=None):
    """[(fn, args, on_done)]: the blocks of Θ(x1, x2), each written into `results`.

    `block_function(same)` returns the compiled kernel function of one block:
    with same=True it takes one block of examples (a diagonal block of
    Θ(x, x)), with same=False two. With `x2=None` only the blocks on and
    above the diagonal are computed; those above are mirrored below it.
    With `pad`, every block is padded to `padded_size` examples (one fixed
    shape per side) and the padding cut off its kernel block. With `pad` and
    `fits(p1, p2)` (whether blocks of p1 × p2 fit the memory budget), a size
    the functions already ran at is reused (`reused_sizes`). `place(a0, a1, b0, b1,
    mirror)` gives the on_done of the block of rows a0:a1 and columns b0:b1 (default:
    written into `results`, `placer`).
    """
    if place is None:
        def place(a0, a1, b0, b1, mirror):
            return placer(results, out_axes, a0, a1, b0, b1, mirror)
    rows = block_ranges(n1, block)
    cols = rows if x2 is None else block_ranges(n2, block)
    p1 = padded_size(n1, block) if pad else None
    p2 = p1 if x2 is None else (padded_size(n2, block) if pad else None)
    tasks = []
    if x2 is None:
        fn_diag = block_function(True)
        if pad and fits is not None:
            # (c,): the diagonal function ran at c; (c, c): the off-diagonal one too
            seen = traced_sizes(fn_diag)
            square = {t for t in seen if len(t) == 1 and (t[0] >= n1 or t * 2 in seen)}
            p1 = p2 = reused_sizes(square, (n1,), (p1,), lambda c: fits(c, c), "square")[0]
            rows = cols = block_ranges(n1, p1)
            seen.add((p1,))
            if len(rows) > 1:
                seen.add((p1, p1))
                traced_sizes(block_function(False)).add((p1, p1))
        fn_off = block_function(False) if len(rows) > 1 else None
        for i, (a0, a1) in enumerate(rows):
            for j, (b0, b1) in enumerate(rows):
                if j < i:
                    continue
                if i == j:
                    tasks.append((fn_diag, (padded_slice(x1, a0, a1, p1),),
                                  place(a0, a1, b0, b1, False)))
                else:
                    tasks.append((fn_off, (padded_slice(x1, a0, a1, p1),
                                           padded_slice(x1, b0, b1, p1)),
                                  place(a0, a1, b0, b1, True)))
    else:
        fn = block_function(False)
        if pad and fits is not None:
            p1, p2 = reused_sizes(traced_sizes(fn), (n1, n2), (p1, p2), fits, "pair")
            rows, cols = block_ranges(n1, p1), block_ranges(n2, p2)
            traced_sizes(fn).add((p1, p2))
        for a0, a1 in rows:
            for b0, b1 in cols:
                tasks.append((fn, (padded_slice(x1, a0, a1, p1), padded_slice(x2, b0, b1, p2)),
                              place(a0, a1, b0, b1, False)))
    return tasks


def placer(results, out_axes, a0, a1, b0, b1, mirror):
    def place(blocks):
        for k, (res, ax) in enumerate(zip(results, out_axes)):
            block = blocks[k][:a1 - a0, :b1 - b0]  # padding cut off
            res[a0:a1, b0:b1] = block
            if mirror:
                res[b0:b1, a0:a1] = swap_pairs(block, ax)
    return place


def model_cache(model):
    """The dict of compiled functions (and set-up facts) cached for `model`."""
    return _COMPILED.setdefault(model, {})


def compiled(model, key, builder, jit=True):
    """A tf.function per (model, key), created once and reused across calls.

    `jit=False`: a plain graph unless KERAS_NTK_JIT=1 (recurrent models: XLA
    compiles their unrolled loops many times slower and runs them slower).
    """
    per_model = model_cache(model)
    fn = per_model.get(key)
    if fn is None:
        jit = (jit or _JIT == "1") and _JIT != "0" and key[0] != "ntvp"
        fn = _JitFallback(builder, jit)
        per_model[key] = fn
    return fn


# ----------------------------------------------------------------- one function per architecture
#
# XLA keeps every compiled program in a per-device cache that never evicts
# (tensorflow#66434), and a traced graph costs memory too: a study that builds
# hundreds of models of one architecture would hold one compiled set per
# model. Block functions of models whose architecture is known exactly (a
# Functional or Sequential model of built-in Keras layers, described by its
# config with layer names canonicalized) are therefore shared: the weights
# are ARGUMENTS, substituted for the variables under `keras.StatelessScope`,
# and no model is held by the shared entry. A first trace that still reads a
# variable directly (a layer the substitution does not reach) marks the
# architecture unshareable: those models keep functions of their own.
_SHARED = collections.OrderedDict()
_SHARED_LIMIT = 32  # architectures × options kept; least recently used evicted
_SHARED_LOCK = threading.RLock()


def architecture_key(model):
    """A hashable description of what `model` computes up to its weights' values, or None."""
    cache = model_cache(model)
    if "architecture" not in cache:
        cache["architecture"] = _architecture.architecture_key(model)
    return cache["architecture"]


class _Shared:
    """A block function compiled once for all models of an architecture.

    `builder(state, values, *xs)` computes the block for the model whose
    (state, variables) the current call set: `values` maps id(variable) to the
    tensor argument that replaces it.
    """

    def __init__(self, builder, jit):
        # The (model, state) of the current call, per thread (a MirroredStrategy calls
        # from one thread per replica; threads calling models of one architecture do
        # not wait for each other's calls, as they did behind a lock).
        self._local = threading.local()
        self.shareable = None  # unknown until the first trace is inspected

        def traced(values, *xs):
            model, state = self._local.call_state
            variables = list(model.variables)
            # Variables arrive as arguments (read here, inside the compiled program,
            # not one eager read each per call); tensors as they are.
            values = [tf.convert_to_tensor(v) for v in values]
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                out = builder(state, {id(v): t for v, t in zip(variables, values)}, *xs)
            # Whether the floating variables it read are finite, computed in the same
            # program: checked after the call instead of reading each weight to the host
            # before it (0.25-0.7 ms of a 5 ms MLP call; `check_finite_weights`). One sum
            # per weight, non-finite if any entry is (NaN + x, Inf - Inf: NaN; Inf + x:
            # Inf), or if finite entries overflow it (the host check then finds none):
            # a third of the cost of is_finite per entry (MLP-1, 0.05 against 0.16 ms).
            sums = [tf.reduce_sum(tf.cast(t, tf.float32) if t.dtype.size < 4 else t)
                    for v, t in zip(variables, values) if v.trainable and t.dtype.is_floating]
            return out, tf.math.is_finite(tf.stack(sums)) if sums else tf.ones([0], tf.bool)

        self.fn = _JitFallback(traced, jit)

    def __call__(self, model, state, *xs):
        """The block's outputs; raises `NonFiniteError` (naming the weight) if a
        trainable weight of `model` is not finite."""
        variables = model.variables
        plain = not tf.distribute.has_strategy()
        values = [_argument(v, plain) for v in variables]
        self._local.call_state = (model, state)
        try:
            out, finite = self.fn(values, *xs)
            if self.shareable is None:
                self.shareable = not _reads_variables(self.fn, values, xs)
        finally:
            self._local.call_state = None
        if not np.asarray(finite).all():
            # Names the first non-finite weight; finds none when finite weights merely
            # overflowed a sum, and the block stands.
            _validation.check_finite_weights(model.trainable_variables)
        return out


def _argument(variable, plain):
    """A Keras variable as an argument of a shared function: its tf.Variable (one trace
    serves every variable of that shape and dtype; read inside the function), else (under
    a strategy: `plain` False) its value."""
    value = getattr(variable, "value", variable)
    if isinstance(value, tf.Variable) and plain:
        return value
    return tf.convert_to_tensor(variable)


def _reads_variables(fn, values, xs):
    """Whether the traced function captured a variable (read it directly, not as an argument)."""
    active = fn._xla if fn._xla is not None else fn._plain
    concrete = active.get_concrete_function(values, *xs)
    return any(t.dtype == tf.resource for t in concrete.captured_inputs)


def shared_compiled(model, key, builder, state, jit_allowed=True):
    """`fn(*xs)` running the block function shared by `model`'s architecture, or None.

    None when the architecture is unknown or found unshareable; the caller then
    compiles a function of its own (`compiled`). `key` holds the options (with
    weights as indices into `model.variables`); `state` is what `builder`
    needs of this model (never held after the call).
    """
    arch = architecture_key(model)
    if arch is None:
        return None
    jit = (jit_allowed or _JIT == "1") and _JIT != "0"
    full_key = (arch, key, jit)
    with _SHARED_LOCK:
        entry = _SHARED.get(full_key)
        if entry is None:
            entry = _Shared(builder, jit)
            _SHARED[full_key] = entry
            while len(_SHARED) > _SHARED_LIMIT:
                _SHARED.popitem(last=False)
        else:
            _SHARED.move_to_end(full_key)
    if entry.shareable is False:
        return None
    model_ref = weakref.ref(model)

    def call(*xs):
        current = model_ref()
        if current is None:
            raise RuntimeError("The model of this kernel block no longer exists. Received: a "
                               "call after the model was freed")
        return entry(current, state, *xs)

    call.shared = entry
    return call


_SHARED_VALUES = collections.OrderedDict()


def shared_value(model, key, weights, make):
    """`make()` computed once per (architecture, key, weights as indices): for facts
    about a model that do not depend on its weights' values (e.g. its profile).
    Computed for `model` alone when its architecture is unknown."""
    arch = architecture_key(model)
    if arch is None:
        return make()
    index = {id(v): i for i, v in enumerate(model.variables)}
    if any(id(w) not in index for w in weights):
        return make()
    full_key = (arch, key, tuple(index[id(w)] for w in weights))
    with _SHARED_LOCK:
        if full_key in _SHARED_VALUES:
            _SHARED_VALUES.move_to_end(full_key)
            return _SHARED_VALUES[full_key]
    value = make()
    with _SHARED_LOCK:
        _SHARED_VALUES[full_key] = value
        while len(_SHARED_VALUES) > _SHARED_LIMIT:
            _SHARED_VALUES.popitem(last=False)
    return value


def block_functions(model):
    """The compiled block functions (`_JitFallback`) serving `model`: its own and
    those shared by its architecture (for tests and diagnostics)."""
    cache = model_cache(model)
    own = [f for f in cache.values() if isinstance(f, _JitFallback)]
    arch = cache.get("architecture")
    with _SHARED_LOCK:
        shared = [e.fn for (a, _, jit), e in _SHARED.items()
                  if arch is not None and a == arch and jit == (_JIT != "0")]
    return own + shared


class _JitFallback:
    """Runs a block function under XLA, falling back to a plain graph if XLA cannot compile it.

    Only XLA's compile errors lead to the fallback, and only when the plain graph
    then succeeds: an error the model raises itself (a ValueError at tracing, a
    failing op at run time) is raised as it is, and XLA stays on. The fallback is
    logged once per function.
    """

    _XLA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                   tf.errors.InternalError)

    def __init__(self, builder, jit):
        self._plain = tf.function(builder, autograph=False)
        self._xla = tf.function(builder, jit_compile=True, autograph=False) if jit else None
        self._lock = threading.Lock()
        self._concrete = {}  # (xla?, signature of the arguments): concrete function

    def _run(self, fn, args):
        """`fn(*args)`; an eager call without a strategy whose arguments have a signature
        seen before goes straight to that trace's concrete function (`tf.function`'s own
        dispatch, which binds and types every argument again, cost 0.2-1 ms a call)."""
        key, args = _signature(args)  # NumPy arrays as tensors (concrete calls need them)
        if key is None:
            return fn(*args)
        key = (fn is self._xla, key)
        concrete = self._concrete.get(key)  # False: a call it could not bind
        if concrete is not None and concrete is not False:
            try:
                return concrete(*args)
            except TypeError:  # arguments it does not bind (a default argument left out)
                self._concrete[key] = False
        out = fn(*args)
        if concrete is None and len(self._concrete) < _CONCRETE_LIMIT:
            self._concrete[key] = fn.get_concrete_function(*args)  # the trace just run
        return out

    def __call__(self, *args):
        if self._xla is not None:
            try:
                return self._run(self._xla, args)
            except self._XLA_ERRORS as xla_error:
                if _JIT == "1":
                    raise
                result = self._plain(*args)  # the model's own errors surface here
                self._xla = None
                reason = str(xla_error).strip().splitlines()
                _LOGGER.warning(
                    "keras_ntk: XLA could not compile a kernel block function; it runs as a "
                    "plain graph instead (set KERAS_NTK_JIT=1 to raise). XLA said: %s",
                    reason[0] if reason else type(xla_error).__name__,
                )
                return result
        return self._run(self._plain, args)


_CONCRETE_LIMIT = 64  # argument signatures remembered per compiled function


def _signature(args):
    """(a hashable signature of a block function's arguments, the arguments with NumPy
    arrays as tensors): their nesting, and per leaf its kind, shape and dtype. (None, args)
    in a graph, under a strategy (traces there depend on the device and replica context) or
    for leaves other than tensors, arrays and plain resource variables (a distributed
    variable, a Python number)."""
    if not tf.executing_eagerly() or tf.distribute.has_strategy():
        return None, args

    def sig(value):
        if isinstance(value, (list, tuple)):
            parts = [sig(v) for v in value]
            if any(key is None for key, _ in parts):
                return None, value
            return ((type(value) is tuple, tuple(key for key, _ in parts)),
                    type(value)(v for _, v in parts))
        if isinstance(value, dict):
            parts = {k: sig(v) for k, v in value.items()}
            if any(key is None for key, _ in parts.values()):
                return None, value
            return (("dict", tuple((k, parts[k][0]) for k in sorted(parts))),
                    {k: v for k, (_, v) in parts.items()})
        if type(value) is _ResourceVariable:
            return ("variable", tuple(value.shape), value.dtype.name), value
        if isinstance(value, np.ndarray):
            value = tf.convert_to_tensor(value)
        if isinstance(value, tf.Tensor):
            return ("tensor", tuple(value.shape), value.dtype.name), value
        return None, value

    key, converted = sig(args)
    return (None, args) if key is None else (key, converted)


def _strategy():
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        strategy = tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync > 1:
            return strategy
    return None


def run_tasks(tasks, verbose):
    """Runs [(fn, args, on_done)] blocks, spread over replicas under a strategy."""
    progbar = keras.utils.Progbar(len(tasks), unit_name="block") if verbose else None
    strategy = _strategy()
    if strategy is not None and _distribute.multi_worker_strategy() is strategy:
        return _distribute.run_tasks_on_workers(strategy, tasks, progbar)  # W workers
    step = strategy.num_replicas_in_sync if strategy is not None else 1
    done = 0
    for start in range(0, len(tasks), step):
        group = tasks[start:start + step]
        # Blocks of a group may call different functions (diagonal blocks); a replica
        # without a block of its own returns zeros, not the last one again.
        _distribute.run_group(strategy, group)
        done += len(group)
        if progbar is not None:
            progbar.update(done)
