"""The training recipe shared by the studies, and the distribution strategy.

The recipe of Ortiz-Jiménez et al. (2021): SGD with momentum 0.9, learning
rate 0.05 decaying linearly to 0 over the whole run, batch 128, sigmoid
cross-entropy on a single logit. Every piece is an argument so gin can
change it from the study's `run`.
"""

import importlib.util
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from experiments import data as data_lib

STRATEGIES = ("auto", "cpu", "one_device", "mirrored", "tpu", "multi_worker")


def make_strategy(name="auto", tpu=None):
    """The `tf.distribute.Strategy` named by the `--strategy` flag.

    * `auto`: TPU when `tpu` is given, MirroredStrategy over all GPUs when
      there are several, OneDeviceStrategy on the GPU when there is one, the
      default strategy (no distribution) otherwise.
    * `cpu`: OneDeviceStrategy on the first CPU.
    * `one_device`: OneDeviceStrategy on the first GPU (or CPU when none).
    * `mirrored`: MirroredStrategy over all GPUs, or over all logical CPUs
      when there is no GPU (tests configure two).
    * `tpu`: TPUStrategy on `tpu` (an address, or "" / "local").
    * `multi_worker`: refused (ValueError): Keras 3's `model.fit` fails under
      MultiWorkerMirroredStrategy (keras-team/keras#20585); studies run on a
      cluster as shards (`--shard`, docs/scaling.md). The kernel functions of
      `keras_ntk` do split their blocks across the workers of a
      MultiWorkerMirroredStrategy created by the caller.

    Returns:
        A `tf.distribute.Strategy`.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy. Known strategies: {', '.join(STRATEGIES)}. "
            f"Received: strategy={name!r}"
        )
    if name == "multi_worker":
        raise ValueError(
            "Training under MultiWorkerMirroredStrategy is not supported: Keras 3's model.fit "
            "fails under it (keras-team/keras#20585). Run the study as shards (--shard=i/n) "
            "with one job per machine. Received: strategy='multi_worker'")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        if tpu is not None:
            name = "tpu"
        elif len(gpus) > 1:
            name = "mirrored"
        elif gpus:
            name = "one_device"
        else:
            return tf.distribute.get_strategy()
    if name == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu="" if tpu in (None, "local") else tpu
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def build_model(strategy, builder, *args, weights_path=None, compile_with=None, **kwargs):
    """`builder(*args, **kwargs)` made under `strategy.scope()`, so the strategy places it.

    Args:
        strategy: the `tf.distribute.Strategy` (None: the current one).
        builder: a function returning a Keras model, e.g. `models.mlp`.
        weights_path: weights to load into it (a saved θ0, ...), or None.
        compile_with: None, or a function of the model that compiles it,
            called inside the scope (an optimizer made there is placed too).

    Returns:
        The model.
    """
    with (strategy or tf.distribute.get_strategy()).scope():
        model = builder(*args, **kwargs)
        if weights_path is not None:
            model.load_weights(weights_path)
        if compile_with is not None:
            compile_with(model)
    return model


def linear_decay_sgd(total_steps, learning_rate=0.05, momentum=0.9):
    """SGD with momentum, the rate decaying linearly from `learning_rate` to 0.

    η_t = learning_rate · (1 − t / total_steps) for step t (0 after the end).
    """
    schedule = keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=learning_rate,
        decay_steps=max(int(total_steps), 1),
        end_learning_rate=0.0,
        power=1.0,
    )
    return keras.optimizers.SGD(learning_rate=schedule, momentum=momentum)


class CrashAfterEpochs(keras.callbacks.Callback):
    """Kills the process after it ran `epochs` epochs of a fit (tests of resuming only).

    `os._exit(3)`: no cleanup, no flush, as a preempted machine.
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = int(epochs)
        self.seen = 0

    def on_epoch_end(self, epoch, logs=None):
        self.seen += 1
        if self.seen >= self.epochs:
            os._exit(3)


class EpochBackup(keras.callbacks.Callback):
    """Saves the model and optimizer after every epoch, atomically, for an exact resume.

    Keras' `BackupAndRestore` writes its epoch counter non-atomically and
    restores weights but not a data pipeline's position. Here every epoch
    writes `epoch<e>.weights.h5` (model and optimizer variables, via
    `save_weights`) and then `epoch.json` = {"epoch": e, "weights": name},
    each through a temporary file and a rename; `epoch.json` is the commit.
    `restore` loads the committed epoch (a truncated or corrupt backup is
    discarded with a log line, and the fit starts from its beginning), and
    the caller rebuilds the data for the epochs that remain
    (`data.training_dataset(first_epoch=...)`).
    """

    def __init__(self, backup_dir):
        super().__init__()
        self.backup_dir = backup_dir

    @property
    def _commit_path(self):
        return os.path.join(self.backup_dir, "epoch.json")

    def restore(self, model):
        """Loads the last committed epoch into `model`; returns the number of finished epochs."""
        from experiments import cells

        committed = cells.load_or_discard(self._commit_path, cells.load_json)
        if committed is None:
            self.discard()
            return 0
        model.optimizer.build(model.trainable_variables)
        initial = [v.numpy() for v in model.variables + model.optimizer.variables]
        weights_path = os.path.join(self.backup_dir, committed["weights"])
        if cells.load_weights_or_discard(model, weights_path):
            logging.info("Resuming the fit from its backup in %s after epoch %d",
                         self.backup_dir, committed["epoch"])
            return int(committed["epoch"])
        # A load that failed halfway may have assigned some variables.
        for variable, value in zip(model.variables + model.optimizer.variables, initial):
            variable.assign(value)
        self.discard()
        return 0

    def on_epoch_end(self, epoch, logs=None):
        from experiments import cells

        name = f"epoch{epoch + 1}.weights.h5"
        cells.save_weights_atomic(self.model, os.path.join(self.backup_dir, name))
        previous = cells.load_or_discard(self._commit_path, cells.load_json)
        cells.write_json_atomic(self._commit_path, {"epoch": epoch + 1, "weights": name})
        if previous is not None and previous["weights"] != name:
            stale = os.path.join(self.backup_dir, previous["weights"])
            if tf.io.gfile.exists(stale):
                tf.io.gfile.remove(stale)

    def discard(self):
        """Deletes the backup (after the fit completes, or when it is unreadable)."""
        if tf.io.gfile.exists(self.backup_dir):
            tf.io.gfile.rmtree(self.backup_dir)


def _training_log(log_dir):
    """TensorBoard logs in `log_dir`, or a CSV history there without TensorBoard."""
    if importlib.util.find_spec("tensorboard") is not None:
        return keras.callbacks.TensorBoard(
            log_dir, write_graph=False, update_freq="epoch", profile_batch=0
        )
    logging.warning("tensorboard is not installed: writing %s/history.csv instead.", log_dir)
    tf.io.gfile.makedirs(log_dir)
    return keras.callbacks.CSVLogger(os.path.join(log_dir, "history.csv"), append=True)


def fit(model, x, y, *, epochs, batch_size=128, learning_rate=0.05,
        momentum=0.9, seed=0, backup_dir=None, tensorboard_dir=None,
        jit_compile="auto", verbose="auto", strategy=None, crash_after_epochs=None,
        drop_remainder=False):
    """Trains a single-logit `model` on (x, y) with the paper's recipe.

    Sigmoid cross-entropy on the logit, SGD momentum, linear decay to 0 over
    `epochs · ceil(N / batch_size)` steps (`floor` with `drop_remainder`).
    Epoch e sees the examples in the order `data.epoch_order(N, seed, e)`.
    With `backup_dir` the model and optimizer are saved after every epoch
    (`EpochBackup`), so a killed fit resumes after its last finished epoch
    and ends with exactly the weights of a fit that never stopped; the
    backup is deleted when the fit completes.

    Args:
        model: an unbuilt or built Keras model with one logit output; it must
            have been created under `strategy.scope()` when a strategy is
            used.
        x, y: training arrays, y in {0, 1}.
        epochs, batch_size, learning_rate, momentum: the recipe.
        seed: seed of the data order (and of `keras.utils.set_random_seed`).
        backup_dir: directory for the per-epoch backup, or None.
        tensorboard_dir: TensorBoard log directory, or None.
        jit_compile: passed to `model.compile`.
        verbose: passed to `model.fit`.
        strategy: the `tf.distribute.Strategy` the model lives in.
        crash_after_epochs: kill the process (`os._exit(3)`, no cleanup)
            after this many epochs; tests of resuming (the binaries' hidden
            `--simulate_crash_after_epochs`).
        drop_remainder: drop each epoch's last incomplete batch (as the
            reference code of Ortiz-Jiménez et al. does).

    Returns:
        The `keras.callbacks.History` of the fit (of the epochs run now).
    """
    strategy = strategy or tf.distribute.get_strategy()
    steps = data_lib.steps_per_epoch(len(x), batch_size, drop_remainder)
    if steps < 1:
        raise ValueError(f"Expected batch_size <= {len(x)} training examples with "
                         f"drop_remainder. Received: batch_size={batch_size}")
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model.compile(
            optimizer=linear_decay_sgd(epochs * steps, learning_rate, momentum),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
            jit_compile=jit_compile,
        )
        if not model.built:
            model.build((None, *np.shape(x)[1:]))
    callbacks, first_epoch = [], 0
    backup = None
    if backup_dir is not None:
        backup = EpochBackup(backup_dir)
        with strategy.scope():
            first_epoch = backup.restore(model)
        callbacks.append(backup)
    if tensorboard_dir is not None:
        callbacks.append(_training_log(tensorboard_dir))
    if crash_after_epochs is not None:
        callbacks.append(CrashAfterEpochs(crash_after_epochs))
    dataset = data_lib.training_dataset(
        x, np.asarray(y, np.float32)[:, None], batch_size=batch_size, seed=seed,
        first_epoch=first_epoch, num_epochs=epochs - first_epoch,
        drop_remainder=drop_remainder,
    )
    history = model.fit(dataset, epochs=epochs, initial_epoch=first_epoch,
                        steps_per_epoch=steps, callbacks=callbacks, verbose=verbose,
                        shuffle=False)  # The dataset holds the order.
    if backup is not None:
        backup.discard()
    return history


def binary_accuracy(model, x, y, batch_size=1024):
    """Fraction of examples whose logit sign matches y ∈ {0, 1} (inference mode).

    Calls the model eagerly batch by batch (no `predict` function to trace
    for each of the many short-lived models of a study).
    """
    logits = np.concatenate([
        np.asarray(model(x[start:start + batch_size], training=False)).reshape(-1)
        for start in range(0, len(x), batch_size)
    ])
    return float(np.mean((logits > 0) == (np.asarray(y).reshape(-1) > 0.5)))
