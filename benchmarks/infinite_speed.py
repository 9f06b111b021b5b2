"""Time and peak memory of keras_ntk.infinite_kernels on sklearn digits (8×8).

Cases (N = 1797 images by default, kernels N × N, float64):
  * fcn10:       depth-10 ReLU FCN on the 64 flattened pixels;
  * cnn2_gap:    two 3×3 'same' conv + ReLU layers, global average pooling, dense
                 (the expensive case: 64×64 position pairs per pair of images);
  * cnn2_flatten: the same convolutions with a Flatten head (only the 64
                 diagonal positions are needed), for the ratio GAP / Flatten.

Each case runs in its own subprocess so that its peak RSS (ru_maxrss) is its
own. Usage:

    python benchmarks/infinite_speed.py [--n 1797] [--cases fcn10,cnn2_gap,cnn2_flatten]
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _model(case):
    import keras

    import keras_ntk

    w, b = 2.0 ** 0.5, 0.05 ** 0.5
    if case == "fcn10":
        layers = [keras.Input((64,))]
        layers += [keras_ntk.NTKDense(512, w, b, activation="relu") for _ in range(10)]
        layers.append(keras_ntk.NTKDense(1, w, b))
        return keras.Sequential(layers)
    head = (keras.layers.GlobalAveragePooling2D() if case == "cnn2_gap"
            else keras.layers.Flatten())
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras_ntk.NTKConv2D(64, 3, weight_std=w, bias_std=b), keras.layers.ReLU(),
        keras_ntk.NTKConv2D(64, 3, weight_std=w, bias_std=b), keras.layers.ReLU(),
        head, keras_ntk.NTKDense(1, w, b),
    ])


def _run_case(case, n):
    """Runs in a child process: prints one JSON line."""
    import numpy as np
    from sklearn.datasets import load_digits

    import keras_ntk

    x = load_digits().data[:n].astype(np.float64) / 16.0
    if case != "fcn10":
        x = x.reshape(-1, 8, 8, 1)
    model = _model(case)
    keras_ntk.infinite_kernels(model, x[:8])  # Trace the functions once.
    start = time.perf_counter()
    kernels = keras_ntk.infinite_kernels(model, x)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": case, "n": n, "seconds": seconds, "peak_rss_mib": peak_mib,
                      "ntk_trace": float(np.trace(kernels.ntk)),
                      "finite": bool(np.isfinite(kernels.ntk).all())}))


def _device():
    import tensorflow as tf

    devices = [d.device_type + ":" + d.name for d in tf.config.list_logical_devices()]
    gpus = tf.config.list_physical_devices("GPU")
    details = [tf.config.experimental.get_device_details(g).get("device_name", "GPU")
               for g in gpus]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
            f"TF devices {devices}, GPUs {details or 'none'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1797)
    parser.add_argument("--cases", default="fcn10,cnn2_gap,cnn2_flatten")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _run_case(args.child, args.n)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print("device:", _device())
    results = {}
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--n", str(args.n)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results[case] = result
        print(f"{case:13s} N={result['n']}: {result['seconds']:8.2f} s, "
              f"peak RSS {result['peak_rss_mib']:7.0f} MiB, finite={result['finite']}")
    if "cnn2_gap" in results and "cnn2_flatten" in results:
        ratio = results["cnn2_gap"]["seconds"] / results["cnn2_flatten"]["seconds"]
        print(f"ratio cnn2_gap / cnn2_flatten time: {ratio:.1f}")


if __name__ == "__main__":
    main()
