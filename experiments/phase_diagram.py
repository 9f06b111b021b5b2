"""Study C's analysis of infinite-width NTKs over (σw², depth): the phase diagram.

The maths of `experiments.trainability` parts 1 and 2, apart from its grid:
for one σw², ONE all-depths recursion (`keras_ntk.infinite_kernels(...,
all_depths=True)`) gives the NTK at every depth (`phase_row`); per depth
(`phase_depth`) the spectrum and condition number of Θ(X, X) (flagged at the
float64 bound), gradient flow on MSE in closed form read at given times, and
the mean predictor P(Θ) = Θ(X*, X) Θ(X, X)⁻¹ on raw one-hot targets (the
accuracy heatmaps) and on targets centred by the training mean (the spread
of its test outputs, whose e-fold length in depth is compared with ξ*).
`assemble_diagram` turns the rows of one activation into results.json's
`phase_diagram` entry with the mean-field quantities of `keras_ntk.mean_field`.
Part 3's cell, `architecture_cell`, reads the same spectrum summary and
kernel regression off the infinite NTK of an FCN, a CNN-Flatten or a CNN-GAP.
"""

import math
import time

import numpy as np
import threadpoolctl  # Installed with scikit-learn (the [experiments] extra).

_EPS = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------- helpers


def examples(dataset, num_train, heldout, flat=True):
    """(x_train, labels_train, x_test, labels_test, description): training and held-out.

    Training: the first `num_train` training examples; held-out (`heldout`):
    the test split, or ("test_and_unused_train") the training examples beyond
    them, then the test split. Inputs in float64, flattened when `flat`.
    """
    x_train, y_train = dataset.train.x[:num_train], dataset.train.y[:num_train]
    x_test, y_test = dataset.test.x, dataset.test.y
    description = f"training: the first {len(y_train)} training examples; held-out: "
    if heldout == "test_and_unused_train":
        x_test = np.concatenate([dataset.train.x[num_train:], x_test])
        y_test = np.concatenate([dataset.train.y[num_train:], y_test])
        description += (f"the {len(dataset.train.y) - len(y_train)} training examples beyond "
                        "them, then the test split")
    else:
        description += "the test split"

    def prepared(x):
        return (x.reshape(len(x), -1) if flat else x).astype(np.float64)

    return prepared(x_train), y_train, prepared(x_test), y_test, description


def finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def accuracy(outputs, labels):
    return float(np.mean(np.argmax(outputs, axis=-1) == labels))


def heatmap_targets(labels, num_classes):
    """Raw one-hot targets (the accuracy heatmaps, as neural-tangents' notebook).

    Deep in the chaotic phase the mean predictor of these targets collapses to
    one class for every test input: the paper's finding. (One-hot − 1/C has the
    same argmax.)
    """
    return np.eye(num_classes)[np.asarray(labels)]


def centred_targets(labels, num_classes, train_labels):
    """One-hot targets minus the training set's mean target (the spread analysis).

    Any kernel fits the constant direction, which would hide the decay of
    the data-dependent rest; centring by the training mean (not by 1/C,
    which is the mean only for balanced classes) removes it.
    """
    mean = heatmap_targets(train_labels, num_classes).mean(axis=0)
    return heatmap_targets(labels, num_classes) - mean


def output_spread(outputs, reference):
    """‖F − mean F‖_F / ‖R − mean R‖_F over the rows (inputs); 0: one output for all inputs."""
    spread = np.linalg.norm(outputs - outputs.mean(axis=0))
    return float(spread / np.linalg.norm(reference - reference.mean(axis=0)))


def efold_length(depths, spread, variation, *, noise=1e-12, points=4):
    """Depth over which the spread falls by e, fitted over the deepest depths above noise.

    A least-squares line through log(spread) over the `points` deepest depths
    whose test-train kernel still varies across examples by more than
    `noise` relative to its mean (below that, the data-dependent part of the
    kernel is at float64 rounding). Returns (−1/slope, depths used), or
    (None, depths) when fewer than 3 depths qualify or the spread does not fall.
    """
    usable = [i for i, (s, v) in enumerate(zip(spread, variation))
              if s is not None and s > 0 and v is not None and v > noise]
    chosen = usable[-points:]
    used = [int(depths[i]) for i in chosen]
    if len(chosen) < 3:
        return None, used
    slope = np.polyfit([depths[i] for i in chosen], np.log([spread[i] for i in chosen]), 1)[0]
    return (float(-1.0 / slope) if slope < 0 else None), used


def mean_field(activation, sigma_w2, sigma_b2):
    """q*, c*, χ1, χc*, ξ1, ξ*, ξc* of one point (`keras_ntk.mean_field`; None where not finite)."""
    from keras_ntk import mean_field as mf

    args = (activation, sigma_w2, sigma_b2)
    return {
        "q_star": finite_or_none(mf.q_star(*args)),
        "c_star": finite_or_none(mf.c_star(*args)),
        "chi1": float(mf.chi1(*args)),
        "chi_c_star": finite_or_none(mf.chi_c_star(*args)),
        "xi_1": finite_or_none(mf.xi_1(*args)),
        "xi_star": finite_or_none(mf.xi_star(*args)),
        "xi_c_star": finite_or_none(mf.xi_c_star(*args)),
    }


def spectrum_summary(k_train):
    """Eigenvalues of Θ(X, X) and its condition number with the float64 flag."""
    eigenvalues = np.linalg.eigvalsh((k_train + k_train.T) / 2)
    n = len(eigenvalues)
    largest, smallest = float(eigenvalues[-1]), float(eigenvalues[0])
    at_bound = bool(smallest <= n * _EPS * largest)
    condition = min(largest / max(smallest, _EPS * largest), 1.0 / _EPS)
    return eigenvalues, {
        "condition_number": float(condition),
        "condition_at_float64_bound": at_bound,
        "lambda_max": largest,
        "lambda_min": smallest,
        # The bulk: the mean of all but the largest eigenvalue.
        "lambda_bulk": float(np.mean(eigenvalues[:-1])) if n > 1 else largest,
    }


def phase_depth(k_train, k_test_train, nngp_scale, labels_train, labels_test, num_classes,
                times, learning_rate_fraction):
    """Everything measured at one (σw², depth): trainability, generalization, spread."""
    from keras_ntk import predict

    _, cell = spectrum_summary(k_train)
    y_train = heatmap_targets(labels_train, num_classes)
    yc_train = centred_targets(labels_train, num_classes, labels_train)
    yc_test = centred_targets(labels_test, num_classes, labels_train)
    n_outputs = y_train.size
    # η = fraction × 2·n·O/λmax (`predict.max_learning_rate`; λmax from the spectrum).
    rate = learning_rate_fraction * 2.0 * n_outputs / cell["lambda_max"]
    # Raw targets (heatmaps) and centred ones (spread analysis) in one call, one
    # eigendecomposition: the flow runs at η/(n·O), so twice the columns take 2η.
    # The last time, t = ∞, is the mean predictor P(Θ)Y.
    steps = np.asarray(list(times) + [np.inf], np.float64)
    fx_train, fx_test = predict.gradient_descent_mse(
        k_train, np.concatenate([y_train, yc_train], 1), 2 * rate, steps, k_test_train)
    raw_train, raw_test = fx_train[..., :num_classes], fx_test[..., :num_classes]
    centred_test = fx_test[-1, :, num_classes:]
    cell["learning_rate"] = float(rate)
    cell["train_loss"] = [float(np.sum((f - y_train) ** 2) / (2 * n_outputs))
                          for f in raw_train[:-1]]
    cell["initial_train_loss"] = float(np.sum(y_train ** 2) / (2 * n_outputs))
    cell["gd_train_accuracy"] = [accuracy(f, labels_train) for f in raw_train[:-1]]
    cell["gd_test_accuracy"] = [accuracy(f, labels_test) for f in raw_test[:-1]]
    rms_spread = np.sqrt(np.mean((centred_test - centred_test.mean(axis=0)) ** 2))
    cell["mean_predictor"] = {
        "test_accuracy": accuracy(raw_test[-1], labels_test),
        "train_accuracy": accuracy(raw_train[-1], labels_train),
        "test_output_spread": output_spread(centred_test, yc_test),
        "spread_to_nngp_scale": float(rms_spread / nngp_scale),
        "test_accuracy_centred_targets": accuracy(centred_test, labels_test),
    }
    # Relative variation of Θ(X*, X) across pairs: its data-dependent part (the
    # spread analysis stops where this reaches float64 rounding).
    cell["kernel_variation"] = float(np.std(k_test_train) / abs(np.mean(k_test_train)))
    return cell


def phase_row(activation, sigma_w2, sigma_b2, depths, x_train, x_test, labels_train,
              labels_test, num_classes, times, learning_rate_fraction, kernel_batch_size=None):
    """The cells of every depth at one σw²: one all-depths kernel recursion."""
    import keras_ntk
    from experiments import models

    start = time.time()
    model = models.ntk_fcn(x_train.shape[1:], 1, depth=max(depths), width=8,
                           sigma_w2=sigma_w2, sigma_b2=sigma_b2, activation=activation)
    train = keras_ntk.infinite_kernels(model, x_train, all_depths=True,
                                       batch_size=kernel_batch_size)
    cross = keras_ntk.infinite_kernels(model, x_test, x_train, all_depths=True,
                                       batch_size=kernel_batch_size).ntk
    kernel_seconds = time.time() - start
    cells = []
    # One BLAS thread: 256² eigendecompositions are ~20× slower with two threads on a
    # loaded 2-core machine (measured 0.84 s against 0.036 s at load 13).
    with threadpoolctl.threadpool_limits(1), np.errstate(under="ignore"):
        for depth in depths:
            # The NNGP scale: the standard deviation of one output of the random infinite
            # network, √(mean K(x, x)) over the training inputs.
            nngp_scale = float(np.sqrt(np.mean(np.diag(train.nngp[depth]))))
            cells.append(phase_depth(train.ntk[depth], cross[depth], nngp_scale, labels_train,
                                     labels_test, num_classes, times, learning_rate_fraction))
    return {"cells": cells, "kernel_seconds": kernel_seconds,
            "seconds": time.time() - start}


def assemble_diagram(activation, grid, depths, sigma_b2, rows, times, learning_rate_fraction):
    from keras_ntk import mean_field as mf

    def per(get):
        return [[get(cell) for cell in row["cells"]] for row in rows]

    fields = [mean_field(activation, s, sigma_b2) for s in grid]
    spread = per(lambda c: c["mean_predictor"]["test_output_spread"])
    variation = per(lambda c: c["kernel_variation"])
    fits = [efold_length(depths, s, v) for s, v in zip(spread, variation)]
    return {
        "activation": activation,
        "sigma_b2": float(sigma_b2),
        "sigma_w2": [float(s) for s in grid],
        "depth": [int(d) for d in depths],
        "condition_number": per(lambda c: c["condition_number"]),
        "condition_at_float64_bound": per(lambda c: c["condition_at_float64_bound"]),
        "float64_bound": 1.0 / _EPS,
        **{name: [f[name] for f in fields] for name in
           ("chi1", "chi_c_star", "q_star", "c_star", "xi_1", "xi_star", "xi_c_star")},
        "critical_sigma_w2": mf.critical_sigma_w2(activation, sigma_b2),
        "lambda_max": per(lambda c: c["lambda_max"]),
        "lambda_min": per(lambda c: c["lambda_min"]),
        "kernel_variation": variation,
        "kernel_seconds": [row["kernel_seconds"] for row in rows],
        "gd_mse": {
            "times": [float(t) for t in times],
            "dynamics": "gradient flow (continuous time), closed form",
            "learning_rate_fraction": float(learning_rate_fraction),
            "learning_rate": per(lambda c: c["learning_rate"]),
            "train_loss": per(lambda c: c["train_loss"]),
            "initial_train_loss": per(lambda c: c["initial_train_loss"]),
            "train_accuracy": per(lambda c: c["gd_train_accuracy"]),
            "test_accuracy": per(lambda c: c["gd_test_accuracy"]),
        },
        "mean_predictor": {
            "targets": "test_accuracy, train_accuracy: raw one-hot; the rest: one-hot minus "
                       "the training mean",
            **{name: per(lambda c, name=name: c["mean_predictor"][name])
               for name in ("test_accuracy", "train_accuracy", "test_output_spread",
                            "spread_to_nngp_scale", "test_accuracy_centred_targets")},
            "spread_efold_length": [fit for fit, _ in fits],
            "spread_efold_depths": [used for _, used in fits],
        },
    }


# ---------------------------------------------------------------- part 3


def architecture_cell(name, depth, activation, sigma_w2, sigma_b2, split, kernel_size,
                      ridge, kernel_batch_size=None):
    """NTK spectrum and kernel-regression predictions of one architecture.

    `split` is (x_train, labels_train, x_test, labels_test) with image inputs.
    Stores which test examples are classified correctly (for paired tests).
    """
    import keras_ntk
    from experiments import models
    from keras_ntk import predict

    x_train, labels_train, x_test, labels_test = split
    shape = x_train.shape[1:]
    common = dict(depth=depth, sigma_w2=sigma_w2, sigma_b2=sigma_b2, activation=activation)
    if name == "fcn":
        model = models.ntk_fcn(shape, 1, width=8, **common)
    else:
        model = models.ntk_cnn(shape, 1, filters=4, kernel_size=kernel_size,
                               pooling=name.split("_")[1], **common)
    start = time.time()
    # Θ(X, X) and Θ(X*, X) only (Θ(X*, X*) is not needed).
    k_train = keras_ntk.infinite_kernels(model, x_train, batch_size=kernel_batch_size).ntk
    k_test_train = keras_ntk.infinite_kernels(model, x_test, x_train,
                                              batch_size=kernel_batch_size).ntk
    seconds = time.time() - start
    eigenvalues, cell = spectrum_summary(k_train)
    num_classes = int(max(labels_train.max(), labels_test.max())) + 1
    y_train = heatmap_targets(labels_train, num_classes)
    scaled_ridge = ridge * float(np.trace(k_train)) / len(k_train)
    fx_test = predict.kernel_regression(k_train, k_test_train, y_train, scaled_ridge)
    correct = np.argmax(fx_test, axis=-1) == labels_test
    cell.update(
        test_accuracy=float(np.mean(correct)),
        test_correct=[bool(c) for c in correct],
        eigenvalues=[float(v) for v in eigenvalues[::-1]],
        kernel_seconds=seconds,
    )
    return cell
