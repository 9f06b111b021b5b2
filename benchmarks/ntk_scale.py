"""Seconds and peak memory of top-k eNTK eigenpairs, with and without forming Θ.

Cases (each in a fresh subprocess, so the resident-memory high-water mark
VmHWM is the case's own):

* `lenet_formed`: LeNet (experiments/models.py, 8×8 digits, one logit) on
  all 1797 digits: Θ by `empirical_ntk`, then the top k by
  `scipy.linalg.eigh(subset_by_index=...)`.
* `lenet_matrix_free`: the same top k by `keras_ntk.ntk_eigsh` (Lanczos on
  matrix-free Θ·v products, Θ never formed); its eigenvalues are compared
  with the formed ones.
* `resnet_matrix_free`: narrow ResNet-18 (experiments/models.py, width 16,
  BatchNorm in inference mode, one logit) on N synthetic 32×32×3 inputs
  (default 20 000): `ntk_eigsh` matrix-free. On a CPU the full Lanczos run
  takes hours, so `--max-products P` measures P products (seconds each and
  the memory peak, which does not grow with the number of products) and the
  script extrapolates with the product count Lanczos needed for LeNet.
* `resnet_formed` (only with `--resnet-formed-n`): Θ formed for a smaller N.

Run: `python benchmarks/ntk_scale.py [--quick]`. Goal (issue 9): the 20k ResNet
case under 4 GB peak.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_ntk  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import models  # noqa: E402


def _status_bytes(field):
    """VmRSS or VmHWM of this process in bytes (VmHWM: this address space's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _device():
    gpus = tf.config.list_logical_devices("GPU")
    return "GPU" if gpus else f"CPU ({os.cpu_count()} cores)"


def _inputs(case, n):
    if case.startswith("lenet"):
        x = load_digits().data.astype("float32") / 16.0
        return x[:n].reshape(-1, 8, 8, 1)
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 32, 32, 3)).astype("float32")


def _model(case, width):
    keras.utils.set_random_seed(0)
    if case.startswith("lenet"):
        return models.lenet((8, 8, 1), 1)
    return models.resnet18((32, 32, 3), 1, width=width)


def child(args):
    """One case in this (fresh) process; prints one JSON line."""
    x = _inputs(args.case, args.n)
    model = _model(args.case, args.width)
    model(x[:2])
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    result = dict(case=args.case, n=int(len(x)), k=args.k, device=_device(),
                  parameters=int(sum(np.prod(w.shape) for w in model.trainable_weights)))
    if args.case.endswith("formed"):
        kernel = keras_ntk.empirical_ntk(model, x, memory_budget=args.memory_budget)
        kernel_seconds = time.perf_counter() - start
        values = scipy.linalg.eigh(kernel, eigvals_only=True, overwrite_a=True,
                                   subset_by_index=(len(x) - args.k, len(x) - 1))[::-1]
        result.update(kernel_seconds=kernel_seconds, values=values.tolist())
    elif args.max_products:
        v = np.random.default_rng(0).standard_normal(len(x))
        times = []
        for _ in range(args.max_products):
            t = time.perf_counter()
            v = keras_ntk.ntk_vector_product(model, x, None, v, implementation="ntvp",
                                              batch_size=args.batch_size,
                                              memory_budget=args.memory_budget)
            v = v / np.linalg.norm(v)
            times.append(time.perf_counter() - t)
        result.update(products=len(times), product_seconds=times)
    else:
        values = keras_ntk.ntk_eigsh(model, x, args.k, batch_size=args.batch_size,
                                     memory_budget=args.memory_budget,
                                     return_eigenvectors=True, verbose=1)[0]
        result.update(values=values.tolist())
    result["seconds"] = time.perf_counter() - start
    result["peak_bytes"] = _status_bytes("VmHWM")
    result["rss_before_bytes"] = rss_before
    print(json.dumps(result), flush=True)


def run_case(case, n, args, **extra):
    command = [sys.executable, os.path.abspath(__file__), "--child", "--case", case,
               "--n", str(n), "--k", str(args.k), "--width", str(args.width),
               "--batch-size", str(args.batch_size),
               "--memory-budget", str(args.memory_budget)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    print(f"-- {case} N={n} {extra or ''}", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = completed.stdout.strip().splitlines()
    summary = [line for line in lines if line.startswith("ntk_eigsh:")]
    if completed.returncode != 0 or not lines or not lines[-1].startswith("{"):
        print(completed.stdout[-2000:], completed.stderr[-4000:])
        raise SystemExit(f"case {case} failed")
    result = json.loads(lines[-1])
    if summary:
        result["lanczos_products"] = int(summary[0].split()[1])
    print(json.dumps({k: v for k, v in result.items() if k != "values"}), flush=True)
    return result


def _mib(b):
    return f"{b / 2**20:7.0f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller N (LeNet 512 digits, ResNet 2000 inputs, 3 products)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--resnet-n", type=int, default=20000)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 stage-1 width")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="examples per VJP/JVP pass of the products")
    parser.add_argument("--max-products", type=int, default=3,
                        help="ResNet products timed (0: run the full Lanczos)")
    parser.add_argument("--resnet-formed-n", type=int, default=0)
    parser.add_argument("--memory-budget", type=int, default=4 * 2**30,
                        help="bytes for empirical_ntk blocks and the products (the goal: 4 GiB)")
    parser.add_argument("--cases", default="lenet_formed,lenet_matrix_free,resnet_matrix_free")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    lenet_n = 512 if args.quick else 1797
    resnet_n = min(args.resnet_n, 2000) if args.quick else args.resnet_n
    cases = args.cases.split(",")
    results = {}
    for case in cases:
        if case.startswith("lenet"):
            results[case] = run_case(case, lenet_n, args, max_products=0)
        elif case == "resnet_matrix_free":
            results[case] = run_case(case, resnet_n, args, max_products=args.max_products)
    if args.resnet_formed_n:
        results["resnet_formed"] = run_case("resnet_formed", args.resnet_formed_n, args)
    print()
    print(f"top-{args.k} eigenpairs of the eNTK, {next(iter(results.values()))['device']}")
    print(f"{'case':20s} {'N':>6s} {'seconds':>9s} {'peak RSS':>11s} {'products':>9s}")
    for case, r in results.items():
        products = r.get("lanczos_products", r.get("products", ""))
        print(f"{case:20s} {r['n']:6d} {r['seconds']:9.1f} {_mib(r['peak_bytes']):>11s} "
              f"{products!s:>9s}")
    formed, free = results.get("lenet_formed"), results.get("lenet_matrix_free")
    if formed and free:
        a, b = np.asarray(formed["values"]), np.asarray(free["values"])
        print(f"LeNet: matrix-free vs formed top-{args.k} eigenvalues, max relative "
              f"difference {np.max(np.abs(a - b) / np.abs(a)):.1e}; kernel formed in "
              f"{formed['kernel_seconds']:.1f} s")
    resnet = results.get("resnet_matrix_free")
    if resnet and "product_seconds" in resnet:
        per = float(np.median(resnet["product_seconds"][1:] or resnet["product_seconds"]))
        needed = free["lanczos_products"] if free else 3 * args.k
        print(f"ResNet-18 (width {args.width}, {resnet['parameters']} parameters), "
              f"N={resnet['n']}: {per:.1f} s per Θ·v product (median of the warm ones; first "
              f"{resnet['product_seconds'][0]:.1f} s), peak RSS {_mib(resnet['peak_bytes'])}"
              f" (goal < 4096 MiB); with {needed} products ("
              f"{'as Lanczos needed for LeNet' if free else '3k, LeNet not run'}) the "
              f"top-{args.k} would take about {per * needed / 3600:.1f} h here")
    print(json.dumps({case: {k: v for k, v in r.items() if k != "values"}
                      for case, r in results.items()}))


if __name__ == "__main__":
    main()
