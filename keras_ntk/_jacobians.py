"""Per-example Jacobians of a model's outputs and their contraction into Θ.

The generic derivative behind the `jacobian` implementation of
`empirical_ntk`, and behind the structured one for the weights no rule
covers: J[n, s, w] = ∂f_s(x_n)/∂θ_w for every example, output entry and
weight, then Θ[n, m] = Σ_w J1[n, ·, w] J2[m, ·, w].

Every model call of the kernels goes through `call_flat`, which traces the
model's recurrent layers unrolled (see `unrolled`): TensorFlow can neither
vectorize (pfor) the gradient of a recurrent layer's `tf.while_loop` nor run
forward mode through it, but both work on the unrolled loop. It also traces
the layers whose TensorFlow derivatives are wrong (grouped convolutions,
resizing) through exact replacements (`_exact_calls.exact_derivatives`).
"""

import contextlib
import logging
import threading
import weakref

import keras
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla as _xla
from tensorflow.python.ops import control_flow_util
from tensorflow.python.ops.parallel_for import control_flow_ops as _pfor

from keras_ntk._exact_calls import exact_derivatives, forward_mode_watch
from keras_ntk._weights import iter_layers

_ZERO = tf.UnconnectedGradients.ZERO
_LOGGER = logging.getLogger("keras_ntk")
# `unroll` is state of the layer, shared by every thread tracing it (the
# replicas of a MirroredStrategy trace one model concurrently, kernels of
# different models may run in threads): each recurrent layer counts the traced
# calls inside `unrolled` and is restored when the last one leaves. The lock
# guards only the counts, never a model call: held across the call, it made
# kernels of different models in threads wait for each other, and a call
# waiting for another thread's call (which needed the lock) waited forever.
_UNROLL_LOCK = threading.Lock()
_UNROLLED = {}  # recurrent layer -> number of calls inside `unrolled` holding it
_LOGGED = weakref.WeakSet()  # models whose unrolling was logged (freed models drop out)


def recurrent_layers(model):
    """The `keras.layers.RNN` layers (LSTM, GRU, SimpleRNN, ...) nested in `model`."""
    return [layer for layer in iter_layers(model) if isinstance(layer, keras.layers.RNN)]


@contextlib.contextmanager
def unrolled(model):
    """Traces `model`'s recurrent layers as Python loops over the time steps.

    A Keras RNN layer runs its cell in a `tf.while_loop` unless `unroll=True`.
    Vectorizing the gradient of that loop over examples or output entries
    (`tf.vectorized_map`, `tape.jacobian`) fails in TF 2.21 ("Tried to take
    gradients ... of a variable without handle data"), and
    `tf.autodiff.ForwardAccumulator` cannot push tangents through it; the
    unrolled loop is the same maths as straight-line code, which both handle
    (and XLA compiles). So `unroll` is set to True on every recurrent layer for
    the duration of one traced call and restored afterwards. The time
    dimension is static inside the kernels' traced functions (their inputs
    are concrete blocks), which unrolling requires. The graph grows linearly
    with the number of time steps. Calls may overlap, in threads and nested,
    on one model or on models sharing a layer: a layer is restored when the
    last of them leaves.
    """
    with _UNROLL_LOCK:
        held = [layer for layer in recurrent_layers(model)
                if layer in _UNROLLED or not layer.unroll]
        for layer in held:
            _UNROLLED[layer] = _UNROLLED.get(layer, 0) + 1
            layer.unroll = True
        log = bool(held) and model not in _LOGGED
        if log:
            _LOGGED.add(model)
    if log:
        _LOGGER.info(
            "keras_ntk: tracing the recurrent layers %s unrolled over time (vectorized "
            "Jacobians and forward mode cannot run through a tf.while_loop)",
            [layer.name for layer in held])
    try:
        yield
    finally:
        with _UNROLL_LOCK:
            for layer in held:
                _UNROLLED[layer] -= 1
                if not _UNROLLED[layer]:
                    del _UNROLLED[layer]
                    layer.unroll = False


def call_flat(model, x, training):
    """The model's outputs on `x` as a flat list of tensors (recurrent layers unrolled,
    layers whose TensorFlow derivatives are wrong through exact replacements)."""
    with unrolled(model), exact_derivatives(model):
        ys = model(x, training=training)
    return [tf.convert_to_tensor(y) for y in tf.nest.flatten(ys)]


def jvps(model, x, training, primals, tangents):
    """J(x)·t of every output of `model` (flat), in forward mode: one pass carrying the
    tangents of `primals`; warns about ops TensorFlow cannot push them through
    (`_exact_calls.forward_mode_watch`)."""
    with tf.autodiff.ForwardAccumulator(primals, list(tangents)) as acc, forward_mode_watch(
            'implementation="ntvp"'):
        ys = call_flat(model, x, training)
    return [acc.jvp(y, unconnected_gradients=_ZERO) for y in ys]


def identity_seeds(size, dtype):
    """The (size, size) identity, behind an optimization barrier when traced for XLA
    (see `tape_jacobian`: XLA would constant-fold every product of it at compile time)."""
    seeds = tf.eye(size, dtype=dtype)
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        seeds = _xla.optimization_barrier(seeds)[0]
    return seeds


def tape_jacobian(tape, target, sources):
    """`tape.jacobian`, with zeros for unconnected sources.

    As `tape.jacobian`, one vectorized (pfor) gradient per target entry, seeded here
    with the rows of an identity that, when traced for XLA, sits behind an
    optimization barrier. With the seed a constant (as in `tape.jacobian`), the
    cotangents of a model's head are constants, and XLA constant-folds every product
    of them (e.g. their (N, K²) Gram) with its slow evaluator at compile time: 15-45 s
    for one 2048-example block of a 10-output MLP, minutes for larger ones, for what
    takes milliseconds to compute. (pfor fails on `unconnected_gradients=ZERO` in
    TF 2.21, so the zeros are filled in afterwards.)
    """
    size = target.shape.num_elements()
    if size is None:
        jac = tape.jacobian(target, sources)
    else:
        seeds = identity_seeds(size, target.dtype)
        jac = _pfor.pfor(lambda i: tape.gradient(
            target, sources, output_gradients=tf.reshape(tf.gather(seeds, i), target.shape)),
            size)
        if target.shape.rank != 1:  # (size, *source) back to (*target, *source)
            jac = [j if j is None else tf.reshape(
                       j, tf.concat([tf.shape(target), tf.shape(j)[1:]], 0))
                   for j in jac]
    return [
        tf.zeros(tf.concat([tf.shape(target), tf.shape(s)], 0), target.dtype)
        if j is None else j
        for j, s in zip(jac, sources)
    ]


def per_example_jacobians(model, x, weights, training, sizes):
    """Per-example Jacobians J[n, s, w] of all outputs w.r.t. `weights`, vectorized.

    Returns one (N, S_k, W) tensor per output k, W = Σ |w| (weights flattened
    and concatenated).
    """
    total = sum(sizes)
    # Static widths: a gradient may come back with an unknown shape (e.g. through the
    # forward-mode ops of a `Linearize`d model), which a `-1` cannot recover.
    widths = [w.shape.num_elements() or -1 for w in weights]

    def one(xi):
        xi = tf.nest.map_structure(lambda t: t[None], xi)
        with tf.GradientTape() as tape:
            # Tensors standing for the variables (functions shared by architecture).
            tape.watch([w for w in weights if isinstance(w, tf.Tensor)])
            ys = call_flat(model, xi, training)
            flat = tf.concat([tf.reshape(y, [-1]) for y in ys], 0)
            if total == 1:
                flat = flat[0]
        if total == 1:
            grads = tape.gradient(flat, weights, unconnected_gradients=_ZERO)
            grads = [tf.reshape(g, [1, n]) for g, n in zip(grads, widths)]
        else:
            grads = tape_jacobian(tape, flat, weights)
            grads = [tf.reshape(g, [total, n]) for g, n in zip(grads, widths)]
        return tf.concat(grads, -1)

    jac = tf.vectorized_map(one, x)  # (N, S_total, W)
    return tf.split(jac, sizes, axis=1)


def full_batch_jacobians(model, x, weights, training, sizes):
    """Jacobians of the whole batch's outputs (for training-mode coupled models)."""
    with tf.GradientTape() as tape:
        ys = call_flat(model, x, training)
        flat = tf.concat([tf.reshape(y, [tf.shape(y)[0], -1]) for y in ys], 1)
    n = tf.shape(flat)[0]
    jac = tape_jacobian(tape, flat, weights)
    jac = tf.concat([tf.reshape(j, [n, sum(sizes), -1]) for j in jac], -1)
    return tf.split(jac, sizes, axis=1)


def dense_gram(a1, a2, bias=False):
    """A1 A2ᵀ of one-position, one-group a-factors (N, 1, 1, A). `bias`: their last
    column is the bias column (the constant 1 of `_structured._Rule.patches`), so the
    product runs over the other columns, + 1. One slice of each 4-D factor, which XLA
    resolves to the layer's input itself: no (N, A + 1) copy with the column appended,
    nor a copy of the input (MLP-1: 0.1 ms of a 1.9 ms program)."""
    a1, a2 = (a1[:, 0, 0, :-1], a2[:, 0, 0, :-1]) if bias else (a1[:, 0, 0], a2[:, 0, 0])
    gram = tf.matmul(a1, a2, transpose_b=True)
    return gram + 1.0 if bias else gram


def contract_jacobians(j1, j2, axes, dtype):
    """Θ from per-example factors laid out as (N, *S, W): Σ_w j1 j2."""
    j1 = tf.cast(tf.reshape(j1, tf.concat([tf.shape(j1)[: 1 + len(axes.shape)], [-1]], 0)), dtype)
    j2 = tf.cast(tf.reshape(j2, tf.concat([tf.shape(j2)[: 1 + len(axes.shape)], [-1]], 0)), dtype)
    return tf.einsum(
        f"n{axes.sub1}z,m{axes.sub2}z->nm{axes.out}", j1, j2
    )
