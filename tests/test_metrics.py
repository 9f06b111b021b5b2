"""Kernel metrics against closed forms and invariances."""

import numpy as np
import pytest

from keras_ntk import metrics


def random_psd(n, rank=None, seed=0):
    features = np.random.default_rng(seed).standard_normal((n, rank or n))
    return features @ features.T


def test_alignment_of_the_ideal_kernel_is_one():
    y = np.array([1.0, -1.0, 1.0, 1.0])
    assert metrics.kernel_alignment(np.outer(y, y), y) == pytest.approx(1.0)
    assert metrics.kernel_alignment(3 * np.outer(y, y), y) == pytest.approx(1.0)


def test_alignment_closed_form_for_vector_labels():
    kernel = random_psd(6)
    y = np.random.default_rng(1).choice([-1.0, 1.0], size=6)
    expected = y @ kernel @ y / (np.linalg.norm(kernel) * (y @ y))
    assert metrics.kernel_alignment(kernel, y) == pytest.approx(expected)


def test_alignment_with_one_hot_labels_and_identity_kernel():
    # Θ = I, Y one-hot with class sizes n_c: ⟨I, YYᵀ⟩ = N, ‖YYᵀ‖_F = sqrt(Σ n_c²).
    labels = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    expected = 6 / (np.sqrt(6) * np.sqrt(2**2 + 1**2 + 3**2))
    assert metrics.kernel_alignment(np.eye(6), labels) == pytest.approx(expected)


def test_centered_alignment_ignores_constant_offsets():
    y = np.array([1.0, 1.0, -1.0, -1.0])
    kernel = np.outer(y, y) + 10.0  # a large constant hides the signal...
    assert metrics.kernel_alignment(kernel, y) < 0.2
    # ...which centering removes: HKH = H yyᵀ H = yyᵀ for balanced labels.
    assert metrics.kernel_alignment(kernel, y, centered=True) == pytest.approx(1.0)


def test_alignment_is_invariant_to_a_common_permutation():
    kernel = random_psd(7)
    y = np.random.default_rng(2).standard_normal(7)
    perm = np.random.default_rng(3).permutation(7)
    for centered in (False, True):
        assert metrics.kernel_alignment(kernel[perm][:, perm], y[perm], centered=centered) == (
            pytest.approx(metrics.kernel_alignment(kernel, y, centered=centered))
        )


def test_kernel_distance_closed_forms():
    kernel = random_psd(5)
    assert metrics.kernel_distance(kernel, kernel) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kernel_distance(kernel, 7.0 * kernel) == pytest.approx(0.0, abs=1e-12)
    # Orthogonal (disjoint-support) kernels are at distance 1.
    assert metrics.kernel_distance(np.diag([1.0, 0.0]), np.diag([0.0, 1.0])) == pytest.approx(1.0)
    # diag(1,1) vs diag(1,0): 1 − 1/√2.
    assert metrics.kernel_distance(np.eye(2), np.diag([1.0, 0.0])) == pytest.approx(1 - 2**-0.5)
    # Invariant to a common rotation.
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((5, 5)))
    other = random_psd(5, seed=9)
    assert metrics.kernel_distance(q @ kernel @ q.T, q @ other @ q.T) == pytest.approx(
        metrics.kernel_distance(kernel, other)
    )


def test_kernel_velocity_divides_by_the_time_step():
    a, b = np.eye(2), np.diag([1.0, 0.0])
    assert metrics.kernel_velocity(a, b, dt=4) == pytest.approx((1 - 2**-0.5) / 4)
    with pytest.raises(ValueError, match="Received: dt=0"):
        metrics.kernel_velocity(a, b, dt=0)


def test_spectrum_condition_number_and_effective_rank():
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((4, 4)))
    eigenvalues = np.array([8.0, 4.0, 2.0, 1.0])
    kernel = q @ np.diag(eigenvalues) @ q.T
    np.testing.assert_allclose(metrics.spectrum(kernel), eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(metrics.spectrum(kernel, k=2), eigenvalues[:2], rtol=1e-12)
    assert metrics.condition_number(kernel) == pytest.approx(8.0)
    p = eigenvalues / eigenvalues.sum()
    assert metrics.effective_rank(kernel) == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    assert metrics.effective_rank(np.eye(5)) == pytest.approx(5.0)
    assert metrics.effective_rank(np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert metrics.condition_number(np.diag([1.0, 0.0])) == float("inf")


def test_eigenbasis_projection_gives_eigenvalues_in_own_basis():
    kernel = random_psd(6)
    eigenvalues, eigenvectors = metrics.eigendecomposition(kernel)
    np.testing.assert_allclose(
        metrics.eigenbasis_projection(kernel, eigenvectors), eigenvalues, rtol=1e-10
    )
    # In another basis it is the diagonal of VᵀΘV.
    other = random_psd(6, seed=7)
    np.testing.assert_allclose(
        metrics.eigenbasis_projection(other, eigenvectors),
        np.diag(eigenvectors.T @ other @ eigenvectors),
        rtol=1e-10,
    )


def test_eigen_energy_shares_sum_to_one_in_a_complete_basis():
    _, eigenvectors = metrics.eigendecomposition(random_psd(5))
    y = np.random.default_rng(8).standard_normal(5)
    shares = metrics.eigen_energy(y, eigenvectors)
    assert shares.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(shares, (eigenvectors.T @ y) ** 2 / (y @ y))
    np.testing.assert_allclose(metrics.eigen_energy(y, eigenvectors, cumulative=True), np.cumsum(shares))
    # A label equal to an eigenvector puts all its energy there.
    np.testing.assert_allclose(metrics.eigen_energy(eigenvectors[:, 2], eigenvectors), np.eye(5)[2], atol=1e-12)


def test_errors_say_what_was_received():
    with pytest.raises(ValueError, match=r"Received: kernel with shape \(2, 3\)"):
        metrics.kernel_alignment(np.ones((2, 3)), [1, 1])
    with pytest.raises(ValueError, match=r"Received: labels with shape \(3,\)"):
        metrics.kernel_alignment(np.eye(2), [1, 1, 1])
    with pytest.raises(ValueError, match=r"Received: kernel\[0, 1\]=nan \(the first of 2"):
        metrics.spectrum(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"Received: labels\[2, 0\]=inf"):
        metrics.kernel_alignment(np.eye(3), [1.0, -1.0, np.inf])
    with pytest.raises(ValueError, match=r"Received: eigenvectors\[1, 0\]=nan"):
        metrics.eigenbasis_projection(np.eye(2), [0.6, np.nan])
    with pytest.raises(ValueError, match=r"Received: kernel2\[1, 1\]=-inf"):
        metrics.kernel_distance(np.eye(2), np.diag([1.0, -np.inf]))
    with pytest.raises(ValueError, match="same shape"):
        metrics.kernel_distance(np.eye(2), np.eye(3))
    with pytest.raises(ValueError, match="Received: k=5"):
        metrics.spectrum(np.eye(3), k=5)


def test_accepts_tensors():
    tf = pytest.importorskip("tensorflow")
    kernel = tf.constant(random_psd(4), dtype=tf.float32)
    assert metrics.kernel_distance(kernel, kernel) == pytest.approx(0.0, abs=1e-6)


def test_relative_kernel_velocity_is_linear_and_sees_scale():
    a = np.eye(3)
    # A change of scale: invisible to the cosine distance, a relative change of 1.
    assert metrics.kernel_velocity(a, 2 * a) == pytest.approx(0.0, abs=1e-12)
    assert metrics.relative_kernel_velocity(a, 2 * a, dt=4) == pytest.approx(0.25)
    # Linear in the change: doubling a small perturbation doubles it.
    e = np.zeros((3, 3))
    e[0, 1] = e[1, 0] = 1e-3
    small = metrics.relative_kernel_velocity(a, a + e)
    assert metrics.relative_kernel_velocity(a, a + 2 * e) == pytest.approx(2 * small)
    assert small == pytest.approx(np.sqrt(2) * 1e-3 / np.sqrt(3))
    with pytest.raises(ValueError, match="Received: dt=0"):
        metrics.relative_kernel_velocity(a, a, dt=0)
    with pytest.raises(ValueError, match="Received: shapes"):
        metrics.relative_kernel_velocity(a, np.eye(2))
