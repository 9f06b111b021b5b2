"""Functions of kernels: alignment, distance, velocity and spectra.

All functions take numpy arrays or tensors, compute in float64 and return
Python floats or numpy arrays. Kernels are square N×N matrices (e.g. the
default output of `keras_ntk.empirical_ntk(model, x)`).
"""

import numpy as np
import tensorflow as tf

from keras_ntk import _validation


def _as_kernel(kernel, name="kernel"):
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"Expected `{name}` to be a square N×N matrix. "
            f"Received: {name} with shape {kernel.shape}"
        )
    _validation.check_finite(kernel, name)
    return kernel


def _as_labels(labels, num_examples):
    labels = np.asarray(labels, dtype=np.float64)
    received_shape = labels.shape
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != num_examples:
        raise ValueError(
            f"Expected labels of shape ({num_examples},) or ({num_examples}, C), one row "
            f"per kernel row (encode class indices one-hot). Received: labels with shape "
            f"{received_shape}"
        )
    _validation.check_finite(labels, "labels")
    return labels


def _as_eigenvectors(eigenvectors, num_examples):
    eigenvectors = np.asarray(eigenvectors, dtype=np.float64)
    if eigenvectors.ndim == 1:
        eigenvectors = eigenvectors[:, None]
    if eigenvectors.ndim != 2 or eigenvectors.shape[0] != num_examples:
        raise ValueError(
            f"Expected eigenvectors as the columns of a ({num_examples}, M) matrix. "
            f"Received: eigenvectors with shape {eigenvectors.shape}"
        )
    _validation.check_finite(eigenvectors, "eigenvectors")
    return eigenvectors


def _frobenius_norm(array):
    """√Σ a², by a ufunc reduction: `np.linalg.norm` calls a threaded BLAS dot
    whose threads compete with TensorFlow's inside `fit` (NTKTracker), measured
    at up to 6 ms per 256×256 norm on a busy 2-core CPU."""
    return float(np.sqrt(np.sum(np.square(array))))


def _centered(matrix):
    """H M H with H = I − 11ᵀ/N (double centering)."""
    matrix = matrix - matrix.mean(axis=0, keepdims=True)
    return matrix - matrix.mean(axis=1, keepdims=True)


def kernel_alignment(kernel, labels, centered=False):
    """Kernel-target alignment between a kernel and labels.

    A(Θ, Y) = ⟨Θ, Y Yᵀ⟩_F / (‖Θ‖_F ‖Y Yᵀ‖_F), which for a label vector y is
    yᵀΘy / (‖Θ‖_F ‖y‖²) (Cristianini et al. 2002). With `centered=True`, Θ
    and Y Yᵀ are first double-centred, HΘH and (HY)(HY)ᵀ with H = I − 11ᵀ/N
    (Cortes, Mohri & Rostamizadeh 2012), which removes the constant
    direction that otherwise dominates the alignment of non-negative kernels.

    Args:
        kernel: N×N kernel matrix.
        labels: N label values (use ±1 for binary tasks) or an N×C matrix
            (e.g. one-hot classes).
        centered: whether to use the centred alignment.

    Returns:
        A float in [-1, 1] (in [0, 1] for a PSD kernel).

    Example:

    >>> kernel_alignment(np.outer([1, -1], [1, -1]), [1, -1])
    1.0
    """
    kernel = _as_kernel(kernel)
    labels = _as_labels(labels, kernel.shape[0])
    target = np.einsum("nc,mc->nm", labels, labels)  # Y Yᵀ without a threaded BLAS call
    if centered:
        kernel = _centered(kernel)
        target = _centered(target)
    denominator = _frobenius_norm(kernel) * _frobenius_norm(target)
    if denominator == 0:
        raise ValueError(
            "Kernel alignment is undefined for a zero kernel or zero labels. Received: "
            f"‖kernel‖_F={_frobenius_norm(kernel)}, ‖Y Yᵀ‖_F={_frobenius_norm(target)}"
        )
    return float(np.sum(kernel * target) / denominator)


def kernel_distance(kernel1, kernel2):
    """Distance 1 − ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F) between two kernels.

    Zero for proportional kernels (the distance ignores scale), at most 2.
    Used to measure how far the empirical NTK has moved from initialization
    (Fort et al. 2020).

    Args:
        kernel1: N×N kernel.
        kernel2: N×N kernel on the same inputs.

    Returns:
        A float.

    Example:

    >>> kernel_distance(np.eye(3), 5 * np.eye(3))
    0.0
    """
    kernel1 = _as_kernel(kernel1, "kernel1")
    kernel2 = _as_kernel(kernel2, "kernel2")
    if kernel1.shape != kernel2.shape:
        raise ValueError(
            "Expected kernels of the same shape. Received: "
            f"kernel1 with shape {kernel1.shape}, kernel2 with shape {kernel2.shape}"
        )
    denominator = _frobenius_norm(kernel1) * _frobenius_norm(kernel2)
    if denominator == 0:
        raise ValueError("Kernel distance is undefined for a zero kernel. Received: a zero kernel")
    return float(max(0.0, 1.0 - np.sum(kernel1 * kernel2) / denominator))


def kernel_velocity(previous_kernel, next_kernel, dt=1.0):
    """Kernel distance per unit of time between consecutive snapshots.

    v = kernel_distance(Θ_t, Θ_{t+dt}) / dt, with dt in epochs or steps.

    Args:
        previous_kernel: N×N kernel at time t.
        next_kernel: N×N kernel at time t + dt.
        dt: the time between the two snapshots (> 0).

    Returns:
        A float.
    """
    if not dt > 0:
        raise ValueError(f"Expected a positive time step. Received: dt={dt}")
    return kernel_distance(previous_kernel, next_kernel) / float(dt)


def relative_kernel_velocity(previous_kernel, next_kernel, dt=1.0):
    """Relative Frobenius change per unit of time between consecutive snapshots.

    v = ‖Θ_{t+dt} − Θ_t‖_F / ‖Θ_t‖_F / dt. Unlike `kernel_velocity`, whose
    cosine distance is quadratic in small changes (1 − cos φ ≈ φ²/2), this is
    linear in the change, so it reads as a rate when snapshots are unevenly
    spaced (e.g. log-spaced steps) and also sees changes of scale.

    Args:
        previous_kernel: N×N kernel at time t (nonzero).
        next_kernel: N×N kernel at time t + dt.
        dt: the time between the two snapshots (> 0).

    Returns:
        A float.
    """
    if not dt > 0:
        raise ValueError(f"Expected a positive time step. Received: dt={dt}")
    a, b = _as_kernel(previous_kernel), _as_kernel(next_kernel)
    if a.shape != b.shape:
        raise ValueError(
            f"Expected two kernels of the same shape. Received: shapes {a.shape} and {b.shape}"
        )
    norm = np.linalg.norm(a)
    if norm == 0:
        raise ValueError("Expected a nonzero previous kernel. Received: ‖Θ_t‖_F = 0")
    return float(np.linalg.norm(b - a) / norm / float(dt))


def spectrum(kernel, k=None):
    """Eigenvalues of a symmetric kernel, in descending order (float64).

    Args:
        kernel: N×N symmetric kernel (symmetrized as (K + Kᵀ)/2).
        k: keep only the top `k` eigenvalues (default: all N).

    Returns:
        A numpy array of eigenvalues, largest first.
    """
    kernel = _as_kernel(kernel)
    # TensorFlow's solver, not numpy's: inside `fit`, numpy's BLAS threads
    # compete with TensorFlow's pools (a 256×256 eigvalsh measured 4 ms to
    # 0.5 s on a busy 2-core CPU, against a steady 6-10 ms here).
    symmetric = tf.constant((kernel + kernel.T) / 2, dtype=tf.float64)
    eigenvalues = tf.linalg.eigvalsh(symmetric).numpy()[::-1].copy()
    if k is not None:
        if not 0 < int(k) <= kernel.shape[0]:
            raise ValueError(f"Expected 0 < k <= {kernel.shape[0]}. Received: k={k}")
        eigenvalues = eigenvalues[: int(k)]
    return eigenvalues


def eigendecomposition(kernel):
    """Eigenvalues (descending) and eigenvectors (columns, same order)."""
    kernel = _as_kernel(kernel)
    eigenvalues, eigenvectors = np.linalg.eigh((kernel + kernel.T) / 2)
    return eigenvalues[::-1], eigenvectors[:, ::-1]


def condition_number(kernel):
    """λ_max / λ_min of a symmetric PSD kernel (inf when λ_min ≤ 0).

    In float64 values near 1e16 are at the precision bound: the smallest
    eigenvalue is then rounding noise.
    """
    eigenvalues = spectrum(kernel)
    if eigenvalues[-1] <= 0:
        return float("inf")
    return float(eigenvalues[0] / eigenvalues[-1])


def effective_rank(kernel):
    """Entropy effective rank exp(H(p)), p_i = λ_i / Σ λ (Roy & Vetterli 2007).

    Between 1 (one direction dominates) and N (flat spectrum). Negative
    eigenvalues (rounding noise of a PSD kernel) are clipped to 0.
    """
    eigenvalues = np.clip(spectrum(kernel), 0.0, None)
    total = eigenvalues.sum()
    if total == 0:
        raise ValueError("Effective rank is undefined for a zero kernel. Received: a zero kernel")
    p = eigenvalues[eigenvalues > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def eigenbasis_projection(kernel, eigenvectors):
    """a_j = v_jᵀ Θ v_j: a kernel's energy along given eigen-directions.

    With v_j the eigenvectors of the initial kernel Θ0, a_j(Θ0) are its
    eigenvalues; for a later kernel Θ_t, a_j(Θ_t) shows which directions grew
    or shrank during training (Ortiz-Jiménez et al. 2021).

    Args:
        kernel: N×N kernel.
        eigenvectors: N×M matrix whose columns are unit vectors v_j.

    Returns:
        A numpy array of M values.
    """
    kernel = _as_kernel(kernel)
    eigenvectors = _as_eigenvectors(eigenvectors, kernel.shape[0])
    return np.einsum("nj,nm,mj->j", eigenvectors, kernel, eigenvectors)


def eigen_energy(labels, eigenvectors, cumulative=False):
    """Share of the label energy on each eigenvector: (v_jᵀ y)² / ‖y‖².

    For a label matrix Y, Σ_c (v_jᵀ y_c)² / ‖Y‖_F². With a complete
    orthonormal basis the shares sum to 1; energy concentrated on the top
    eigenvectors means a task the kernel learns fast.

    Args:
        labels: N label values or an N×C matrix.
        eigenvectors: N×M matrix whose columns are orthonormal vectors.
        cumulative: return the running sum over j instead.

    Returns:
        A numpy array of M shares.
    """
    eigenvectors = np.asarray(eigenvectors, dtype=np.float64)
    num_examples = eigenvectors.shape[0] if eigenvectors.ndim else 0
    labels = _as_labels(labels, num_examples)
    eigenvectors = _as_eigenvectors(eigenvectors, labels.shape[0])
    total = np.sum(labels**2)
    if total == 0:
        raise ValueError("Label energy is undefined for all-zero labels. Received: zero labels")
    shares = np.sum((eigenvectors.T @ labels) ** 2, axis=1) / total
    return np.cumsum(shares) if cumulative else shares
