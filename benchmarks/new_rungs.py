"""First call at a new N against a repeated call (issue 18 §3, "compile once per model").

LeNet-8×8 on the digits (as benchmarks/ntk_speed.py), `implementation="auto"`, in one
process: a sequence of N (the model new at the first), each called twice (first, then
repeated), through the block-factor path (`_block_factors`: factors of blocks of B, one
pair function). Then the repeated time of the fused one-block path (the factor path
switched off: `_block_factors.MIN_SIZE` above every N) against the factor path at the
same N, interleaved (`--rounds` each). Prints one JSON line per measurement.

Run: `python benchmarks/new_rungs.py [--sizes 256,1797,1100,600,100] [--rounds 3]`.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras_ntk  # noqa: E402
from keras_ntk import _batching, _block_factors  # noqa: E402


def lenet():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(120, activation="relu"),
        keras.layers.Dense(84, activation="relu"),
        keras.layers.Dense(1),
    ])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


traces = _block_factors.trace_count  # no model: every function so far


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,1797,1100,600,100,1500,900,333")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", default="256,1797",
                        help="N of the interleaved repeated-call comparison with the fused path")
    args = parser.parse_args()
    x = load_digits().data.astype("float32").reshape(-1, 8, 8, 1) / 16.0
    keras.utils.set_random_seed(0)
    model = lenet()
    default_min = _block_factors.MIN_SIZE

    def emit(**row):
        row["load"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)

    def first_and_repeated(n, x1, x2=None):
        before = traces()
        first, _ = timed(lambda: keras_ntk.empirical_ntk(model, x1, x2))
        new_traces = traces() - before
        repeated, _ = timed(lambda: keras_ntk.empirical_ntk(model, x1, x2))
        emit(path="factors" if _block_factors.MIN_SIZE == default_min else "fused", n=n,
             first=first, repeated=repeated, ratio=first / repeated, traces=new_traces)

    for n in [int(s) for s in args.sizes.split(",")]:
        first_and_repeated(n, x[:n])
    first_and_repeated("700x800", x[:700], x[700:1500])
    # Repeated calls: factor path against the fused one-block path, interleaved.
    for n in [int(s) for s in args.compare.split(",")]:
        _block_factors.MIN_SIZE = 10**9
        first_and_repeated(n, x[:n])  # compiles the fused rung
        reference = keras_ntk.empirical_ntk(model, x[:n], dtype="float64")
        for _ in range(args.rounds):
            for path in ("factors", "fused"):
                _block_factors.MIN_SIZE = default_min if path == "factors" else 10**9
                seconds, k = timed(lambda: keras_ntk.empirical_ntk(model, x[:n]))
                err = float(np.abs(k - reference).max() / np.abs(reference).max())
                emit(path=path, n=n, repeated=seconds, rel_error=err)
        _block_factors.MIN_SIZE = default_min


if __name__ == "__main__":
    main()
