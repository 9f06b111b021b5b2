"""Callbacks that snapshot the empirical NTK during `model.fit`."""

import inspect
import io
import math
import os
import re
import warnings
import zipfile

import keras
import numpy as np
import tensorflow as tf

from keras_ntk import _validation, metrics
from keras_ntk._weights import iter_layers
from keras_ntk.linearize import Linearize
from keras_ntk.ntk import empirical_ntk

_LOG_KEYS = (
    "ntk_distance_from_init",
    "ntk_velocity",
    "ntk_relative_velocity",
    "ntk_alignment",
    "ntk_trace",
    "ntk_condition",
    "weight_distance_from_init",
    "weight_distance_sq",
)
_INITIAL_FILE = "initial.npz"
_INITIAL_KEYS = ("kernel", "weights")
_SNAPSHOT_KEYS = ("kernel", "epoch", "step")
_SNAPSHOT_FILE = re.compile(r"^step_(\d+)\.npz$")


def _linearize_layers(layer):
    """The Linearize layers nested in `layer` (not inside another Linearize)."""
    found = [
        child for child in iter_layers(layer, include_self=False)
        if isinstance(child, Linearize)
    ]
    inner = {
        id(nested) for wrapper in found
        for nested in iter_layers(wrapper, include_self=False)
    }
    return [wrapper for wrapper in found if id(wrapper) not in inner]


def effective_weights(model):
    """The weights θ the model computes with, flattened into one float64 vector.

    For a model containing `Linearize` layers, θ = θ0 + δ for those layers (its
    trainable weights are only the offsets δ); other trainable weights are
    taken as they are.
    """
    wrappers = _linearize_layers(model)
    offsets = {id(d) for wrapper in wrappers for d in wrapper.deltas}
    values = [tf.convert_to_tensor(w) for w in model.trainable_weights if id(w) not in offsets]
    for wrapper in wrappers:
        values += wrapper.linearized_weights()
    if not values:
        return np.zeros(0)
    return np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])


def _write_npz_atomically(path, **arrays):
    """Writes an .npz through tf.io.gfile (local or gs://): temp file, then rename."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    temporary = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "wb") as handle:
        handle.write(buffer.getvalue())
    tf.io.gfile.rename(temporary, path, overwrite=True)


def _read_npz(path, required=("kernel",)):
    """The arrays of an .npz snapshot; a ValueError naming the file if it is unreadable."""
    try:
        with tf.io.gfile.GFile(path, "rb") as handle:
            with np.load(io.BytesIO(handle.read()), allow_pickle=False) as data:
                record = {key: data[key] for key in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, tf.errors.OpError) as error:
        raise ValueError(
            "Expected a readable NTKTracker snapshot (.npz); the file is truncated or "
            "corrupt (delete it to recompute it, or restore it from a copy). "
            f"Received: path={path!r} ({type(error).__name__}: {error})"
        ) from error
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(
            f"Expected an NTKTracker snapshot holding {list(required)}; {missing} are missing "
            f"(not written by NTKTracker, or corrupt). Received: path={path!r} with keys "
            f"{sorted(record)}"
        )
    return record


def load_ntk_history(save_dir):
    """Reads the kernels that `NTKTracker(save_dir=...)` wrote.

    Args:
        save_dir: the tracker's `save_dir` (a local or `gs://` path).

    Returns:
        A dict with `"initial"` (the Θ0 snapshot: `kernel`, `eigenvalues`,
        `weights`) and `"snapshots"`: a list ordered by training step of dicts
        with `step`, `epoch`, `kernel`, `eigenvalues` and the logged metrics.

    Raises:
        ValueError: naming the file, for a truncated or corrupt snapshot.
    """
    initial_path = os.path.join(save_dir, _INITIAL_FILE)
    if not tf.io.gfile.exists(initial_path):
        raise ValueError(
            f"Expected an NTKTracker save_dir containing {_INITIAL_FILE}. "
            f"Received: save_dir={save_dir!r}"
        )
    snapshots = []
    for name in tf.io.gfile.listdir(save_dir):
        if _SNAPSHOT_FILE.match(name):
            record = _read_npz(os.path.join(save_dir, name), _SNAPSHOT_KEYS)
            snapshots.append(
                {key: (value.item() if value.ndim == 0 else value) for key, value in record.items()}
            )
    snapshots.sort(key=lambda record: record["step"])
    return {"initial": _read_npz(initial_path, _INITIAL_KEYS), "snapshots": snapshots}


def _raise(error):
    raise error


def _probe_count(probe_inputs):
    """The number of probe examples (the same leading size in every input)."""
    try:
        sizes = {int(np.shape(t)[0]) if np.ndim(t) else -1
                 for t in tf.nest.flatten(probe_inputs)}
    except (TypeError, ValueError):
        sizes = set()
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        raise ValueError(
            "Expected `probe_inputs` to be a non-empty batch (an array or a structure of "
            "arrays with the same leading size). Received: probe_inputs with leading sizes "
            f"{sorted(sizes)}"
        )
    return sizes.pop()


# empirical_ntk's own arguments, which the tracker sets itself.
_TRACKER_SET = ("model", "x1", "x2", "per_layer")


def _check_ntk_kwargs(ntk_kwargs):
    accepted = set(inspect.signature(empirical_ntk).parameters) - set(_TRACKER_SET)
    unknown = sorted(set(ntk_kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"Expected `ntk_kwargs` to hold keyword arguments of empirical_ntk "
            f"({sorted(accepted)}; the tracker sets {list(_TRACKER_SET)} itself). "
            f"Received: ntk_kwargs with {unknown}"
        )


class NTKTracker(keras.callbacks.Callback):
    """Tracks the empirical NTK on a fixed probe set while a model trains.

    At the start of training the tracker computes Θ0 = Θ(X, X) on the probe
    inputs X (with `keras_ntk.empirical_ntk`) and remembers the weights θ0.
    At the end of every `every_n_epochs`-th epoch it computes Θt and writes
    plain floats into `logs`, so `History`, `CSVLogger` and `TensorBoard`
    record them:

    * `ntk_distance_from_init`: 1 − ⟨Θ0, Θt⟩_F / (‖Θ0‖_F ‖Θt‖_F);
    * `ntk_velocity`: the same distance between this and the previous
      snapshot, divided by the epochs between them (by the steps between
      them for `every_n_steps` snapshots). A cosine distance is quadratic in
      small changes; `ntk_relative_velocity`, ‖Θt − Θs‖_F/‖Θs‖_F per epoch
      (or step), is linear in them: read it as a rate (log-spaced snapshots);
    * `ntk_alignment`: centred kernel-target alignment of Θt with
      `probe_labels` (NaN without labels; pass ±1 for binary tasks, one-hot
      rows for classes);
    * `ntk_trace`: tr Θt; `ntk_condition`: λmax/λmin of Θt;
    * `weight_distance_from_init`: ‖θt − θ0‖ / ‖θ0‖ and
      `weight_distance_sq`: ‖θt − θ0‖². For a model made of `Linearize`
      layers θ = θ0 + δ (the offsets δ alone start at 0).

    With `per_layer=True` the tracker also splits Θ = Σ_l Θ_l over the layers
    holding trainable weights (`empirical_ntk(..., per_layer=True)`, from the
    same passes) and logs `ntk_distance_from_init/<layer name>`, the
    distance above for each layer's kernel: which layers' kernels move.

    On the other epochs the same keys hold NaN, so CSV columns stay fixed.
    Keras calls callbacks in list order: put the tracker BEFORE `CSVLogger`
    and `TensorBoard` in `callbacks=[...]`, or they will not see its keys
    (Keras gives no public way to check the order, so this is not detected).

    `every_n_steps` (an int, or an explicit list of global steps, e.g.
    log-spaced) also snapshots within epochs; those snapshots go to
    `history` and `save_dir`, not to the epoch logs. Steps are counted by the
    optimizer's `iterations`, so they continue across resumed runs.

    With `save_dir`, the tracker writes `initial.npz` (Θ0, its eigenvalues,
    θ0) and one `step_<step>.npz` per snapshot (kernel, eigenvalues,
    metrics), each atomically; on a resumed run the saved Θ0 and θ0 are
    reloaded rather than recomputed; calling `fit` again on the same model
    with the same tracker also keeps Θ0 and θ0 (and `history`). Read the files
    with `load_ntk_history`.
    With `tensorboard_dir`, it also writes the metrics, a histogram of the
    eigenvalues and the kernel as an image per snapshot.

    Args:
        probe_inputs: the fixed probe inputs X (any structure the model
            accepts); a few hundred examples.
        probe_labels: optional labels for the alignment.
        every_n_epochs: snapshot period in epochs (0 or None: never; then
            `every_n_steps` is needed).
        every_n_steps: None, a period in steps, or a list of global steps.
        save_dir: optional directory (local or gs://) for the kernels.
        tensorboard_dir: optional TensorBoard log directory.
        ntk_kwargs: keyword arguments for `keras_ntk.empirical_ntk`; the
            kernel must be N×N (the default traces the logits).
        per_layer: also log per-layer kernel distances from init (the
            layer kernels Θ0_l are stored in `initial.npz` as
            `layer_names`/`layer_kernels`).

    Example:

    ```python
    tracker = keras_ntk.NTKTracker(x_train[:256], y_pm1[:256], save_dir="ntk")
    history = model.fit(x_train, y_train, epochs=10,
                        callbacks=[tracker, keras.callbacks.CSVLogger("log.csv")])
    history.history["ntk_distance_from_init"]
    ```
    """

    def __init__(
        self,
        probe_inputs,
        probe_labels=None,
        *,
        every_n_epochs=1,
        every_n_steps=None,
        save_dir=None,
        tensorboard_dir=None,
        ntk_kwargs=None,
        per_layer=False,
    ):
        super().__init__()
        if every_n_epochs is not None and (
                not isinstance(every_n_epochs, (int, np.integer))
                or isinstance(every_n_epochs, bool) or every_n_epochs < 0):
            raise ValueError(
                "Expected `every_n_epochs` to be a non-negative int or None. "
                f"Received: every_n_epochs={every_n_epochs!r}"
            )
        if every_n_steps is not None:
            if isinstance(every_n_steps, (int, np.integer)) or isinstance(every_n_steps, bool):
                if every_n_steps <= 0 or isinstance(every_n_steps, bool):
                    raise ValueError(
                        "Expected `every_n_steps` to be a positive int or a list of steps. "
                        f"Received: every_n_steps={every_n_steps!r}"
                    )
            else:
                steps = list(every_n_steps)
                if not steps or not all(
                    isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
                    for s in steps
                ):
                    raise ValueError(
                        "Expected `every_n_steps` to be a positive int or a non-empty list of "
                        f"positive int global steps. Received: every_n_steps={every_n_steps!r}"
                    )
                every_n_steps = sorted({int(s) for s in steps})
        if not every_n_epochs and every_n_steps is None:
            raise ValueError(
                "Expected a snapshot schedule: `every_n_epochs` ≥ 1 or `every_n_steps` (the "
                "tracker would never compute a kernel after Θ0). Received: "
                f"every_n_epochs={every_n_epochs!r}, every_n_steps=None"
            )
        probe_count = _probe_count(probe_inputs)
        _validation.check_finite(probe_inputs, "probe_inputs")
        if probe_labels is not None:
            probe_labels = np.asarray(probe_labels)
            if probe_labels.ndim not in (1, 2) or probe_labels.shape[0] != probe_count:
                raise ValueError(
                    f"Expected `probe_labels` of shape ({probe_count},) or ({probe_count}, C), "
                    "one row per probe input (encode class indices one-hot). Received: "
                    f"probe_labels.shape={probe_labels.shape}"
                )
            if probe_labels.dtype.kind not in "biuf":
                raise TypeError(
                    "Expected numeric `probe_labels`. Received: probe_labels of dtype "
                    f"{probe_labels.dtype}"
                )
            _validation.check_finite(probe_labels, "probe_labels")
        ntk_kwargs = dict(ntk_kwargs or {})
        _check_ntk_kwargs(ntk_kwargs)
        self.probe_inputs = probe_inputs
        self.probe_labels = probe_labels
        self.every_n_epochs = every_n_epochs or 0
        self.every_n_steps = every_n_steps
        self.save_dir = save_dir
        self.tensorboard_dir = tensorboard_dir
        self.ntk_kwargs = ntk_kwargs
        self.per_layer = bool(per_layer)
        self._layer_names = []
        self._warned = set()  # metric keys already warned about (undefined values)
        self.history = []
        self._writer = None
        # Without per-step snapshots the batch hook does nothing: let Keras keep
        # dispatching batch callbacks asynchronously (overriding the hook alone
        # turns that off and cost ~10% of a plain fit).
        self.async_safe = every_n_steps is None

    # --------------------------------------------------------------- kernels

    @property
    def initial_kernel(self):
        """Θ0 on the probe inputs (numpy, float64), or None before training starts."""
        return getattr(self, "_initial_kernel", None)

    def _kernel(self):
        """Θ on the probe inputs (float64), and {layer: Θ_l} with `per_layer`, else None."""
        result = empirical_ntk(self.model, self.probe_inputs, per_layer=self.per_layer,
                               **self.ntk_kwargs)
        parts = None
        if self.per_layer:
            parts = {name: np.asarray(k, np.float64) for name, k in result.items()}
            kernel = sum(parts.values())
        else:
            kernel = np.asarray(result)
        if np.ndim(kernel) != 2:
            raise ValueError(
                "NTKTracker needs an N×N kernel: trace every output axis "
                f"(`trace_axes`) in ntk_kwargs. Received: a kernel of shape {np.shape(kernel)}"
            )
        self._last_layer_kernels = parts
        return kernel.astype(np.float64)

    def _layer_keys(self):
        return [f"ntk_distance_from_init/{name}" for name in self._layer_names]

    def _global_step(self):
        return int(self.model.optimizer.iterations.numpy()) if self.model.optimizer else 0

    def on_train_begin(self, logs=None):
        initial_path = self.save_dir and os.path.join(self.save_dir, _INITIAL_FILE)
        if getattr(self, "_initial_model", None) is self.model:
            pass  # a further `fit` of the same model with this tracker keeps Θ0 and θ0
        elif initial_path and tf.io.gfile.exists(initial_path):
            saved = _read_npz(initial_path, _INITIAL_KEYS)  # a resumed run keeps its Θ0, θ0
            self._initial_kernel, self._initial_weights = saved["kernel"], saved["weights"]
            if self.per_layer:
                if "layer_kernels" not in saved:
                    raise ValueError(
                        "Expected the saved initial snapshot to hold per-layer kernels to "
                        "resume a per_layer=True tracker (it was written without them). "
                        f"Received: save_dir={self.save_dir!r}"
                    )
                self._initial_layer_kernels = dict(
                    zip((str(n) for n in saved["layer_names"]), saved["layer_kernels"]))
        else:
            self._initial_kernel = self._kernel()
            self._initial_layer_kernels = self._last_layer_kernels
            self._initial_weights = effective_weights(self.model)
            if self.save_dir:
                tf.io.gfile.makedirs(self.save_dir)
                layers = {}
                if self.per_layer:
                    layers = {
                        "layer_names": np.asarray(list(self._initial_layer_kernels)),
                        "layer_kernels": np.stack(list(self._initial_layer_kernels.values())),
                    }
                _write_npz_atomically(
                    initial_path,
                    kernel=self._initial_kernel,
                    eigenvalues=metrics.spectrum(self._initial_kernel),
                    weights=self._initial_weights,
                    **layers,
                )
        self._layer_names = list(self._initial_layer_kernels) if self.per_layer else []
        self._initial_model = self.model
        # The snapshot velocities are measured from; epoch -1 is "before epoch 0".
        self._previous = {"kernel": self._initial_kernel, "epoch": -1, "step": self._global_step()}
        if self.history:
            self._previous = self.history[-1]
        elif initial_path and tf.io.gfile.exists(initial_path):
            saved_steps = sorted(
                name for name in tf.io.gfile.listdir(self.save_dir) if _SNAPSHOT_FILE.match(name)
            )
            if saved_steps:  # resuming: continue from the last saved snapshot
                last = _read_npz(os.path.join(self.save_dir, saved_steps[-1]), _SNAPSHOT_KEYS)
                self._previous = {key: last[key].item() for key in ("epoch", "step")}
                self._previous["kernel"] = last["kernel"]
        if self.tensorboard_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)

    def _snapshot(self, epoch, step, per_step=False):
        try:
            kernel = self._kernel()
            _validation.check_finite(kernel, "kernel")
        except _validation.NonFiniteError as error:
            # A diverged model (non-finite weights or outputs): nothing to measure,
            # and nothing to save; the user's fit goes on (its loss shows it).
            self._metric("ntk", _raise, error)
            return dict.fromkeys((*_LOG_KEYS, *self._layer_keys()), math.nan)
        weights = effective_weights(self.model)
        difference = weights - self._initial_weights
        initial_norm = np.sqrt(np.sum(np.square(self._initial_weights)))
        previous_kernel = self._previous["kernel"]
        time_unit = "step" if per_step else "epoch"
        elapsed = max((step if per_step else epoch) - self._previous[time_unit], 1)
        eigenvalues = metrics.spectrum(kernel)
        metric = self._metric
        values = {
            "ntk_distance_from_init": metric(
                "ntk_distance_from_init", metrics.kernel_distance, self._initial_kernel, kernel),
            "ntk_velocity": metric(
                "ntk_velocity", metrics.kernel_velocity, previous_kernel, kernel, dt=elapsed),
            "ntk_relative_velocity": metric(
                "ntk_relative_velocity", metrics.relative_kernel_velocity, previous_kernel,
                kernel, dt=elapsed),
            "ntk_alignment": (
                math.nan
                if self.probe_labels is None
                else metric("ntk_alignment", metrics.kernel_alignment, kernel,
                            self.probe_labels, centered=True)
            ),
            "ntk_trace": float(np.trace(kernel)),
            "ntk_condition": (
                float(eigenvalues[0] / eigenvalues[-1]) if eigenvalues[-1] > 0 else math.inf
            ),
            "weight_distance_from_init": (
                float(np.sqrt(np.sum(np.square(difference))) / initial_norm) if initial_norm > 0 else math.nan
            ),
            "weight_distance_sq": float(np.sum(difference**2)),
        }
        if self.per_layer:
            parts = self._last_layer_kernels
            for name, key in zip(self._layer_names, self._layer_keys()):
                values[key] = metric(
                    key, metrics.kernel_distance, self._initial_layer_kernels[name], parts[name])
        record = {"epoch": epoch, "step": step, **values}
        self.history.append({**record, "kernel": kernel})
        self._previous = self.history[-1]
        if self.save_dir:
            tf.io.gfile.makedirs(self.save_dir)
            _write_npz_atomically(
                os.path.join(self.save_dir, f"step_{step:09d}.npz"),
                kernel=kernel,
                eigenvalues=eigenvalues,
                **{key: np.asarray(value) for key, value in record.items()},
            )
        if self._writer is not None:
            self._write_summaries(step, values, kernel, eigenvalues)
        return values

    def _metric(self, key, function, *args, **kwargs):
        """`function(*args, **kwargs)`, or NaN (with one warning per key) where it is undefined.

        A metric can be undefined on a legitimate kernel: when every ReLU of a
        network has died its eNTK is constant, the centred alignment is 0/0; a
        zero layer kernel has no distance. The user's `fit` goes on.
        """
        try:
            return function(*args, **kwargs)
        except ValueError as error:
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"NTKTracker logs NaN for `{key}`, undefined on this snapshot: {error} "
                    "(warned once per key).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return math.nan

    def _write_summaries(self, step, values, kernel, eigenvalues):
        with self._writer.as_default(step=step):
            for key, value in values.items():
                tf.summary.scalar(key, value)
            tf.summary.histogram("ntk_eigenvalues", eigenvalues)
            span = kernel.max() - kernel.min()
            image = (kernel - kernel.min()) / (span if span > 0 else 1.0)
            tf.summary.image("ntk_kernel", image[None, :, :, None].astype(np.float32))
        self._writer.flush()

    # ----------------------------------------------------------------- hooks

    def _step_scheduled(self, step):
        if self.every_n_steps is None:
            return False
        if isinstance(self.every_n_steps, int):
            return step % self.every_n_steps == 0
        return step in self.every_n_steps

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps is None:
            return
        step = self._global_step()
        if self._step_scheduled(step):
            self._snapshot(self._current_epoch, step, per_step=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        tracked = self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0
        if tracked:
            step = self._global_step()
            if self.history and self.history[-1]["step"] == step:
                values = {key: self.history[-1][key]
                          for key in (*_LOG_KEYS, *self._layer_keys())}
            else:
                values = self._snapshot(epoch, step)
        else:
            values = dict.fromkeys((*_LOG_KEYS, *self._layer_keys()), math.nan)
        logs.update({key: float(value) for key, value in values.items()})

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
