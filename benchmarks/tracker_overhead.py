"""Overhead of NTKTracker: fit time with the tracker / fit time without.

MLP (64-512-512-1) and LeNet-8x8 on all 1797 digits (binary 0-4 vs 5-9, MSE on ±1 labels),
batch 128, probe of 256 images, a snapshot every epoch. Both fits run in the same process,
alternating, after a warm-up epoch that compiles everything. Run:
`python benchmarks/tracker_overhead.py [--epochs 5]`.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_ntk  # noqa: E402

# experiments/ is not installed (the wheel is the library only): run from the checkout.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import models  # noqa: E402


def fit_seconds(model, x, y, epochs, callbacks):
    start = time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    targets = (2.0 * (labels >= 5) - 1.0).astype("float32")[:, None]
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(f"device: {'GPU' if 'GPU' in devices else 'CPU'} ({os.cpu_count()} CPU cores)")
    print(f"{'model':10s} {'plain s/epoch':>14s} {'tracked s/epoch':>16s} {'ratio':>6s}")
    cases = {
        "mlp": lambda: models.mlp((8, 8, 1), 1, widths=(512, 512)),
        "lenet": lambda: models.lenet((8, 8, 1), 1),
    }
    for name, build in cases.items():
        model = build()
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
        tracker = keras_ntk.NTKTracker(images[:256], targets[:256, 0])
        fit_seconds(model, images, targets, 1, [tracker])  # compile fit and the kernel
        plain, tracked = [], []
        for _ in range(args.rounds):
            plain.append(fit_seconds(model, images, targets, args.epochs, []))
            tracked.append(fit_seconds(model, images, targets, args.epochs, [tracker]))
        plain_epoch = min(plain) / args.epochs
        tracked_epoch = min(tracked) / args.epochs
        print(f"{name:10s} {plain_epoch:14.3f} {tracked_epoch:16.3f} "
              f"{tracked_epoch / plain_epoch:6.2f}", flush=True)


if __name__ == "__main__":
    main()
