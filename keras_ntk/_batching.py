"""Blocks, compiled block functions and their placement on replicas.

The layer between a kernel function and the user's arrays, after
neural-tangents' `_src/batching.py`: inputs stay on the host, the kernel is
computed one block of x1 × x2 examples at a time by a compiled function
(cached per model and options), blocks are spread over the replicas of a
`tf.distribute` strategy, and each block is written into the host result.
The kernel functions themselves never know about blocks.
"""

import logging
import os
import threading
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_ntk import _distribute
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


def slice_examples(x, start, stop):
    return tf.nest.map_structure(lambda t: t[start:stop], x)


def gather_examples(x, index):
    """The examples `index` of host inputs (numpy fancy indexing per input)."""
    return tf.nest.map_structure(lambda t: t[index], x)


def block_ranges(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def kernel_tasks(block_function, results, out_axes, x1, x2, n1, n2, block):
    """[(fn, args, on_done)]: the blocks of Θ(x1, x2), each written into `results`.

    `block_function(same)` returns the compiled kernel function of one block:
    with same=True it takes one block of examples (a diagonal block of
    Θ(x, x)), with same=False two. With `x2=None` only the blocks on and
    above the diagonal are computed; those above are mirrored below it.
    """
    rows = block_ranges(n1, block)
    cols = rows if x2 is None else block_ranges(n2, block)
    tasks = []
    if x2 is None:
        fn_diag = block_function(True)
        fn_off = block_function(False) if len(rows) > 1 else None
        for i, (a0, a1) in enumerate(rows):
            for j, (b0, b1) in enumerate(rows):
                if j < i:
                    continue
                if i == j:
                    tasks.append((fn_diag, (slice_examples(x1, a0, a1),),
                                  placer(results, out_axes, a0, a1, b0, b1, False)))
                else:
                    tasks.append((fn_off, (slice_examples(x1, a0, a1), slice_examples(x1, b0, b1)),
                                  placer(results, out_axes, a0, a1, b0, b1, True)))
    else:
        fn = block_function(False)
        for a0, a1 in rows:
            for b0, b1 in cols:
                tasks.append((fn, (slice_examples(x1, a0, a1), slice_examples(x2, b0, b1)),
                              placer(results, out_axes, a0, a1, b0, b1, False)))
    return tasks


def placer(results, out_axes, a0, a1, b0, b1, mirror):
    def place(blocks):
        for k, (res, ax) in enumerate(zip(results, out_axes)):
            res[a0:a1, b0:b1] = blocks[k]
            if mirror:
                res[b0:b1, a0:a1] = swap_pairs(blocks[k], ax)
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

    def __call__(self, *args):
        if self._xla is not None:
            try:
                return self._xla(*args)
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
        return self._plain(*args)


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
        if strategy is None:
            fn, args, on_done = group[0]
            on_done([np.asarray(k) for k in fn(*args)])
        else:
            padded = group + [group[-1]] * (step - len(group))
            # Blocks of a group may call different functions (diagonal blocks).
            def replica_fn(index):
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                fn, args, _ = padded[replica]
                return fn(*[tf.nest.map_structure(tf.convert_to_tensor, a) for a in args])

            outputs = strategy.run(replica_fn, args=(0,))
            per_replica = [
                strategy.experimental_local_results(o) for o in tf.nest.flatten(outputs)
            ]
            for r, (_, _, on_done) in enumerate(group):
                on_done([np.asarray(p[r]) for p in per_replica])
        done += len(group)
        if progbar is not None:
            progbar.update(done)
