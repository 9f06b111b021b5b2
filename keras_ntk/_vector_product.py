"""The product Θ(x1, x2)·v of `ntk_vector_product`, Θ never formed whole.

`keras_ntk.ntk.ntk_vector_product` validates its arguments and builds the
set-up (`ntk.kernel_setup`); this module computes the product from it:

* `implementation="ntvp"`: u = J(x2)ᵀ w accumulated over blocks of x2 (VJPs),
  then J(x1) u one block of x1 at a time (JVPs), never forming J or Θ;
* otherwise: each block of Θ from the compiled block function of `ntk`
  (passed in), multiplied by the matching rows of v.
"""

import numpy as np
import tensorflow as tf

from keras_ntk import _block_factors
from keras_ntk._batching import (
    block_ranges, bucket, compiled, frozen_state, kernel_tasks, padded_size, padded_slice,
    reused_sizes, run_tasks, traced_sizes)
from keras_ntk._jacobians import call_flat, jvps
from keras_ntk._output_axes import cotangents_from_vector, swap_pairs, vector_from_products

_ZERO = tf.UnconnectedGradients.ZERO


def _vjp_columns(plan, x, cotangents, k):
    """[J(x)ᵀ w_v for each weight], stacked over the V cotangents w (V, N, *S_k) of output k."""
    weights = plan.weights

    def one(cot):
        with tf.GradientTape() as tape:
            y = call_flat(plan.model, x, plan.training)[k]
        return tape.gradient(y, weights, output_gradients=tf.cast(cot, y.dtype),
                             unconnected_gradients=_ZERO)

    return tf.vectorized_map(one, cotangents, fallback_to_while_loop=True)


def _jvp_columns(plan, x, tangents, k):
    """J(x) u_v of output k for V stacked tangents u (one (V, *w.shape) per weight)."""
    primals = [w.value if hasattr(w, "value") else w for w in plan.weights]

    def one(u):
        return jvps(plan.model, x, plan.training, primals, u)[k]

    return tf.vectorized_map(one, tuple(tangents), fallback_to_while_loop=True)


def prepare_vectors(s, v):
    """v as one float array (N2, *kept axes, columns) per output, and per output whether
    the caller gave no columns axis (then squeezed from the result)."""
    vs = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(vs) != len(s.out_axes):
        raise ValueError(
            f"Expected one vector per model output ({len(s.out_axes)}). "
            f"Received: v with {len(vs)} entries"
        )
    np_dtype = s.plan.dtype.as_numpy_dtype
    prepared, squeeze = [], []
    for k, (vk, ax) in enumerate(zip(vs, s.out_axes)):
        vk = np.asarray(vk, np_dtype)
        expected = (s.n2, *ax.vec_shape)
        if vk.shape == expected:
            vk, sq = vk[..., None], True
        elif vk.ndim == len(expected) + 1 and vk.shape[:-1] == expected:
            sq = False
        else:
            raise ValueError(
                f"Expected v for output {k} to have shape {expected} (optionally with "
                f"a trailing axis of columns). Received: v.shape={vk.shape}"
            )
        prepared.append(vk)
        squeeze.append(sq)
    return prepared, squeeze


def _pad_rows(w, size):
    """Cotangents (V, n, ...) with zero rows up to `size` examples (they add nothing)."""
    missing = size - w.shape[1]
    if missing <= 0:
        return w
    return np.concatenate([w, np.zeros((w.shape[0], missing, *w.shape[2:]), w.dtype)], 1)


def _one_side(fn, n, block, columns, fits):
    """The padded size of the blocks of `n` examples for a VJP/JVP function run with
    `columns` stacked vectors: one it already ran at, when one fits (`reused_sizes`)."""
    traced = traced_sizes(fn)
    same_columns = {(c,) for c, v in traced if v == columns}
    size = reused_sizes(same_columns, (n,), (padded_size(n, block),), lambda c: fits(c, c),
                        "side")[0]
    traced.add((size, columns))
    return size


def vector_product(s, v, ntvp, block_function, verbose, batch_size=None):
    """One array (N1, *kept axes[, columns]) per output: Θ(x1, x2)·v for the set-up `s`.

    `ntvp`: matrix-free VJPs then JVPs; else `block_function(same=False)` is the
    compiled function of one block of Θ. Blocks are padded to sizes the compiled
    functions already ran at when those fit (`_batching.reused_sizes`), else to their
    rung (`padded_size`): the last example repeated, with zero cotangents ("ntvp"),
    its rows cut off. "ntvp" pads the columns of v with zeros to their rung (`bucket`).
    """
    if s.same:
        s.x2 = s.x1
    prepared, squeeze = prepare_vectors(s, v)
    np_dtype = s.plan.dtype.as_numpy_dtype
    fits = _block_factors.budget_fits(s, batch_size, vector=True)
    given = [vk.shape[-1] for vk in prepared]
    if ntvp:  # zero columns: a few compiled column counts serve every count
        prepared = [np.concatenate([vk, np.zeros((*vk.shape[:-1], bucket(c) - c), vk.dtype)], -1)
                    for vk, c in zip(prepared, given)]
    results = [np.zeros((s.n1, *ax.vec_shape, vk.shape[-1]), np_dtype)
               for ax, vk in zip(s.out_axes, prepared)]
    model = s.plan.model
    tasks = []
    if ntvp:
        # Matrix-free: u = J(x2)ᵀ w accumulated over the column blocks (VJPs),
        # then J(x1) u one row block at a time (JVPs): one pass over x2 and one
        # over x1 per output, holding V = columns·|traced| weight-sized vectors.
        plan = s.plan
        weights_key = tuple(id(w) for w in plan.weights)
        for k, ax in enumerate(s.out_axes):
            vjp_fn = compiled(plan.model, ("ntvp", "vjp", k, plan.training, weights_key),
                              lambda xb, w, k=k: _vjp_columns(plan, xb, w, k))
            jvp_fn = compiled(plan.model, ("ntvp", "jvp", k, plan.training, weights_key),
                              lambda xb, *u, k=k: [_jvp_columns(plan, xb, list(u), k)])
            columns = prepared[k].shape[-1]
            p2 = _one_side(vjp_fn, s.n2, s.block, columns, fits)
            p1 = _one_side(jvp_fn, s.n1, s.block, columns, fits)
            accumulated = []
            vjp_tasks = []
            for b0, b1 in block_ranges(s.n2, p2):
                w = cotangents_from_vector(prepared[k][b0:b1], ax).astype(
                    plan.model_dtype.as_numpy_dtype)

                def add(parts, accumulated=accumulated):
                    if not accumulated:
                        accumulated.extend(p.astype(np.float64) for p in parts)
                    else:
                        for total, p in zip(accumulated, parts):
                            total += p

                vjp_tasks.append((vjp_fn, (padded_slice(s.x2, b0, b1, p2), _pad_rows(w, p2)),
                                  add))
            with frozen_state(model, s.plan.training):
                run_tasks(vjp_tasks, verbose)
            # tangents in their weights' dtypes (the forward accumulator's primals)
            u = tuple(a.astype(tf.as_dtype(w.dtype).as_numpy_dtype)
                      for a, w in zip(accumulated, plan.weights))
            jvp_tasks = []
            for a0, a1 in block_ranges(s.n1, p1):
                def done(out, k=k, ax=ax, a0=a0, a1=a1, columns=columns):
                    results[k][a0:a1] += vector_from_products(
                        np.asarray(out[0], np_dtype)[:, :a1 - a0], ax, columns)

                jvp_tasks.append((jvp_fn, (padded_slice(s.x1, a0, a1, p1), *u), done))
            tasks += jvp_tasks
    else:
        spec = [f"nm{ax.out},m{ax.vec_sub2}z->n{ax.vec_sub1}z" for ax in s.out_axes]

        def place(a0, a1, b0, b1, mirror):  # Θ[a, b]·v[b] (and Θ[b, a]·v[a])
            def done(blocks):
                for k, ax in enumerate(s.out_axes):
                    block = blocks[k][:a1 - a0, :b1 - b0]
                    results[k][a0:a1] += np.einsum(spec[k], block, prepared[k][b0:b1])
                    if mirror:
                        results[k][b0:b1] += np.einsum(spec[k], swap_pairs(block, ax),
                                                       prepared[k][a0:a1])
            return done

        def fused_tasks():  # x2 is given (x1 itself when same): blocks of Θ(x1, x2)
            return kernel_tasks(block_function, results, s.out_axes, s.x1, s.x2, s.n1, s.n2,
                                s.block, fits=fits, place=place)

        # Past a size, blocks of a size compiled once from their factors (as empirical_ntk)
        tasks = _block_factors.factor_tasks(s, results, batch_size, fused_tasks, place, "vector")
    with frozen_state(model, s.plan.training):
        run_tasks(tasks, verbose)
    results = [r[..., :c] for r, c in zip(results, given)]
    return [r[..., 0] if sq else r for r, sq in zip(results, squeeze)]
