"""neural-tangents timings for the cases of benchmarks/ntk_speed.py (run in its own venv).

This script runs under a SEPARATE virtual environment holding neural-tangents 0.6.5 on CPU
(it is never a dependency of keras-ntk):

    python3 -m venv /tmp/ntvenv
    /tmp/ntvenv/bin/pip install neural-tangents==0.6.5 jax==0.4.23 jaxlib==0.4.23 \
        flax==0.8.0 "numpy<2" "scipy<1.14" scikit-learn
    # neural_tangents/__init__.py imports `experimental`, which needs TensorFlow: comment it out
    sed -i 's/^from \\. import experimental$/# &/' \
        /tmp/ntvenv/lib/python3.11/site-packages/neural_tangents/__init__.py

Two modes:

* `python benchmarks/neural_tangents_reference.py [--quick] [--all]` prints one JSON line:
  for each stax case (MLP-1, MLP-10 traced and full, LeNet on N=256 digits), the median
  seconds of neural-tangents' implementations, jitted and warm.
* `--serve`: a long-lived process speaking JSON lines over stdin/stdout, so that
  `benchmarks/ntk_speed.py --neural-tangents-python ...` can alternate rounds of ours and
  theirs in one run (load then affects both alike). Requests (one JSON object a line):
  `{"op": "setup", "case": ..., "impls": [1, 3], "data": "/path.npz" or null}` builds and
  compiles the kernel functions (the npz holds `x` and, for the Flax models, the Keras
  weights by name); `{"op": "time", "case": ..., "impl": 3, "repeats": 5}` answers
  `{"seconds": [...]}`; `{"op": "kernel", "case": ..., "impl": 3, "out": "/path.npy"}` saves
  the kernel. Implementations are neural-tangents' numbers: 1 jacobian contraction,
  2 NTK-vector products, 3 structured derivatives.

The Flax models (ResNet-18 width 16 with BatchNorm in inference mode, and a 2-block
transformer encoder) mirror `experiments.models.resnet18` and `transformer()` of
benchmarks/ntk_speed.py layer by layer; weights are copied from Keras so the two kernels
can be compared.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import neural_tangents as nt
import numpy as np
from neural_tangents import stax

IMPLEMENTATIONS = {
    1: nt.NtkImplementation.JACOBIAN_CONTRACTION,
    2: nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
    3: nt.NtkImplementation.STRUCTURED_DERIVATIVES,
}


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


def digits(n=256):
    from sklearn.datasets import load_digits

    return jnp.asarray(load_digits().data[:n].astype("float32") / 16.0)


def stax_case(name):
    """(apply_fn(params, x), params, x, trace_axes) of a stax case on N=256 digits."""
    x = digits()
    init_fn, apply_fn, _ = {
        "mlp1": lambda: mlp(1), "mlp10_traced": lambda: mlp(10),
        "mlp10_full": lambda: mlp(10), "lenet": lenet}[name]()
    if name == "lenet":
        x = x.reshape(-1, 8, 8, 1)
    _, params = init_fn(jax.random.PRNGKey(0), x.shape)
    return apply_fn, params, x, () if name == "mlp10_full" else (-1,)


# ------------------------------------------------------------------ Flax models


def _flax_models():
    import flax.linen as nn

    class BasicBlock(nn.Module):
        filters: int
        strides: int
        name_: str

        @nn.compact
        def __call__(self, x):
            n = self.name_
            conv = lambda f, k, s, nm: nn.Conv(  # noqa: E731
                f, (k, k), (s, s), padding="SAME", use_bias=False, name=nm)
            bn = lambda nm: nn.BatchNorm(use_running_average=True, epsilon=1e-3,  # noqa: E731
                                         name=nm)
            y = nn.relu(bn(f"{n}_bn1")(conv(self.filters, 3, self.strides, f"{n}_conv1")(x)))
            y = bn(f"{n}_bn2")(conv(self.filters, 3, 1, f"{n}_conv2")(y))
            shortcut = x
            if self.strides != 1 or x.shape[-1] != self.filters:
                shortcut = bn(f"{n}_proj_bn")(conv(self.filters, 1, self.strides,
                                                   f"{n}_proj")(x))
            return nn.relu(y + shortcut)

    class ResNet18(nn.Module):
        width: int = 16

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False,
                        name="stem_conv")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3,
                                     name="stem_bn")(x))
            for stage in range(4):
                for block in range(2):
                    strides = 2 if stage > 0 and block == 0 else 1
                    x = BasicBlock(self.width * 2**stage, strides,
                                   f"stage{stage}_block{block}",
                                   name=f"stage{stage}_block{block}")(x)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(1, name="logits")(x)

    class EncoderBlock(nn.Module):
        heads: int
        key_dim: int
        hidden: int
        index: int

        @nn.compact
        def __call__(self, x):
            i = self.index
            d = x.shape[-1]
            y = nn.MultiHeadDotProductAttention(
                num_heads=self.heads, qkv_features=self.heads * self.key_dim,
                out_features=d, name=f"mha{i}")(x, x)
            x = nn.LayerNorm(epsilon=1e-3, name=f"ln{i}a")(x + y)
            y = nn.gelu(nn.Dense(self.hidden, name=f"ff{i}a")(x), approximate=True)
            y = nn.Dense(d, name=f"ff{i}b")(y)
            return nn.LayerNorm(epsilon=1e-3, name=f"ln{i}b")(x + y)

    class Transformer(nn.Module):
        vocab: int
        dim: int
        heads: int
        key_dim: int
        hidden: int

        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(self.vocab, self.dim, name="embedding")(tokens)
            for i in range(2):
                x = EncoderBlock(self.heads, self.key_dim, self.hidden, i, name=f"block{i}")(x)
            x = jnp.mean(x, axis=1)
            return nn.Dense(1, name="logits")(x)

    return ResNet18, Transformer


def _assign(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = jnp.asarray(value)


def flax_case(name, data):
    """(apply_fn(params, x), params, x, trace_axes) with the Keras weights of `data`."""
    resnet18, transformer = _flax_models()
    x = data["x"]
    meta = json.loads(str(data["meta"]))
    if name == "resnet18":
        module = resnet18(width=meta["width"])
        variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    else:
        module = transformer(**meta)
        variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    params = jax.tree_util.tree_map(lambda a: None, variables["params"])
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    stats = variables.get("batch_stats", {})
    params, stats = _unfreeze(params), _unfreeze(stats)
    for key in data.files:
        if key in ("x", "meta"):
            continue
        # Keras weight paths rewritten by ntk_speed.py as Flax paths: "params/a/b/kernel".
        collection, *path = key.split("/")
        _assign(params if collection == "params" else stats, path, data[key])
    check = jax.tree_util.tree_map(lambda a: a.shape, variables["params"])
    got = jax.tree_util.tree_map(lambda a: a.shape, params)
    if check != got:
        raise ValueError(f"copied weights do not match the Flax tree: {check} vs {got}")

    def apply_fn(p, inputs):
        collections = {"params": p}
        if stats:
            collections["batch_stats"] = stats
        return module.apply(collections, inputs)

    return apply_fn, params, jnp.asarray(x), (-1,)


def _unfreeze(tree):
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    return jax.tree_util.tree_map(lambda a: a, dict(tree))


# ------------------------------------------------------------------ modes


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def device():
    return f"{jax.default_backend()} (jax {jax.__version__}, neural-tangents {nt.__version__})"


def serve():
    """JSON lines on stdin/stdout (see the module docstring)."""
    cases, fns = {}, {}
    print(json.dumps({"ready": True, "device": device()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "setup":
                name = request["case"]
                if request.get("data"):
                    cases[name] = flax_case(name, np.load(request["data"]))
                else:
                    cases[name] = stax_case(name)
                apply_fn, params, x, trace_axes = cases[name]
                compile_seconds = {}
                for impl in request["impls"]:
                    fn = jax.jit(nt.empirical_ntk_fn(
                        apply_fn, trace_axes=trace_axes, vmap_axes=0,
                        implementation=IMPLEMENTATIONS[impl]))
                    start = time.perf_counter()
                    jax.block_until_ready(fn(x, None, params))
                    compile_seconds[impl] = time.perf_counter() - start
                    fns[(name, impl)] = fn
                reply = {"compile_seconds": compile_seconds}
            elif op == "time":
                name, impl = request["case"], request["impl"]
                _, params, x, _ = cases[name]
                fn = fns[(name, impl)]
                seconds = []
                for _ in range(request.get("repeats", 1)):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(x, None, params))
                    seconds.append(time.perf_counter() - start)
                reply = {"seconds": seconds}
            elif op == "kernel":
                name, impl = request["case"], request["impl"]
                _, params, x, _ = cases[name]
                np.save(request["out"], np.asarray(fns[(name, impl)](x, None, params),
                                                   np.float64))
                reply = {"saved": request["out"]}
            elif op == "quit":
                break
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
            reply = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(json.dumps(reply), flush=True)


def main():
    if "--serve" in sys.argv:
        serve()
        return
    repeats = 3 if "--quick" in sys.argv else 10
    impls = {"structured": 3}
    if "--all" in sys.argv:
        impls.update(jacobian=1, ntvp=2)
    results = {"device": device()}
    for name in ("mlp1", "mlp10_traced", "mlp10_full", "lenet"):
        apply_fn, params, x, trace_axes = stax_case(name)
        results[name] = {}
        for impl_name, impl in impls.items():
            kernel_fn = jax.jit(nt.empirical_ntk_fn(
                apply_fn, trace_axes=trace_axes, vmap_axes=0,
                implementation=IMPLEMENTATIONS[impl]))
            results[name][impl_name] = median_seconds(
                lambda: kernel_fn(x, None, params), repeats)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
