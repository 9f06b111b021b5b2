"""Study C: disentangling trainability and generalization in deep networks.

Reproduces on the infinite-width NTK the analyses of Xiao, Pennington and
Schoenholz (ICML 2020), "Disentangling trainability and generalization in
deep neural networks":

1. Phase diagram of fully connected networks (FCN) over (σw², depth) for
   ReLU and Erf at fixed σb²: the condition number κ = λmax/λmin of the
   infinite NTK Θ(X, X) on the training inputs, the mean-field fixed points
   q*, c*, the slopes χ1, χc* and the depth scales ξ1 = −1/log χ1 and
   ξc* = −1/log χc*, with the order-to-chaos line χ1 = 1. ReLU has no
   chaotic phase (χ1 = σw²/2, q* infinite for σw² ≥ 2): its grid stops at
   the critical line σw² = 2. κ at or above the float64 resolution
   (λmin ≤ n·ε·λmax) is flagged `condition_at_float64_bound` and stored as
   min(λmax/max(λmin, ε λmax), 1/ε) ≈ 4.5e15. (In the chaotic phase the
   self-correlation c = 1 of Θ(x, x) is an unstable fixed point;
   `infinite_kernels` takes the diagonal from the exact self recursion, so
   deep chaotic cells keep an exact diagonal.)
   Test accuracy of the infinite network trained by gradient descent on MSE
   (`keras_ntk.predict.gradient_descent_mse`, discrete steps) after t steps
   at the learning rate η = `learning_rate_fraction` × η_max, where
   η_max = 2·n·O/λmax is the largest stable rate (`max_learning_rate`).
2. The mean predictor P(Θ) = Θ(X*, X) Θ(X, X)⁻¹ (gradient descent at
   t = ∞; eigenvalues at rounding level are treated as zero, a
   pseudo-inverse) applied to the training targets, per depth: its test
   accuracy and the spread of its test outputs across test inputs,
   ‖F* − mean F*‖_F / ‖Y* − mean Y*‖_F (0 when every test input gets the
   same output: the predictor has degenerated).
3. FCN vs CNN with a Flatten head (CNN-F) vs CNN with global average
   pooling (CNN-GAP), same activation, σw², σb², on the same (smaller)
   subset: NTK spectra and kernel-regression test accuracy.
4. A finite-width check: NTK-parameterized FCNs of a few widths trained
   by full-batch gradient descent on MSE for `finite_steps` steps at the
   same η as the infinite prediction. Under the NTK parameterization f0 is
   an O(1) random function at any width, so the comparison is of the
   centred outputs f_T − f_0 (trained on targets Y + f_0(X), exactly the
   infinite mean prediction in the linear regime) with the infinite mean
   predictor μ_T, and of the ensemble mean over seeds (centred and not).

Targets are one-hot labels minus 1/num_classes; accuracy is that of the
argmax. Every NTK comes from `keras_ntk.infinite_kernels` on the
architecture built by `experiments.models.ntk_fcn`/`ntk_cnn` (depth =
number of hidden layers, plus a readout layer with the same σw², σb²).
Each (activation, σw², depth) is a separate call: the public API gives the
kernel of one architecture, so the default grid is a set of depths, not
every depth.

Run: `python -m experiments.trainability --gin_file=trainability/digits.gin
--output_dir=runs/c`. Finished cells are kept in `cells/` (`experiments.cells`,
with their settings) and skipped on a rerun; other settings are refused.
"""

import math
import os
import time

import numpy as np
from absl import logging

from experiments import cells as cells_lib
from experiments import launcher
from experiments import report

ARCHITECTURES = ("fcn", "cnn_flatten", "cnn_gap")
ACTIVATIONS = ("relu", "erf")
_EPS = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------- helpers


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _accuracy(outputs, labels):
    return float(np.mean(np.argmax(outputs, axis=-1) == labels))


def _targets(labels, num_classes):
    return np.eye(num_classes)[labels] - 1.0 / num_classes


def _output_spread(outputs, targets):
    """‖F − mean F‖_F / ‖Y − mean Y‖_F over the rows (inputs)."""
    spread = np.linalg.norm(outputs - outputs.mean(axis=0))
    return float(spread / np.linalg.norm(targets - targets.mean(axis=0)))


def mean_field(activation, sigma_w2, sigma_b2):
    """q*, c*, χ1, χc*, ξ1, ξ*, ξc* of one point (`keras_ntk.mean_field`; None where not finite)."""
    from keras_ntk import mean_field as mf

    args = (activation, sigma_w2, sigma_b2)
    return {
        "q_star": _finite_or_none(mf.q_star(*args)),
        "c_star": _finite_or_none(mf.c_star(*args)),
        "chi1": float(mf.chi1(*args)),
        "chi_c_star": _finite_or_none(mf.chi_c_star(*args)),
        "xi_1": _finite_or_none(mf.xi_1(*args)),
        "xi_star": _finite_or_none(mf.xi_star(*args)),
        "xi_c_star": _finite_or_none(mf.xi_c_star(*args)),
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


class _Cells:
    """The study's cells in the shared store (`experiments.cells`), one record each.

    A cell of part P (phase, architectures, finite_width) is stored as
    `cells/<P>-<key>.json` with the settings of its part; a rerun with other
    settings is refused naming them (or, with `overwrite`, recomputed).
    """

    def __init__(self, output_dir, settings, overwrite=False):
        self.store = cells_lib.CellStore(output_dir, overwrite=overwrite)
        self.settings = settings

    def _cell(self, part, key):
        return f"{part}-{key.replace('/', '-')}", dict(self.settings[part], part=part, cell=key)

    def get(self, part, key):
        return self.store.get(*self._cell(part, key))

    def put(self, part, key, value):
        self.store.put(*self._cell(part, key), value)


def _summary_writer(output_dir, name):
    import tensorflow as tf

    return tf.summary.create_file_writer(os.path.join(output_dir, "tensorboard", name))


# ---------------------------------------------------------------- 1 + 2


def _phase_key(activation, sigma_w2, depth):
    return f"{activation}/sigma_w2={sigma_w2:g}/depth={depth}"


def phase_cell(activation, sigma_w2, depth, sigma_b2, x_all, num_train, labels_train,
               labels_test, num_classes, times, learning_rate_fraction, kernel_batch_size=None):
    """Everything measured at one (activation, σw², depth) of the FCN grid."""
    import keras_ntk
    from experiments import models
    from keras_ntk import predict

    model = models.ntk_fcn(x_all.shape[1:], 1, depth=depth, width=8, sigma_w2=sigma_w2,
                           sigma_b2=sigma_b2, activation=activation)
    ntk = keras_ntk.infinite_kernels(model, x_all, batch_size=kernel_batch_size).ntk
    k_train, k_test_train = ntk[:num_train, :num_train], ntk[num_train:, :num_train]
    _, cell = spectrum_summary(k_train)
    y_train = _targets(labels_train, num_classes)
    y_test = _targets(labels_test, num_classes)
    rate = learning_rate_fraction * predict.max_learning_rate(k_train, y_train.size)
    fx_train, fx_test = predict.gradient_descent_mse(
        k_train, y_train, rate, np.asarray(times, np.float64), k_test_train, discrete=True)
    cell["gd_train_accuracy"] = [_accuracy(f, labels_train) for f in fx_train]
    cell["gd_test_accuracy"] = [_accuracy(f, labels_test) for f in fx_test]
    cell["learning_rate"] = float(rate)
    # The mean predictor P(Θ) Y: gradient descent run to t = ∞.
    mean_train, mean_test = predict.gradient_descent_mse(
        k_train, y_train, rate, np.inf, k_test_train)
    cell["mean_predictor"] = {
        "test_accuracy": _accuracy(mean_test, labels_test),
        "train_accuracy": _accuracy(mean_train, labels_train),
        "test_output_spread": _output_spread(mean_test, y_test),
        "test_output_norm": float(np.linalg.norm(mean_test) / np.linalg.norm(y_test)),
        "train_residual": float(np.linalg.norm(mean_train - y_train) / np.linalg.norm(y_train)),
    }
    cell["kernel_diag_mean"] = float(np.mean(np.diag(k_train)))
    off = k_train[~np.eye(num_train, dtype=bool)]
    cell["kernel_offdiag_mean"] = float(off.mean()) if off.size else 0.0
    return cell


def _phase_diagrams(cells, output_dir, activations, grids, depths, sigma_b2, dataset, times,
                    learning_rate_fraction, kernel_batch_size):
    x_all = np.concatenate([dataset.train.x, dataset.test.x]).reshape(
        len(dataset.train.x) + len(dataset.test.x), -1).astype(np.float64)
    num_train = len(dataset.train.x)
    num_classes = int(max(dataset.train.y.max(), dataset.test.y.max())) + 1
    progress = cells_lib.Progress(sum(len(grids[a]) for a in activations) * len(depths),
                                  "phase cell")
    diagrams = []
    for activation in activations:
        writer = _summary_writer(output_dir, f"phase_{activation}")
        table = {}
        for sigma_w2 in grids[activation]:
            for depth in depths:
                key = _phase_key(activation, sigma_w2, depth)
                cell = cells.get("phase", key)
                if cell is not None:
                    progress.skip(key)
                else:
                    cell = phase_cell(activation, sigma_w2, depth, sigma_b2, x_all, num_train,
                                      dataset.train.y, dataset.test.y, num_classes, times,
                                      learning_rate_fraction, kernel_batch_size)
                    cells.put("phase", key, cell)
                    with writer.as_default():
                        import tensorflow as tf

                        prefix = f"sigma_w2={sigma_w2:g}"
                        tf.summary.scalar(f"{prefix}/log10_condition_number",
                                          math.log10(cell["condition_number"]), step=depth)
                        tf.summary.scalar(f"{prefix}/mean_predictor_test_accuracy",
                                          cell["mean_predictor"]["test_accuracy"], step=depth)
                        for t, accuracy in zip(times, cell["gd_test_accuracy"]):
                            tf.summary.scalar(f"{prefix}/gd_test_accuracy_t={t:g}", accuracy,
                                              step=depth)
                    writer.flush()
                    progress.finish(key)
                table[(sigma_w2, depth)] = cell
        writer.close()
        diagrams.append(_assemble_diagram(activation, grids[activation], depths, sigma_b2, table,
                                          times, learning_rate_fraction))
    return diagrams


def _assemble_diagram(activation, grid, depths, sigma_b2, table, times, learning_rate_fraction):
    def per(get):
        return [[get(table[(s, d)]) for d in depths] for s in grid]

    from keras_ntk import mean_field as mf

    fields = [mean_field(activation, s, sigma_b2) for s in grid]
    return {
        "activation": activation,
        "sigma_b2": float(sigma_b2),
        "sigma_w2": [float(s) for s in grid],
        "depth": [int(d) for d in depths],
        "condition_number": per(lambda c: c["condition_number"]),
        "condition_at_float64_bound": per(lambda c: c["condition_at_float64_bound"]),
        "float64_bound": 1.0 / _EPS,
        "chi1": [f["chi1"] for f in fields],
        "chi_c_star": [f["chi_c_star"] for f in fields],
        "q_star": [f["q_star"] for f in fields],
        "c_star": [f["c_star"] for f in fields],
        "xi_1": [f["xi_1"] for f in fields],
        "xi_star": [f["xi_star"] for f in fields],
        "xi_c_star": [f["xi_c_star"] for f in fields],
        "critical_sigma_w2": mf.critical_sigma_w2(activation, sigma_b2),
        "lambda_max": per(lambda c: c["lambda_max"]),
        "lambda_min": per(lambda c: c["lambda_min"]),
        "lambda_bulk": per(lambda c: c["lambda_bulk"]),
        "gd_mse": {
            "times": [float(t) for t in times],
            "learning_rate_fraction": float(learning_rate_fraction),
            "learning_rate": per(lambda c: c["learning_rate"]),
            "test_accuracy": per(lambda c: c["gd_test_accuracy"]),
            "train_accuracy": per(lambda c: c["gd_train_accuracy"]),
        },
        "mean_predictor": {
            name: per(lambda c, name=name: c["mean_predictor"][name])
            for name in ("test_accuracy", "train_accuracy", "test_output_spread",
                         "test_output_norm", "train_residual")
        },
    }


# ---------------------------------------------------------------- 3


def architecture_cell(name, depth, activation, sigma_w2, sigma_b2, dataset, kernel_size,
                      ridge, kernel_batch_size=None):
    """NTK spectrum and kernel-regression accuracy of one architecture."""
    import keras_ntk
    from experiments import models
    from keras_ntk import predict

    shape = dataset.input_shape
    common = dict(depth=depth, sigma_w2=sigma_w2, sigma_b2=sigma_b2, activation=activation)
    if name == "fcn":
        model = models.ntk_fcn(shape, 1, width=8, **common)
    else:
        model = models.ntk_cnn(shape, 1, filters=4, kernel_size=kernel_size,
                               pooling=name.split("_")[1], **common)
    x_all = np.concatenate([dataset.train.x, dataset.test.x]).astype(np.float64)
    n = len(dataset.train.x)
    start = time.time()
    ntk = keras_ntk.infinite_kernels(model, x_all, batch_size=kernel_batch_size).ntk
    seconds = time.time() - start
    k_train, k_test_train = ntk[:n, :n], ntk[n:, :n]
    eigenvalues, cell = spectrum_summary(k_train)
    num_classes = int(max(dataset.train.y.max(), dataset.test.y.max())) + 1
    y_train = _targets(dataset.train.y, num_classes)
    scaled_ridge = ridge * float(np.trace(k_train)) / n
    fx_test = predict.kernel_regression(k_train, k_test_train, y_train, scaled_ridge)
    cell.update(
        test_accuracy=_accuracy(fx_test, dataset.test.y),
        eigenvalues=[float(v) for v in eigenvalues[::-1]],
        kernel_seconds=seconds,
    )
    return cell


def _architectures(cells, output_dir, names, depths, activation, sigma_w2, sigma_b2, dataset,
                   kernel_size, ridge, kernel_batch_size):
    import tensorflow as tf

    progress = cells_lib.Progress(len(names) * len(depths), "architecture cell")
    writer = _summary_writer(output_dir, "architectures")
    out = {}
    for name in names:
        by_depth = []
        for depth in depths:
            key = f"{name}/depth={depth}"
            cell = cells.get("architectures", key)
            if cell is not None:
                progress.skip(key)
            else:
                cell = architecture_cell(name, depth, activation, sigma_w2, sigma_b2, dataset,
                                         kernel_size, ridge, kernel_batch_size)
                cells.put("architectures", key, cell)
                with writer.as_default():
                    tf.summary.scalar(f"{name}/test_accuracy", cell["test_accuracy"], step=depth)
                    tf.summary.scalar(f"{name}/log10_condition_number",
                                      math.log10(cell["condition_number"]), step=depth)
                writer.flush()
                progress.finish(key)
            by_depth.append(cell)
        out[name] = {
            # The contract's number: the deepest of `architecture_depths`.
            "test_accuracy": by_depth[-1]["test_accuracy"],
            "depth": [int(d) for d in depths],
            "test_accuracy_by_depth": [c["test_accuracy"] for c in by_depth],
            "condition_number": [c["condition_number"] for c in by_depth],
            "condition_at_float64_bound": [c["condition_at_float64_bound"] for c in by_depth],
            "eigenvalues": [c["eigenvalues"] for c in by_depth],
            "kernel_seconds": [c["kernel_seconds"] for c in by_depth],
        }
    writer.close()
    return out


# ---------------------------------------------------------------- 4


def _train_finite(width, seed, depth, activation, sigma_w2, sigma_b2, x_train, y_train,
                  x_test, rate, steps, strategy, log_dir):
    """f_T − f_0 on test inputs (and f_T, f_0) of one width and seed."""
    import keras
    import tensorflow as tf

    from experiments import models

    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = models.ntk_fcn(x_train.shape[1:], y_train.shape[1], depth=depth, width=width,
                               sigma_w2=sigma_w2, sigma_b2=sigma_b2, activation=activation)
        # keras "mse" is ‖f − Y‖²/(n·O), twice the ‖f − Y‖²/(2·n·O) of
        # predict.gradient_descent_mse: the same steps need half the rate.
        model.compile(optimizer=keras.optimizers.SGD(rate / 2), loss="mse")
    f0_train = model.predict(x_train, batch_size=len(x_train), verbose=0).astype(np.float64)
    f0_test = model.predict(x_test, batch_size=1024, verbose=0).astype(np.float64)
    targets = (y_train + f0_train).astype(np.float32)
    # Full-batch gradient descent: `steps` steps of one batch, in one epoch (one epoch per
    # step costs Keras' per-epoch overhead every step).
    batches = tf.data.Dataset.from_tensors((x_train, targets)).repeat()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(log_dir, update_freq=max(1, steps // 50))])
    ft_train = model.predict(x_train, batch_size=len(x_train), verbose=0).astype(np.float64)
    ft_test = model.predict(x_test, batch_size=1024, verbose=0).astype(np.float64)
    return ft_test, f0_test, float(np.mean((ft_train - targets) ** 2))


def _finite_width(cells, output_dir, dataset, widths, seeds, depth, activation, sigma_w2,
                  sigma_b2, num_train, steps, learning_rate_fraction, strategy):
    import keras_ntk
    from experiments import models
    from keras_ntk import predict

    x_train = dataset.train.x[:num_train]
    labels_train = dataset.train.y[:num_train]
    x_test, labels_test = dataset.test.x, dataset.test.y
    num_classes = int(max(dataset.train.y.max(), dataset.test.y.max())) + 1
    y_train = _targets(labels_train, num_classes)
    model = models.ntk_fcn(x_train.shape[1:], 1, depth=depth, width=8, sigma_w2=sigma_w2,
                           sigma_b2=sigma_b2, activation=activation)
    x_all = np.concatenate([x_train, x_test]).astype(np.float64)
    ntk = keras_ntk.infinite_kernels(model, x_all).ntk
    k_train, k_test_train = ntk[:num_train, :num_train], ntk[num_train:, :num_train]
    rate = learning_rate_fraction * predict.max_learning_rate(k_train, y_train.size)
    _, infinite_test = predict.gradient_descent_mse(k_train, y_train, rate, steps, k_test_train,
                                                    discrete=True)
    scale = np.linalg.norm(infinite_test)

    def error(outputs):
        return float(np.linalg.norm(outputs - infinite_test) / scale)

    progress = cells_lib.Progress(len(widths) * len(seeds), "finite-width run")
    per_width = []
    for width in widths:
        centred, raw, runs = [], [], []
        for seed in seeds:
            key = f"width={width}/seed={seed}"
            run = cells.get("finite_width", key)
            if run is not None:
                progress.skip(key)
            else:
                ft, f0, loss = _train_finite(
                    width, seed, depth, activation, sigma_w2, sigma_b2, x_train, y_train,
                    x_test, rate, steps, strategy,
                    os.path.join(output_dir, "tensorboard", "finite_width", f"w{width}_s{seed}"))
                run = {"centred_test": (ft - f0).tolist(), "raw_test": ft.tolist(),
                       "final_loss": loss}
                cells.put("finite_width", key, run)
                progress.finish(key)
            centred.append(np.asarray(run["centred_test"]))
            raw.append(np.asarray(run["raw_test"]))
            runs.append(run)
        per_width.append({
            "width": int(width),
            "centred_relative_error": [error(c) for c in centred],
            "centred_relative_error_mean": float(np.mean([error(c) for c in centred])),
            "ensemble_centred_relative_error": error(np.mean(centred, axis=0)),
            "ensemble_raw_relative_error": error(np.mean(raw, axis=0)),
            "single_raw_relative_error_mean": float(np.mean([error(r) for r in raw])),
            "centred_test_accuracy": [_accuracy(c, labels_test) for c in centred],
            "ensemble_centred_test_accuracy": _accuracy(np.mean(centred, axis=0), labels_test),
            "final_train_loss": [r["final_loss"] for r in runs],
        })
    return {
        "activation": activation, "depth": int(depth), "sigma_w2": float(sigma_w2),
        "sigma_b2": float(sigma_b2), "num_train": int(num_train), "steps": int(steps),
        "learning_rate": float(rate), "learning_rate_fraction": float(learning_rate_fraction),
        "seeds": [int(s) for s in seeds],
        "infinite_test_accuracy": _accuracy(infinite_test, labels_test),
        "comparison": "relative Frobenius error ‖f − μ_T‖/‖μ_T‖ on test inputs, μ_T the "
                      "infinite mean predictor after T steps",
        "widths": per_width,
    }


# ---------------------------------------------------------------- run


def _validate(dataset, activations, grids, depths, architectures, times, learning_rate_fraction):
    from experiments import data as data_lib

    if dataset not in data_lib.KNOWN_DATASETS:
        raise ValueError(f"Unknown dataset. Known datasets: {', '.join(data_lib.KNOWN_DATASETS)}. "
                         f"Received: dataset={dataset!r}")
    bad = [a for a in activations if a not in ACTIVATIONS]
    if bad:
        raise ValueError(f"Expected activations among {ACTIVATIONS}. "
                         f"Received: activations={list(activations)!r}")
    for activation in activations:
        if not grids[activation] or any(s <= 0 for s in grids[activation]):
            raise ValueError(f"Expected a non-empty list of positive σw² for {activation}. "
                             f"Received: {activation}_sigma_w2={list(grids[activation])!r}")
    if "relu" in activations and any(s > 2.0 for s in grids["relu"]):
        raise ValueError("ReLU has no chaotic phase (q* is infinite for σw² > 2): keep "
                         f"relu_sigma_w2 ≤ 2. Received: relu_sigma_w2={list(grids['relu'])!r}")
    if not depths or any(int(d) < 1 for d in depths):
        raise ValueError(f"Expected depths ≥ 1. Received: depths={list(depths)!r}")
    bad = [a for a in architectures if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"Expected architectures among {ARCHITECTURES}. "
                         f"Received: architectures={list(architectures)!r}")
    if any(t < 0 for t in times):
        raise ValueError(f"Expected times ≥ 0. Received: times={list(times)!r}")
    if not 0 < learning_rate_fraction < 1:
        raise ValueError("Expected 0 < learning_rate_fraction < 1 (train below the largest "
                         f"stable rate). Received: learning_rate_fraction={learning_rate_fraction}")


def run(
    *,
    output_dir,
    strategy,
    model_builders=None,
    data_dir=None,
    dataset="digits",
    num_train=500,
    num_test=None,
    activations=ACTIVATIONS,
    relu_sigma_w2=(0.5, 1.0, 1.5, 1.8, 2.0),
    erf_sigma_w2=(0.25, 0.5, 1.0, 2.0, 4.0),
    sigma_b2=0.05,
    depths=(1, 4, 16, 64),
    times=(1, 8, 64, 512, 4096),
    learning_rate_fraction=0.5,
    architectures=ARCHITECTURES,
    architecture_depths=(2, 8),
    architecture_activation="relu",
    architecture_sigma_w2=2.0,
    architecture_num_train=200,
    architecture_num_test=200,
    conv_kernel_size=3,
    ridge=0.0,
    finite_widths=(64, 256, 1024),
    finite_seeds=(0, 1, 2),
    finite_depth=2,
    finite_activation="relu",
    finite_sigma_w2=2.0,
    finite_num_train=256,
    finite_steps=200,
    kernel_batch_size=None,
    write_figures=True,
    overwrite=False,
):
    """Runs study C and writes results.json, the cells, figures and TensorBoard logs.

    Args:
        output_dir: the run's directory (local or gs://).
        strategy: the `tf.distribute.Strategy` the finite networks are built in.
        model_builders: unused (study C builds `models.ntk_fcn`/`ntk_cnn`
            per grid point); accepted for the launcher's interface.
        data_dir: tfds data directory.
        dataset: "digits", "mnist" or "cifar10".
        num_train, num_test: the first examples of each split for parts 1, 2
            (None: all).
        activations: phase diagrams to draw, among "relu", "erf".
        relu_sigma_w2, erf_sigma_w2: the σw² grid per activation (ReLU ≤ 2).
        sigma_b2: σb² of every layer.
        depths: the depth grid (hidden layers).
        times: gradient-descent steps at which the test accuracy is read.
        learning_rate_fraction: η / η_max (< 1).
        architectures: among "fcn", "cnn_flatten", "cnn_gap".
        architecture_depths: depths of part 3 (results' `test_accuracy` is
            the deepest).
        architecture_activation, architecture_sigma_w2: part 3's network.
        architecture_num_train, architecture_num_test: part 3's subset (the
            first examples of each split; CNN-GAP kernels cost (H·W)² per pair).
        conv_kernel_size: convolution window of part 3.
        ridge: kernel-regression ridge, relative to the mean diagonal (part 3).
        finite_widths, finite_seeds, finite_depth, finite_activation,
        finite_sigma_w2, finite_num_train, finite_steps: part 4.
        kernel_batch_size: `infinite_kernels` block size (None: automatic).
        write_figures: draw the PNG figures at the end.
        overwrite: discard stored cells computed with other settings instead
            of refusing to run (`--overwrite`).

    Returns:
        The results dictionary (also in results.json).
    """
    from experiments import data as data_lib

    del model_builders
    activations, architectures = list(activations), list(architectures)
    grids = {"relu": [float(s) for s in relu_sigma_w2], "erf": [float(s) for s in erf_sigma_w2]}
    depths = [int(d) for d in depths]
    times = [float(t) for t in times]
    _validate(dataset, activations, grids, depths, architectures, times, learning_rate_fraction)
    # The operative settings of each part's cells (kernel_batch_size: memory only).
    common = {"dataset": dataset, "sigma_b2": float(sigma_b2)}
    settings = {
        "phase": dict(common, num_train=num_train, num_test=num_test, times=times,
                      learning_rate_fraction=float(learning_rate_fraction)),
        "architectures": dict(common, activation=architecture_activation,
                              sigma_w2=float(architecture_sigma_w2),
                              num_train=architecture_num_train, num_test=architecture_num_test,
                              conv_kernel_size=conv_kernel_size, ridge=float(ridge)),
        "finite_width": dict(common, num_train=num_train, num_test=num_test,
                             depth=finite_depth, activation=finite_activation,
                             sigma_w2=float(finite_sigma_w2), finite_num_train=finite_num_train,
                             steps=finite_steps,
                             learning_rate_fraction=float(learning_rate_fraction)),
    }
    cells = _Cells(output_dir, settings, overwrite)
    start = time.time()
    results = {"study": "trainability", "dataset": dataset, "sigma_b2": float(sigma_b2),
               "targets": "one-hot minus 1/num_classes; accuracy of the argmax"}

    data = data_lib.load_dataset(dataset, num_train=num_train, num_test=num_test,
                                 data_dir=data_dir)
    results["num_train"], results["num_test"] = len(data.train.y), len(data.test.y)
    logging.info("Part 1-2: FCN phase diagrams on %d train / %d test inputs",
                 len(data.train.y), len(data.test.y))
    diagrams = _phase_diagrams(cells, output_dir, activations, grids, depths, sigma_b2, data,
                               times, learning_rate_fraction, kernel_batch_size)
    results["phase_diagram"] = diagrams
    results_path = os.path.join(output_dir, "results.json")
    cells_lib.write_json_atomic(results_path, results)

    if architectures:
        subset = data_lib.load_dataset(dataset, num_train=architecture_num_train,
                                       num_test=architecture_num_test, data_dir=data_dir)
        logging.info("Part 3: architectures %s on %d train / %d test inputs", architectures,
                     len(subset.train.y), len(subset.test.y))
        results["architectures"] = _architectures(
            cells, output_dir, architectures, [int(d) for d in architecture_depths],
            architecture_activation, architecture_sigma_w2, sigma_b2, subset, conv_kernel_size,
            ridge, kernel_batch_size)
        results["architecture_setup"] = {
            "activation": architecture_activation, "sigma_w2": float(architecture_sigma_w2),
            "sigma_b2": float(sigma_b2), "num_train": len(subset.train.y),
            "num_test": len(subset.test.y), "kernel_size": int(conv_kernel_size),
            "ridge_relative_to_mean_diagonal": float(ridge),
        }
        cells_lib.write_json_atomic(results_path, results)

    if finite_widths:
        logging.info("Part 4: finite widths %s, seeds %s", list(finite_widths), list(finite_seeds))
        results["finite_width"] = _finite_width(
            cells, output_dir, data, [int(w) for w in finite_widths],
            [int(s) for s in finite_seeds], finite_depth, finite_activation, finite_sigma_w2,
            sigma_b2, min(finite_num_train, len(data.train.y)), int(finite_steps),
            learning_rate_fraction, strategy)
    results["seconds_this_run"] = time.time() - start
    cells_lib.write_json_atomic(results_path, results)
    if write_figures:
        draw_figures(results, os.path.join(output_dir, "figures"))
    return results


# ---------------------------------------------------------------- figures


def _edges(values, log):
    v = np.log(values) if log else np.asarray(values, np.float64)
    if len(v) == 1:
        e = np.array([v[0] - 0.5, v[0] + 0.5])
    else:
        mid = (v[1:] + v[:-1]) / 2
        e = np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])
    return np.exp(e) if log else e


def _overlay_phase(ax, diagram):
    """χ1 = 1 line and the depth scales ξ1, ξc* on a (σw², depth) heat map."""
    sigma = np.asarray(diagram["sigma_w2"])
    critical = diagram["critical_sigma_w2"]
    top = max(diagram["depth"]) * 1.5
    if sigma.min() <= critical <= sigma.max() * 1.05:
        ax.axvline(critical, color="white", lw=2, ls="--", label="χ1 = 1")
    fine = np.linspace(sigma.min(), sigma.max(), 200)
    for name, style in (("xi_1", "-"), ("xi_star", ":")):
        values = [mean_field(diagram["activation"], s, diagram["sigma_b2"])[name] for s in fine]
        ys = np.array([np.nan if v is None else min(8 * v, top) for v in values])
        label = "8ξ1" if name == "xi_1" else "8ξ*"
        ax.plot(fine, ys, color="black", ls=style, lw=1.5, label=label)


def _mark_float64(ax, diagram):
    """'f64': κ at the float64 bound."""
    bound = np.asarray(diagram["condition_at_float64_bound"]).T
    for i, d in enumerate(diagram["depth"]):
        for j, s in enumerate(diagram["sigma_w2"]):
            if bound[i, j]:
                ax.text(s, d, "f64", ha="center", va="center", color="red", fontsize=7)


def figure_condition(diagram, path):
    plt = report.pyplot()
    sigma, depth = diagram["sigma_w2"], diagram["depth"]
    kappa = np.log10(np.asarray(diagram["condition_number"], np.float64)).T
    fig, ax = plt.subplots(figsize=(6, 4.2))
    mesh = ax.pcolormesh(_edges(sigma, False), _edges(depth, True), kappa, cmap="viridis",
                         shading="flat")
    fig.colorbar(mesh, ax=ax, label="log10 κ(Θ(X, X))")
    _mark_float64(ax, diagram)
    _overlay_phase(ax, diagram)
    ax.set_yscale("log")
    ax.set_ylim(_edges(depth, True)[0], _edges(depth, True)[-1])
    ax.set_xlim(_edges(sigma, False)[0], _edges(sigma, False)[-1])
    ax.set_xlabel("σw²")
    ax.set_ylabel("depth (hidden layers)")
    ax.set_title(f"FCN {diagram['activation']}, σb²={diagram['sigma_b2']:g}: condition number\n"
                 "(f64: κ at the float64 bound)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    report.save_figure(fig, path)


def figure_gd_accuracy(diagram, path):
    plt = report.pyplot()
    sigma, depth = diagram["sigma_w2"], diagram["depth"]
    gd = diagram["gd_mse"]
    accuracy = np.asarray(gd["test_accuracy"], np.float64)  # σ × depth × t
    times = gd["times"]
    fig, axes = plt.subplots(1, len(times), figsize=(3.2 * len(times), 3.2), sharey=True,
                             squeeze=False)
    for k, (t, ax) in enumerate(zip(times, axes[0])):
        mesh = ax.pcolormesh(_edges(sigma, False), _edges(depth, True), accuracy[:, :, k].T,
                             vmin=0, vmax=1, cmap="magma", shading="flat")
        _overlay_phase(ax, diagram)
        _mark_float64(ax, diagram)
        ax.set_yscale("log")
        ax.set_ylim(_edges(depth, True)[0], _edges(depth, True)[-1])
        ax.set_xlim(_edges(sigma, False)[0], _edges(sigma, False)[-1])
        ax.set_title(f"t = {t:g} steps", fontsize=9)
        ax.set_xlabel("σw²")
    axes[0][0].set_ylabel("depth")
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.colorbar(mesh, ax=list(axes[0]), label="test accuracy")
    fig.suptitle(f"FCN {diagram['activation']}: infinite network trained by GD on MSE, "
                 f"η = {gd['learning_rate_fraction']:g}·η_max", fontsize=10)
    report.save_figure(fig, path)


def figure_mean_predictor(diagrams, path):
    plt = report.pyplot()
    fig, axes = plt.subplots(2, len(diagrams), figsize=(5 * len(diagrams), 6.5), squeeze=False)
    for col, diagram in enumerate(diagrams):
        chi = np.asarray(diagram["chi1"])
        norm = plt.Normalize(-1.0, 1.0)
        cmap = plt.get_cmap("coolwarm")
        for i, s in enumerate(diagram["sigma_w2"]):
            color = cmap(norm(np.clip(np.log2(chi[i]), -1, 1)))
            label = f"σw²={s:g} (χ1={chi[i]:.2f})"
            mp = diagram["mean_predictor"]
            axes[0][col].plot(diagram["depth"], mp["test_accuracy"][i], "o-", color=color,
                              label=label)
            axes[1][col].plot(diagram["depth"], np.maximum(mp["test_output_spread"][i], 1e-12),
                              "o-", color=color)
            # Cells whose kernel is at the float64 limits (see figure_condition).
            flagged = [j for j in range(len(diagram["depth"]))
                       if diagram["condition_at_float64_bound"][i][j]]
            for row, values in ((0, mp["test_accuracy"][i]), (1, mp["test_output_spread"][i])):
                axes[row][col].plot([diagram["depth"][j] for j in flagged],
                                    [max(values[j], 1e-12) for j in flagged], "x",
                                    color="black", ms=8)
        axes[0][col].set_title(f"{diagram['activation']}: mean predictor P(Θ)Y\n(blue ordered, "
                               "red chaotic; × float64-limited)", fontsize=9)
        axes[0][col].set_ylabel("test accuracy")
        axes[0][col].set_ylim(0, 1)
        axes[1][col].set_ylabel("test output spread ‖F*−mean‖/‖Y*−mean‖")
        axes[1][col].set_yscale("log")
        for row in range(2):
            axes[row][col].set_xscale("log")
            axes[row][col].set_xlabel("depth")
        axes[0][col].legend(fontsize=6)
    report.save_figure(fig, path)


def figure_architectures(architectures, setup, path):
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, entry in architectures.items():
        eig = np.asarray(entry["eigenvalues"][-1])
        axes[0].loglog(np.arange(1, len(eig) + 1), np.maximum(eig / eig[0], 1e-18), label=name)
        axes[1].plot(entry["depth"], entry["test_accuracy_by_depth"], "o-", label=name)
    axes[0].set_xlabel("index i")
    axes[0].set_ylabel("λ_i / λ_max")
    axes[0].set_title(f"NTK spectra, depth {list(architectures.values())[0]['depth'][-1]} "
                      f"({setup['activation']}, σw²={setup['sigma_w2']:g})", fontsize=9)
    axes[1].set_xlabel("depth")
    axes[1].set_ylabel("kernel-regression test accuracy")
    axes[1].set_title(f"{setup['num_train']} train / {setup['num_test']} test", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=8)
    report.save_figure(fig, path)


def figure_finite_width(finite, path):
    plt = report.pyplot()
    widths = [w["width"] for w in finite["widths"]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    series = (("centred_relative_error_mean", "one net, centred f_T − f_0"),
              ("ensemble_centred_relative_error", "ensemble mean, centred"),
              ("ensemble_raw_relative_error", "ensemble mean, raw f_T"),
              ("single_raw_relative_error_mean", "one net, raw f_T"))
    for key, label in series:
        ax.loglog(widths, [w[key] for w in finite["widths"]], "o-", label=label)
    ref = finite["widths"][0]["centred_relative_error_mean"]
    ax.loglog(widths, [ref * (widths[0] / w) ** 0.5 for w in widths], "k:", label="∝ width^−1/2")
    ax.set_xlabel("width")
    ax.set_ylabel("‖f − μ_T‖ / ‖μ_T‖ (test)")
    ax.set_title(f"finite vs infinite, {finite['activation']} depth {finite['depth']}, "
                 f"T = {finite['steps']} GD steps", fontsize=9)
    ax.legend(fontsize=7)
    report.save_figure(fig, path)


def draw_figures(results, directory):
    """All PNG figures of a results dictionary into `directory`."""
    diagrams = results.get("phase_diagram", [])
    for diagram in diagrams:
        figure_condition(diagram, os.path.join(directory, f"condition_{diagram['activation']}.png"))
        figure_gd_accuracy(diagram, os.path.join(directory, f"gd_accuracy_{diagram['activation']}.png"))
    if diagrams:
        figure_mean_predictor(diagrams, os.path.join(directory, "mean_predictor.png"))
    if results.get("architectures"):
        figure_architectures(results["architectures"], results["architecture_setup"],
                             os.path.join(directory, "architectures.png"))
    if results.get("finite_width"):
        figure_finite_width(results["finite_width"], os.path.join(directory, "finite_width.png"))


def main(argv):
    launcher.main(argv, "trainability", run)


if __name__ == "__main__":
    from absl import app

    app.run(main)
