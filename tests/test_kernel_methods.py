"""Tests of experiments/kernel_methods.py (kernel regression as the studies use it).

References: `numpy.linalg.solve` for kernel ridge regression, a `keras_ntk.Linearize`
model trained by full-batch gradient descent, kernels recomputed with
`keras_ntk.empirical_ntk` on the subset (not sliced), Keras' losses.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_ntk
from experiments import kernel_methods, models


def test_regression_path_matches_numpy_solve():
    rng = np.random.RandomState(0)
    features = rng.normal(size=(30, 12))
    kernel = features @ features.T  # rank 12: singular without the ridge
    y = np.eye(3)[rng.randint(0, 3, size=20)]
    train, evaluation = np.arange(20), np.arange(20, 30)
    ridges = [1e-3, 0.5, 10.0]
    for solver in ("eigh", "cholesky"):
        path = kernel_methods.regression_path(kernel[np.ix_(train, train)],
                                            kernel[np.ix_(evaluation, train)], y, ridges,
                                            solver=solver)
        for ridge, predictions in zip(ridges, path):
            reference = kernel[np.ix_(evaluation, train)] @ np.linalg.solve(
                kernel[np.ix_(train, train)] + ridge * np.eye(20), y)
            np.testing.assert_allclose(predictions, reference, rtol=1e-6, atol=1e-9)
    # The Cholesky path leaves the caller's kernel untouched (it factorizes a copy).
    k_train = kernel[np.ix_(train, train)].copy()
    kernel_methods.regression_path(k_train, kernel[np.ix_(evaluation, train)], y, ridges,
                                 solver="cholesky")
    np.testing.assert_array_equal(k_train, kernel[np.ix_(train, train)])


def test_linearized_predictor_equals_linearize_trained_by_full_batch_gd():
    # One output, n = 8 ≪ 1 + 6·48 + 48 + 48 parameters, float64 regression; the Linearize
    # model f0 + J·δ trained from δ = 0 by full-batch GD on the MSE converges to the
    # minimum-norm fit, whose test predictions are f0* + Θ*Θ⁻¹(Y − f0) (λ → 0).
    keras.utils.set_random_seed(0)
    net = models.mlp((6,), 1, widths=(48,))
    rng = np.random.RandomState(0)
    x_train = rng.normal(size=(8, 6)).astype(np.float32)
    x_test = rng.normal(size=(5, 6)).astype(np.float32)
    y_train = rng.normal(size=(8, 1)).astype(np.float32)
    k_train = np.asarray(keras_ntk.empirical_ntk(net, x_train), np.float64)
    k_test_train = np.asarray(keras_ntk.empirical_ntk(net, x_test, x_train), np.float64)
    f0_train = np.asarray(net(x_train), np.float64)
    f0_test = np.asarray(net(x_test), np.float64)
    predicted = kernel_methods.linearized_predictions(
        k_train, k_test_train, y_train, [1e-9 * np.mean(np.diag(k_train))],
        f0_train=f0_train, f0_eval=f0_test)[0]

    linear = keras.Sequential([keras.Input((6,)), keras_ntk.Linearize(net)])
    eigenvalues = np.linalg.eigvalsh(k_train)
    # MSE = mean (f − y)²: function-space GD step lr·(2/n)·Θ; stable below n/λmax.
    learning_rate = 0.5 * len(x_train) / eigenvalues[-1]
    steps = int(20 * eigenvalues[-1] / eigenvalues[0]) + 200
    linear.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    batches = tf.data.Dataset.from_tensors((x_train, y_train)).repeat()
    linear.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    assert float(np.mean((linear(x_train).numpy() - y_train) ** 2)) < 1e-8
    scale = np.abs(predicted - f0_test).max()
    np.testing.assert_allclose(linear(x_test).numpy(), predicted, atol=2e-3 * scale)
    # Without f0 (the kernel predictor) the test predictions differ by about f0 itself.
    kernel_only = kernel_methods.linearized_predictions(
        k_train, k_test_train, y_train, [1e-9 * np.mean(np.diag(k_train))])[0]
    assert np.abs(kernel_only - predicted).max() > 10 * 2e-3 * scale


def test_sliced_kernel_regression_equals_recomputed_kernel():
    keras.utils.set_random_seed(0)
    model = models.mlp((8, 8, 1), 3, widths=(16,))
    rng = np.random.RandomState(0)
    layout = {"num_candidates": 24, "num_validation": 6, "num_test": 10}
    x_union = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
    y_union = rng.randint(0, 3, size=40)
    union_kernel = np.asarray(keras_ntk.empirical_ntk(model, x_union), np.float64)
    train, validation, test = kernel_methods.kernel_indices(layout, n=11)
    np.testing.assert_array_equal(train, np.arange(11))
    np.testing.assert_array_equal(validation, np.arange(24, 30))
    np.testing.assert_array_equal(test, np.arange(30, 40))
    # Kernels recomputed on the subset, in float64 from float32 passes.
    k_train = np.asarray(keras_ntk.empirical_ntk(model, x_union[train]), np.float64)
    k_test_train = np.asarray(keras_ntk.empirical_ntk(model, x_union[test], x_union[train]),
                              np.float64)
    np.testing.assert_allclose(union_kernel[np.ix_(train, train)], k_train, rtol=1e-4,
                               atol=1e-5 * np.abs(k_train).max())
    y = np.eye(3)[y_union[train]]
    ridge = 1e-2 * np.mean(np.diag(k_train))
    sliced = kernel_methods.regression_path(union_kernel[np.ix_(train, train)],
                                          union_kernel[np.ix_(test, train)], y, [ridge])[0]
    reference = k_test_train @ np.linalg.solve(k_train + ridge * np.eye(11), y)
    np.testing.assert_allclose(sliced, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())
    # And the method's scores are those of the reference predictions at the chosen ridge.
    scores = kernel_methods.kernel_method_errors(union_kernel, layout, y_union, 3, [5, 11],
                                               [1e-2], min_n=6)
    np.testing.assert_allclose(scores["test_error"][1],
                               np.mean(np.argmax(reference, 1) != y_union[test]))
    np.testing.assert_allclose(scores["test_loss"][1],
                               np.mean((reference - np.eye(3)[y_union[test]]) ** 2), rtol=1e-3)
    np.testing.assert_array_equal(scores["correct"][1], np.argmax(reference, 1) == y_union[test])
    # Sizes below min_n (after-kernels: n < n0) are not run.
    assert scores["test_error"][0] is None and np.all(np.isnan(scores["correct"][0]))
    # With offsets f0: the linearized predictor f0 + Θ*(Θ+λ)⁻¹(Y − f0).
    f0 = rng.normal(size=(40, 3))
    with_f0 = kernel_methods.kernel_method_errors(union_kernel, layout, y_union, 3, [11], [1e-2],
                                                offsets=f0)
    shifted = f0[test] + k_test_train @ np.linalg.solve(k_train + ridge * np.eye(11),
                                                        y - f0[train])
    np.testing.assert_allclose(with_f0["test_loss"][0],
                               np.mean((shifted - np.eye(3)[y_union[test]]) ** 2), rtol=1e-3)


def test_losses_and_error_against_keras():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(9, 4))
    labels = rng.randint(0, 4, size=9)
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    np.testing.assert_allclose(kernel_methods.cross_entropy(logits, labels), float(reference),
                               rtol=1e-5)
    one_hot = np.eye(4)[labels]
    np.testing.assert_allclose(kernel_methods.mse(logits, one_hot),
                               float(keras.losses.MeanSquaredError()(one_hot, logits)), rtol=1e-5)
    assert kernel_methods.error_rate(one_hot, labels) == 0.0
    assert kernel_methods.error_rate(-one_hot, labels) == 1.0


def test_per_example_cross_entropy_and_kernel_union():
    rng = np.random.RandomState(1)
    logits = rng.normal(size=(6, 3)) * 5
    labels = rng.randint(0, 3, size=6)
    # −log softmax(f)_y by hand, per example.
    by_hand = [-np.log(np.exp(f[y]) / np.exp(f).sum()) for f, y in zip(logits, labels)]
    np.testing.assert_allclose(kernel_methods.per_example_cross_entropy(logits, labels),
                               by_hand, rtol=1e-12)

    class Split:
        def __init__(self, n, offset):
            self.x, self.y = np.arange(n)[:, None] + offset, np.arange(n) + offset

    train, test = Split(10, 0), Split(3, 100)
    x, y, layout = kernel_methods.kernel_union(train, test, [7, 2], [5, 1, 0])
    assert y.tolist() == [7, 2, 5, 1, 0, 100, 101, 102] and x[:, 0].tolist() == y.tolist()
    assert layout == {"num_candidates": 2, "num_validation": 3, "num_test": 3}
    train_rows, validation, test_rows = kernel_methods.kernel_indices(layout, 2)
    assert y[validation].tolist() == [5, 1, 0] and y[test_rows].tolist() == [100, 101, 102]


def test_kernel_cells_table_reads_each_seed_over_the_grid():
    """A seed's cell lists its own sizes `n`; the table has a row per grid size (None: not run)."""
    sizes = [10, 20, 40]
    cells = [{"n": [10, 20, 40], "ridge_factor": [1e-3, 1e-2, 1e-1], "with_f0": True,
              "pretraining": {"hit_cap": True, "steps": 200}},
             {"n": [10, 20], "ridge_factor": [1.0, 1e-6],
              "pretraining": {"hit_cap": False, "steps": 50}},
             {}]
    table = kernel_methods.kernel_cells_table(cells, sizes)
    assert table == {"ridge_factor": [[1e-3, 1.0, None], [1e-2, 1e-6, None], [1e-1, None, None]],
                     "with_f0": True, "pretraining_cap_hits": 1, "pretraining_steps": [200, 50]}
    # A cell written before cells named their sizes: one value per grid size.
    assert kernel_methods.on_grid({"ridge_factor": [1, 2, 3]}, "ridge_factor", sizes) == [1, 2, 3]
    assert "pretraining_steps" not in kernel_methods.kernel_cells_table([{}], sizes)
