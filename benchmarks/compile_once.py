"""First call at a new N against a repeated call, off the default path (issue 18 §3).

`ntk_vector_product` (auto and "ntvp"), `empirical_ntk(per_layer=True)` and
`empirical_ntk(training=True)` (and the default path: case "default"), for an MLP and
a LeNet-like CNN on the digits: each case is first seen at N=256 (called twice), then
called at each N of `--sizes` (first, then repeated), once with x2 of another size, and
then a new model of the same architecture (other weights) is called at N=256.
Prints one JSON line per call pair: seconds of the first and the repeated call, their
ratio, the traces of compiled functions the first call added, and the 1-minute load
average.

`--strategy mirrored` runs every call (and builds the models) in the scope of a
`tf.distribute.MirroredStrategy` over two logical CPU devices (configured before
TensorFlow initializes); `one_device` in a `OneDeviceStrategy` on the CPU;
`multi_worker` launches this script as two worker processes on 127.0.0.1 (TF_CONFIG,
RING collectives, one CPU device each) in a `MultiWorkerMirroredStrategy` and prints the
first worker's lines (both hold every result; traces are the first worker's; the repeated
time is the faster of two calls: a call's lone block goes to the next worker each time).

Run: `python benchmarks/compile_once.py [--models mlp,lenet] [--cases ...]
[--sizes 100,257,300,1000] [--strategy none|mirrored|one_device|multi_worker]`.
"""

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras_ntk  # noqa: E402
from benchmarks.new_rungs import lenet, timed  # noqa: E402
from keras_ntk import _block_factors  # noqa: E402


traces = _block_factors.trace_count


def mlp():
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])


CASES = {
    "vp_auto": lambda m, x1, x2: keras_ntk.ntk_vector_product(
        m, x1, x2, np.ones(len(x1 if x2 is None else x2))),
    "vp_ntvp": lambda m, x1, x2: keras_ntk.ntk_vector_product(
        m, x1, x2, np.ones(len(x1 if x2 is None else x2)), implementation="ntvp"),
    "vp_ntvp_3cols": lambda m, x1, x2: keras_ntk.ntk_vector_product(
        m, x1, x2, np.ones((len(x1 if x2 is None else x2), 3)), implementation="ntvp"),
    "per_layer": lambda m, x1, x2: keras_ntk.empirical_ntk(m, x1, x2, per_layer=True),
    "per_layer_ntvp": lambda m, x1, x2: keras_ntk.empirical_ntk(
        m, x1, x2, per_layer=True, implementation="ntvp"),
    "training": lambda m, x1, x2: keras_ntk.empirical_ntk(m, x1, x2, training=True),
    "default": lambda m, x1, x2: keras_ntk.empirical_ntk(m, x1, x2),
}


def launch_workers(count=2):
    """This script as `count` workers of one cluster on 127.0.0.1; the first worker's
    output and errors. Exits with the first non-zero return code."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    processes = [subprocess.Popen(
        [sys.executable, *sys.argv],
        env=dict(os.environ, TF_CONFIG=json.dumps({
            "cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})),
        stdout=subprocess.DEVNULL if index else None,
        stderr=subprocess.DEVNULL if index else None)  # the first worker's errors show
        for index in range(count)]
    codes = [p.wait() for p in processes]
    if any(codes):
        sys.exit(next(c for c in codes if c))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--cases", default="vp_auto,vp_ntvp,vp_ntvp_3cols,per_layer,training")
    parser.add_argument("--sizes", default="100,257,300,1000")
    parser.add_argument("--strategy", default="none",
                        choices=["none", "mirrored", "one_device", "multi_worker"])
    args = parser.parse_args()
    if args.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
        return launch_workers()
    scope = contextlib.nullcontext
    repeats = 2 if args.strategy == "multi_worker" else 1
    if args.strategy != "none":
        import tensorflow as tf
        tf.get_logger().setLevel("ERROR")  # "Using ... eagerly has significant overhead"
        if args.strategy == "multi_worker":
            options = tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation.RING)
            strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        elif args.strategy == "mirrored":  # before TensorFlow initializes its runtime
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        else:
            strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        scope = strategy.scope
    x = load_digits().data.astype("float32").reshape(-1, 8, 8, 1) / 16.0
    for model_name in args.models.split(","):
        for case in args.cases.split(","):
            keras.utils.set_random_seed(0)
            with scope():
                model = {"mlp": mlp, "lenet": lenet}[model_name]()
            case_call = CASES[case]

            def repeat_time(fn):
                # Several workers: a call's lone block goes to the next worker each call
                # (`_distribute` rotates them), which compiles a fused function it has
                # not run; the second repeat is the steady state. Traces: worker 0's.
                return min(timed(fn)[0] for _ in range(repeats))

            def call(model, x1, x2):
                with scope():
                    return case_call(model, x1, x2)

            seen, _ = timed(lambda: call(model, x[:256], None))  # compiles
            repeated = repeat_time(lambda: call(model, x[:256], None))
            print(json.dumps(dict(model=model_name, case=case, n="256, model new",
                                  first=round(seen, 3), repeated=round(repeated, 3),
                                  traces=traces(model), strategy=args.strategy,
                                  load=os.getloadavg()[0])), flush=True)

            def pair(label, x1, x2=None):
                before = traces(model)
                first, _ = timed(lambda: call(model, x1, x2))
                added = traces(model) - before
                repeated = repeat_time(lambda: call(model, x1, x2))
                print(json.dumps(dict(model=model_name, case=case, n=label, first=round(first, 3),
                                      repeated=round(repeated, 3),
                                      ratio=round(first / repeated, 2), traces=added,
                                      strategy=args.strategy,
                                      load=os.getloadavg()[0])), flush=True)

            for n in [int(s) for s in args.sizes.split(",")]:
                pair(n, x[:n])
            pair("300x77", x[300:600], x[600:677])

            # A new model of the same architecture (other weights), first seen at N=256:
            # compiles nothing when the functions are shared by architecture.
            keras.utils.set_random_seed(1)
            with scope():
                other = {"mlp": mlp, "lenet": lenet}[model_name]()
            before = traces(model, other)
            first, _ = timed(lambda: call(other, x[:256], None))
            added = traces(model, other) - before
            repeated = repeat_time(lambda: call(other, x[:256], None))
            print(json.dumps(dict(model=model_name, case=case, n="256, another model",
                                  first=round(first, 3), repeated=round(repeated, 3),
                                  ratio=round(first / repeated, 2), traces=added,
                                  strategy=args.strategy, load=os.getloadavg()[0])),
                  flush=True)


if __name__ == "__main__":
    main()
