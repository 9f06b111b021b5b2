"""Output axes of a kernel: which are traced, kept diagonal or paired (pure numpy).

An output of shape (N, d1, ..., dk) enters Θ(x1, x2) as neural-tangents lays
it out: axes in `trace_axes` are averaged, axes in `diagonal_axes` are kept
once, every other axis appears twice (the x1 index, then the x2 index).
`OutputAxes` turns those choices into einsum subscripts and shapes; the
helpers below move kernel blocks and vectors between those layouts.
"""

import numpy as np

# Letters for einsum subscripts: output axes of f(x1) use the lower-case set,
# the paired axes of f(x2) the upper-case set; n, m are the two batch axes.
# (a, b, p, q, z are taken by the weight and position axes of the contractions.)
_AXES_1 = "cdefghijkl"
_AXES_2 = "CDEFGHIJKL"


def _canonical_axes(axes, ndim, name):
    """Normalizes output axes (batch axis 0 included in the count)."""
    try:
        if isinstance(axes, (str, bytes)):
            raise TypeError
        axes = tuple(int(a) for a in axes)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected `{name}` to be a tuple of ints. Received: {name}={axes}"
        ) from None
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"Expected every axis of `{name}` to index an output of rank "
                f"{ndim}. Received: {name}={axes}"
            )
        a %= ndim
        if a == 0:
            if ndim == 1:
                # A rank-1 output (N,) has no axis to trace: the default
                # trace_axes=(-1,) must still work on it.
                continue
            raise ValueError(
                f"The batch axis 0 cannot be traced or kept diagonal. "
                f"Received: {name}={axes}"
            )
        out.append(a)
    return tuple(sorted(set(out)))


class OutputAxes:
    """How the non-batch axes of one output enter the kernel."""

    def __init__(self, shape, trace_axes, diagonal_axes):
        self.shape = tuple(int(d) for d in shape)  # without the batch axis
        ndim = len(self.shape) + 1
        self.trace = _canonical_axes(trace_axes, ndim, "trace_axes")
        self.diag = _canonical_axes(diagonal_axes, ndim, "diagonal_axes")
        both = set(self.trace) & set(self.diag)
        if both:
            raise ValueError(
                "An axis cannot be both traced and diagonal. Received: "
                f"trace_axes={trace_axes}, diagonal_axes={diagonal_axes}"
            )
        s1 = s2 = out = ""
        kernel_shape = []
        self.trace_size = 1
        self.pairs = 1  # number of (s1, s2) output index pairs contracted per (n, m)
        for i, size in enumerate(self.shape):
            axis = i + 1
            s1 += _AXES_1[i]
            if axis in self.trace:
                s2 += _AXES_1[i]
                self.trace_size *= size
                self.pairs *= size
            elif axis in self.diag:
                s2 += _AXES_1[i]
                out += _AXES_1[i]
                kernel_shape.append(size)
                self.pairs *= size
            else:
                s2 += _AXES_2[i]
                out += _AXES_1[i] + _AXES_2[i]
                kernel_shape += [size, size]
                self.pairs *= size * size
        self.sub1, self.sub2, self.out = s1, s2, out
        self.kernel_shape = tuple(kernel_shape)  # per (n, m) entry
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.kernel_size = int(np.prod(self.kernel_shape, dtype=np.int64))
        # Vector conventions of ntk_vector_product: v[n2, kept axes of x2].
        self.vec_sub2 = "".join(
            _AXES_1[i] if (i + 1) in self.diag else _AXES_2[i]
            for i in range(len(self.shape))
            if (i + 1) not in self.trace
        )
        self.vec_sub1 = "".join(
            _AXES_1[i] for i in range(len(self.shape)) if (i + 1) not in self.trace
        )
        self.vec_shape = tuple(
            size for i, size in enumerate(self.shape) if (i + 1) not in self.trace
        )


def reduce_full_kernel(full, axes_info):
    """Applies trace/diagonal conventions to a full (N1, *S, N2, *S) kernel (numpy)."""
    k = np.einsum(
        f"n{axes_info.sub1}m{axes_info.sub2}->nm{axes_info.out}", full
    )
    return k / axes_info.trace_size


def swap_pairs(kernel, axes):
    """The transposed block Θ(x2, x1) of Θ(x1, x2): swap batch and paired axes."""
    perm = [1, 0]
    pos = 2
    for i in range(len(axes.shape)):
        axis = i + 1
        if axis in axes.trace:
            continue
        if axis in axes.diag:
            perm.append(pos)
            pos += 1
        else:
            perm += [pos + 1, pos]
            pos += 2
    return np.transpose(kernel, perm)


def _delta_einsum_parts(axes):
    """Subscripts and identity matrices placing a vector at traced/diagonal entries."""
    eyes, subs = [], []
    for i, size in enumerate(axes.shape):
        if (i + 1) in axes.trace or (i + 1) in axes.diag:
            eyes.append(np.eye(size))
            subs.append(_AXES_2[i] + _AXES_1[i])
    extra = "".join(
        _AXES_2[i] for i in range(len(axes.shape))
        if (i + 1) in axes.trace or (i + 1) in axes.diag
    )
    # v's own subscripts: paired axes by their x2 index (lower-case here, the
    # output index of f(x2)), diagonal axes by the diagonal index (upper-case).
    v_sub = "".join(
        _AXES_2[i] if (i + 1) in axes.diag else _AXES_1[i]
        for i in range(len(axes.shape)) if (i + 1) not in axes.trace
    )
    return eyes, subs, extra, v_sub


def cotangents_from_vector(v_block, axes):
    """w[(t, d, e), n2, s] = v[n2, s_P, d, e] δ(s_T = t) δ(s_D = d)."""
    eyes, subs, extra, v_sub = _delta_einsum_parts(axes)
    s_all = _AXES_1[: len(axes.shape)]
    spec = ",".join([f"n{v_sub}z"] + subs) + f"->{extra}zn{s_all}"
    w = np.einsum(spec, v_block, *eyes) if eyes else np.einsum(f"n{v_sub}z->zn{s_all}", v_block)
    n2 = v_block.shape[0]
    return w.reshape((-1, n2, *axes.shape))


def vector_from_products(products, axes, columns):
    """out[n1, s_P, d, e] = Σ_t r[(t, d, e), n1, s_T = t, s_P, s_D = d] / |T|."""
    eyes, subs, extra, v_sub = _delta_einsum_parts(axes)
    s_all = _AXES_1[: len(axes.shape)]
    sizes = [axes.shape[i] for i in range(len(axes.shape))
             if (i + 1) in axes.trace or (i + 1) in axes.diag]
    n1 = products.shape[1]
    r = products.reshape((*sizes, columns, n1, *axes.shape))
    spec = ",".join([f"{extra}zn{s_all}"] + subs) + f"->n{v_sub}z"
    out = np.einsum(spec, r, *eyes) if eyes else np.einsum(f"zn{s_all}->n{v_sub}z", r)
    return out / axes.trace_size
