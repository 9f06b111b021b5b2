"""neural-tangents timings for the cases of benchmarks/ntk_speed.py (run in its own venv).

This script runs under a SEPARATE virtual environment holding neural-tangents 0.6.5 on CPU
(it is never a dependency of keras-ntk):

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 \
        "numpy<2" "scipy<1.14" scikit-learn
    # neural_tangents/__init__.py imports `experimental`, which needs TensorFlow: comment it out
    sed -i 's/^from \\. import experimental$/# &/' \
        /tmp/ntvenv/lib/python3.11/site-packages/neural_tangents/__init__.py
    /tmp/ntvenv/bin/python benchmarks/neural_tangents_reference.py

It prints one JSON line: for each case, the median seconds of neural-tangents' structured
derivatives (its fastest here; `--all` adds jacobian contraction and NTK-vector products,
which take minutes), jitted and warm, on the same N=256 digits inputs and architectures.
`python benchmarks/ntk_speed.py --neural-tangents-python /tmp/ntvenv/bin/python` runs it
and prints ours / neural-tangents ratios measured in the same run.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import neural_tangents as nt
import numpy as np
from neural_tangents import stax
from sklearn.datasets import load_digits


def mlp(outputs):
    return stax.serial(
        stax.Dense(512), stax.Relu(), stax.Dense(512), stax.Relu(), stax.Dense(outputs)
    )


def lenet():
    return stax.serial(
        stax.Conv(6, (3, 3), padding="SAME"), stax.Relu(),
        stax.Conv(16, (3, 3), padding="SAME"), stax.Relu(),
        stax.AvgPool((2, 2), strides=(2, 2)), stax.Flatten(),
        stax.Dense(120), stax.Relu(), stax.Dense(84), stax.Relu(), stax.Dense(1),
    )


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    repeats = 3 if "--quick" in sys.argv else 10
    x = jnp.asarray(load_digits().data[:256].astype("float32") / 16.0)
    cases = {
        "mlp1": (mlp(1), x, (-1,)),
        "mlp10_traced": (mlp(10), x, (-1,)),
        "mlp10_full": (mlp(10), x, ()),
        "lenet": (lenet(), x.reshape(-1, 8, 8, 1), (-1,)),
    }
    implementations = {"structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES}
    if "--all" in sys.argv:
        implementations["jacobian"] = nt.NtkImplementation.JACOBIAN_CONTRACTION
        implementations["ntvp"] = nt.NtkImplementation.NTK_VECTOR_PRODUCTS
    results = {"device": f"{jax.default_backend()} (jax {jax.__version__}, "
                         f"neural-tangents {nt.__version__})"}
    for name, ((init_fn, apply_fn, _), inputs, trace_axes) in cases.items():
        _, params = init_fn(jax.random.PRNGKey(0), inputs.shape)
        results[name] = {}
        for impl_name, impl in implementations.items():
            kernel_fn = jax.jit(nt.empirical_ntk_fn(
                apply_fn, trace_axes=trace_axes, vmap_axes=0, implementation=impl))
            results[name][impl_name] = median_seconds(
                lambda: kernel_fn(inputs, None, params), repeats)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
