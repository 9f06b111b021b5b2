"""CPU timings behind docs/scaling.md: the eNTK of study A's MLP, in one process and on 2 workers.

    python benchmarks/distribute_scaling.py --n=1024 [--workers=2]

Builds the paper's MLP 3072-100-100-1 (ReLU) on N random CIFAR-shaped inputs
and times `keras_ntk.empirical_ntk(model, x)` (after one warm-up call on 64
inputs) in one process, then, with --workers=W, in W worker processes on
127.0.0.1 under a MultiWorkerMirroredStrategy (RING collectives). Prints the
seconds, the multiply-add count of the Jacobian contraction (N(N+1)/2 pairs ×
P weights, the dominant term) and the achieved GFLOP/s, from which
docs/scaling.md extrapolates (labelled so). On a shared 2-core machine the
worker timing measures overhead, not speed-up: report the load average.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure(n, strategy=None):
    import keras
    import numpy as np

    import keras_ntk

    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).normal(size=(n, 32, 32, 3)).astype("float32")

    def build():
        return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                                 keras.layers.Dense(100, activation="relu"),
                                 keras.layers.Dense(100, activation="relu"),
                                 keras.layers.Dense(1)])

    if strategy is None:
        model = build()
        keras_ntk.empirical_ntk(model, x[:64])
        start = time.perf_counter()
        kernel = keras_ntk.empirical_ntk(model, x)
    else:
        with strategy.scope():
            model = build()
            keras_ntk.empirical_ntk(model, x[:64])
            start = time.perf_counter()
            kernel = keras_ntk.empirical_ntk(model, x)
    seconds = time.perf_counter() - start
    weights = model.count_params()
    flops = 2.0 * n * (n + 1) / 2 * weights
    return {"n": n, "weights": weights, "seconds": seconds, "flops": flops,
            "gflops_per_s": flops / seconds / 1e9, "trace": float(np.trace(kernel))}


def _worker(n, out):
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    result = _measure(n, strategy)
    with open(out, "w") as f:
        json.dump(result, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        _worker(args.n, args.worker_out)
        return
    print("load average:", os.getloadavg())
    single = _measure(args.n)
    print("one process:", json.dumps(single))
    if args.workers > 1:
        ports = []
        for _ in range(args.workers):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        addresses = [f"127.0.0.1:{p}" for p in ports]
        processes, outs = [], []
        for index in range(args.workers):
            out = f"/tmp/distribute_scaling_{os.getpid()}_{index}.json"
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                       PYTHONPATH=_ROOT, TF_CONFIG=json.dumps({
                           "cluster": {"worker": addresses},
                           "task": {"type": "worker", "index": index}}))
            processes.append(subprocess.Popen(
                [sys.executable, __file__, f"--n={args.n}", f"--worker_out={out}"],
                cwd=_ROOT, env=env))
            outs.append(out)
        for p in processes:
            p.wait()
        for out in outs:
            with open(out) as f:
                print(f"worker ({args.workers}):", f.read())
            os.remove(out)
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    main()
