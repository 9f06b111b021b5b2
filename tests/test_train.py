"""Tests of experiments/train.py: the recipe's fit and its exact resume."""

import json
import os

import keras
import numpy as np
import pytest

from experiments import cells, train


class _Interrupt(Exception):
    pass


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise _Interrupt


def _problem():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    return x, y


def _model(init_weights=None):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    if init_weights is not None:
        model.set_weights(init_weights)
    return model


def _reference_sgd(weights, x, y, epochs, batch_size, learning_rate, momentum, seed):
    """Plain numpy SGD with momentum (Keras' rule), linear decay, the same data order."""
    from experiments import data

    w1, b1, w2, b2 = [np.asarray(w, np.float64) for w in weights]
    velocity = [np.zeros_like(w) for w in (w1, b1, w2, b2)]
    steps = data.steps_per_epoch(len(x), batch_size)
    step = 0
    for epoch in range(epochs):
        order = data.epoch_order(len(x), seed, epoch).numpy()
        for start in range(0, len(x), batch_size):
            rows = order[start:start + batch_size]
            xb, yb = x[rows].astype(np.float64), y[rows]
            pre = xb @ w1 + b1
            h = np.maximum(pre, 0)
            logit = (h @ w2 + b2)[:, 0]
            g_logit = (1 / (1 + np.exp(-logit)) - yb)[:, None] / len(rows)
            grads = [None] * 4
            grads[2], grads[3] = h.T @ g_logit, g_logit.sum(0)
            g_h = (g_logit @ w2.T) * (pre > 0)
            grads[0], grads[1] = xb.T @ g_h, g_h.sum(0)
            rate = learning_rate * max(0.0, 1 - step / (epochs * steps))
            params = [w1, b1, w2, b2]
            for i in range(4):
                velocity[i] = momentum * velocity[i] - rate * grads[i]
                params[i] = params[i] + velocity[i]
            w1, b1, w2, b2 = params
            step += 1
    return [w1, b1, w2, b2]


def test_fit_follows_the_recipe_and_the_epoch_order():
    x, y = _problem()
    model = _model()
    init = [w.numpy() for w in model.weights]
    recipe = dict(epochs=3, batch_size=16, learning_rate=0.1, momentum=0.9, seed=5)
    train.fit(model, x, y, jit_compile=False, verbose=0, **recipe)
    expected = _reference_sgd(init, x, y, **recipe)
    for got, want in zip(model.weights, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=2e-5)


def _interrupted(backup, epochs, stop_after):
    """θ0, the recipe, an uninterrupted fit, and a fit stopped after `stop_after` epochs."""
    x, y = _problem()
    init = [w.numpy() for w in _model().weights]
    recipe = dict(epochs=epochs, batch_size=16, learning_rate=0.1, momentum=0.9, seed=1,
                  jit_compile=False, verbose=0)
    uninterrupted = _model(init)
    train.fit(uninterrupted, x, y, **recipe)
    with pytest.raises(_Interrupt):
        _fit_with_callback(_model(init), x, y, backup, _StopAfter(stop_after), recipe)
    return x, y, init, recipe, uninterrupted


def test_a_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    backup = str(tmp_path / "backup")
    x, y, init, recipe, uninterrupted = _interrupted(backup, epochs=5, stop_after=3)
    committed = json.loads(open(os.path.join(backup, "epoch.json")).read())
    assert committed == {"epoch": 3, "weights": "epoch3.weights.h5"}
    # Only the committed epoch's weights are kept.
    assert sorted(os.listdir(backup)) == ["epoch.json", "epoch3.weights.h5"]

    resumed = _model(init)  # A new process: θ0 again, then the backup.
    history = train.fit(resumed, x, y, backup_dir=backup, **recipe)
    assert len(history.history["loss"]) == 2  # Epochs 4 and 5 only.
    for got, want in zip(resumed.weights, uninterrupted.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert not os.path.exists(backup)  # Deleted when the fit completes.


def _fit_with_callback(model, x, y, backup_dir, callback, recipe):
    """train.fit with one more callback after the backup (an interruption)."""
    original = keras.Model.fit

    def fit(self, *args, callbacks=(), **kwargs):
        return original(self, *args, callbacks=list(callbacks) + [callback], **kwargs)

    keras.Model.fit = fit
    try:
        return train.fit(model, x, y, backup_dir=backup_dir, **recipe)
    finally:
        keras.Model.fit = original


def test_a_corrupt_backup_restarts_the_fit_from_its_beginning(tmp_path, caplog):
    import logging as std_logging

    caplog.set_level(std_logging.WARNING, logger="absl")
    backup = str(tmp_path / "backup")
    x, y, init, recipe, uninterrupted = _interrupted(backup, epochs=3, stop_after=2)
    weights = os.path.join(backup, "epoch2.weights.h5")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 3])
    resumed = _model(init)
    history = train.fit(resumed, x, y, backup_dir=backup, **recipe)
    assert len(history.history["loss"]) == 3  # From the beginning.
    assert any(weights in r.getMessage() for r in caplog.records)
    for got, want in zip(resumed.weights, uninterrupted.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert not cells.remove_temporary_files(str(tmp_path))
