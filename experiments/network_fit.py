"""Training a network to a stated criterion with a step cap (study B's networks).

`train_network` runs SGD (constant rate, momentum) on the MSE of one-hot
targets or the softmax cross-entropy, in chunks of steps, and stops after the
first chunk that meets the criterion: zero training error on the whole
training set, or a chunk's mean training loss below a threshold. Runs that
stop at the cap instead say so (`hit_cap`), so results can count and mark
them.
"""

import os

import numpy as np

from experiments import kernel_methods


def predict(model, x, batch_size=1024):
    """The model's outputs on `x` in inference mode, in batches, as float64."""
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)]).astype(np.float64)


STOP_CRITERIA = ("train_error", "train_loss")


def _stop_at_criterion(model, x, labels, criterion, threshold, state):
    """A callback that stops fit at the end of the first chunk meeting the criterion.

    "train_error": no training example misclassified (arg-max over the
    logits, on the whole training set in inference mode); "train_loss": the
    chunk's mean training loss below `threshold`. `state["reached"]` records
    whether it was met; `state["train_error"]` the last measured error.
    """
    import keras

    def check(epoch, logs):
        if criterion == "train_error":
            state["train_error"] = kernel_methods.error_rate(predict(model, x), labels)
            reached = state["train_error"] == 0.0
        else:
            reached = bool(logs) and logs.get("loss", np.inf) < threshold
        if reached:
            state["reached"] = True
            model.stop_training = True

    return keras.callbacks.LambdaCallback(on_epoch_end=check)


def train_network(model, x, labels, num_classes, *, loss, train_steps, batch_size,
                  learning_rate, momentum, convergence_loss, seed, jit_compile, strategy,
                  stop_criterion="train_loss", tensorboard_dir=None, chunk_steps=50,
                  crash_after_epochs=None):
    """Trains `model` to a stated criterion: SGD (constant rate, momentum), MSE or cross-entropy.

    Runs at most `train_steps` steps (the cap) in chunks of `chunk_steps` (a
    Keras "epoch" here) and stops after the first chunk that meets
    `stop_criterion`: "train_error" (zero training error) or "train_loss"
    (mean training loss of the chunk below `convergence_loss`).

    Returns:
        dict(steps, train_loss, train_error, reached, hit_cap): `hit_cap` is
        True when the cap stopped training before the criterion was met.
    """
    import keras

    from experiments import data as data_lib
    from experiments import train as train_lib

    if stop_criterion not in STOP_CRITERIA:
        raise ValueError(
            f"Expected stop_criterion in {STOP_CRITERIA}. "
            f"Received: stop_criterion={stop_criterion!r}"
        )
    keras.utils.set_random_seed(seed)
    batch_size = min(batch_size, len(x))
    if loss == "mse":
        targets = np.eye(num_classes, dtype=np.float32)[labels]
        loss_object = keras.losses.MeanSquaredError()
    else:
        targets = np.asarray(labels, np.int32)
        loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with strategy.scope():
        model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                      loss=loss_object, jit_compile=jit_compile)
    # Epoch e of the examples in the order data.epoch_order(len(x), seed, e), forever.
    dataset = data_lib.training_dataset(x, targets, batch_size=batch_size, seed=seed)
    state = {"reached": False, "train_error": None}
    callbacks = [_stop_at_criterion(model, x, labels, stop_criterion, convergence_loss, state)]
    if crash_after_epochs is not None:  # Tests of resuming: killed after this many chunks.
        callbacks.append(train_lib.CrashAfterEpochs(crash_after_epochs))
    if tensorboard_dir:
        callbacks.append(keras.callbacks.TensorBoard(tensorboard_dir, write_graph=False,
                                                     profile_batch=0))
    chunk = min(chunk_steps, train_steps)
    history = model.fit(dataset, epochs=max(1, train_steps // chunk), steps_per_epoch=chunk,
                        callbacks=callbacks, verbose=0)
    losses = history.history["loss"]
    if state["train_error"] is None:
        state["train_error"] = kernel_methods.error_rate(predict(model, x), labels)
    return {"steps": len(losses) * chunk, "train_loss": float(losses[-1]),
            "train_error": float(state["train_error"]), "reached": bool(state["reached"]),
            "hit_cap": not state["reached"], "stop_criterion": stop_criterion}


def example_scores(logits, labels, num_classes, loss):
    """(correct, example_loss) per example: arg-max right, and the MSE of one-hot targets
    (`loss="mse"`) or the softmax cross-entropy."""
    correct = np.argmax(logits, -1) == labels
    if loss == "mse":
        return correct, kernel_methods.per_example_losses(logits, np.eye(num_classes)[labels])
    return correct, kernel_methods.per_example_cross_entropy(logits, labels)


def fit_table(fits):
    """Fits of `train_network` per (size, seed) as results.json tables, and the cap hits.

    `fits`: rows of fit dicts ({}: not run). Returns train_steps, train_loss,
    train_error and hit_cap as rows (None: not run), cap_hits and runs.
    """
    def table(key):
        return [[fit.get(key) for fit in row] for row in fits]

    hit_cap = table("hit_cap")
    return dict(train_steps=table("steps"), train_loss=table("train_loss"),
                train_error=table("train_error"), hit_cap=hit_cap,
                cap_hits=int(sum(bool(v) for row in hit_cap for v in row)),
                runs=int(sum(v is not None for row in hit_cap for v in row)))


def trained_once(build, initial_weights, x, labels, num_classes, directory, **train_kwargs):
    """A network trained once by `train_network` and stored in `directory`, and its fit.

    Read back (`after.weights.h5`, `pretraining.json`) when both are there and
    readable; otherwise `build(initial_weights())` is trained on (x, labels)
    and both files are written atomically (study B's after-kernel pre-training).
    """
    from absl import logging

    from experiments import cells

    after_path = os.path.join(directory, "after.weights.h5")
    fit_path = os.path.join(directory, "pretraining.json")
    network = build()
    if os.path.exists(fit_path) and cells.load_weights_or_discard(network, after_path):
        return network, cells.load_json(fit_path)
    network = build(initial_weights())
    fit = train_network(network, x, labels, num_classes, **train_kwargs)
    cells.save_weights_atomic(network, after_path)
    cells.write_json_atomic(fit_path, fit)
    logging.info("%s: trained on %d examples: %s", os.path.basename(directory), len(labels), fit)
    return network, fit

