"""Where the time of a structured empirical NTK goes, against a hand-fused prototype.

For N=256 digits (x2=None) on MLP-1, MLP-10 (traced) and LeNet, interleaved
rounds of three timings in one process (load affects all alike):

* `prototype` (MLP-1 only): the hand-written 40-line TF+XLA structured rule of
  issue 18 — forward with zero probes, one backward pass, Σ_l (A_l A_lᵀ + 1) ⊙
  (G_l G_lᵀ), one `tf.function(jit_compile=True)`;
* `block`: keras-ntk's compiled block function alone (what `empirical_ntk`
  runs for one block: factors, cotangents and every layer's contraction fused
  in one XLA function);
* `call`: the whole `keras_ntk.empirical_ntk(model, x)` call (validation, the
  cached plan, the block, the host result).

Prints medians over rounds (ms), the relative difference of the kernels, and
the load average. Run: `python benchmarks/structured_speed.py [--rounds 30]`.

`--embedding`: instead, the text model of neural-tangents #199 (Embedding of a
30 000-token vocabulary, width 64, sequences of 32, N=256): the estimated peak
memory of one full block per implementation, the one "auto" picks, its wall
time, and its error against the per-example-Jacobian kernel on 16 examples.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, ".."), _HERE]  # this checkout's keras_ntk, ntk_speed

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ntk  # noqa: E402
from keras_ntk import ntk as ntk_module  # noqa: E402
from ntk_speed import digits, lenet, mlp  # noqa: E402


def prototype(model):
    """Issue 18's hand-fused structured rule for a ReLU MLP of Dense layers."""
    layers = model.layers

    @tf.function(jit_compile=True)
    def kernel(x):
        inputs, probes = [], []
        with tf.GradientTape() as tape:
            h = x
            for i, layer in enumerate(layers):
                z = h @ layer.kernel + layer.bias
                probe = tf.zeros_like(z)
                tape.watch(probe)
                inputs.append(h)
                probes.append(probe)
                h = tf.nn.relu(z + probe) if i < len(layers) - 1 else z + probe
            total = tf.reduce_sum(h)
        cotangents = tape.gradient(total, probes)
        k = 0.0
        for a, g in zip(inputs, cotangents):
            k += (a @ tf.transpose(a) + 1.0) * (g @ tf.transpose(g))
        return k

    return kernel


def embedding_case():
    from keras_ntk import _costs
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32,), dtype="int32"),
        keras.layers.Embedding(30_000, 64),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1),
    ])
    tokens = np.random.default_rng(0).zipf(1.3, size=(256, 32)) % 30_000
    tokens = tokens.astype("int32")
    setup = ntk_module.kernel_setup(model, tokens, None, (-1,), (), "auto", None, None, False,
                                    None)
    for impl in ("structured", "jacobian", "ntvp"):
        flops, peak = _costs.estimates(impl, setup.profile, setup.out_axes, 256, 256, True, 4)
        print(f"embedding {impl:10s} one 256x256 block: {flops / 1e9:8.1f} GFLOP, "
              f"peak {_costs.format_bytes(peak)}")
    print(f"auto: {setup.implementation}, blocks of {setup.block}")
    start = time.perf_counter()
    kernel = keras_ntk.empirical_ntk(model, tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    keras_ntk.empirical_ntk(model, tokens)
    print(f"auto: first call {first:.2f} s, second {time.perf_counter() - start:.3f} s")
    reference = keras_ntk.empirical_ntk(model, tokens[:16], implementation="jacobian",
                                        dtype="float64")
    err = np.linalg.norm(kernel[:16, :16] - reference) / np.linalg.norm(reference)
    print(f"relative error vs float64 jacobian on 16 examples: {err:.1e}; "
          f"load average {os.getloadavg()[0]:.1f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--embedding", action="store_true")
    args = parser.parse_args()
    print(f"keras_ntk from {os.path.dirname(keras_ntk.__file__)}")
    if args.embedding:
        embedding_case()
        return
    keras.utils.set_random_seed(0)
    x, images = digits(256), digits(256, image=True)
    cases = [("mlp1", mlp(1), x), ("mlp10_traced", mlp(10), x), ("lenet", lenet(), images)]
    runners = {}
    for name, model, inputs in cases:
        setup = ntk_module.kernel_setup(model, inputs, None, (-1,), (), "auto", None, None,
                                        False, None)
        block = ntk_module._block_function(setup, True)
        tensor = tf.constant(inputs)
        kernel = keras_ntk.empirical_ntk(model, inputs)
        runners[(name, "call")] = lambda m=model, i=inputs: keras_ntk.empirical_ntk(m, i)
        runners[(name, "block")] = lambda b=block, t=tensor: [np.asarray(k) for k in b(t)]
        print(f"{name}: implementation {setup.implementation}, block {setup.block}")
        if name == "mlp1":
            proto = prototype(model)
            reference = proto(tensor).numpy()
            diff = np.linalg.norm(kernel - reference) / np.linalg.norm(reference)
            print(f"mlp1: relative difference to the prototype {diff:.1e}")
            runners[(name, "prototype")] = lambda p=proto, t=tensor: p(t).numpy()
    for run in runners.values():  # warm-up (compilation)
        run(), run()
    times = {key: [] for key in runners}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    for (name, what), ts in times.items():
        ms = np.array(ts) * 1e3
        print(f"{name:13s} {what:9s} median {np.median(ms):7.2f} ms  "
              f"(quartiles {np.percentile(ms, 25):.2f}-{np.percentile(ms, 75):.2f})")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          f"({os.cpu_count()} logical cores)")


if __name__ == "__main__":
    main()
