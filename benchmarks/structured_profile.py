"""Where a structured empirical NTK block spends its time, layer by layer (issue 18 §3).

For the cases of benchmarks/ntk_speed.py (LeNet-8×8 on N=256 digits, ResNet-18 width
16 on N=64 32×32×3 inputs with BatchNorm in inference mode, the 2-block transformer on
N=64 sequences of 16 tokens), each timed as its own XLA-compiled function, warm,
median of `--repeats` calls:

* `call`: the whole `keras_ntk.empirical_ntk(model, x)` with implementation
  "structured", "jacobian" and "auto", interleaved;
* `block`: the compiled structured block alone;
* `forward`: the model's forward pass;
* `factors`: the forward pass with probes, the backward pass to every probe and every
  rule's a-factor (`_structured.structured_factors`), reduced to a scalar;
* per rule: `a-factor` (the layer input arranged as (N, P, G, A): patches for a
  convolution) and `contract` (the rule's Θ contribution from its precomputed
  factors, `contract_structured`, with the form the cost model picks and its FLOPs);
* `generic`: weights without a rule (per-example Jacobian), if any.

The parts overlap (XLA fuses across them in the block), so they do not add up to the
block exactly; they show which parts dominate. Prints the load average.
Run: `python benchmarks/structured_profile.py [--cases lenet,resnet18,transformer]`.
"""

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, ".."), _HERE]  # this checkout's keras_ntk, ntk_speed

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ntk  # noqa: E402
from keras_ntk import _structured  # noqa: E402
from keras_ntk import ntk as ntk_module  # noqa: E402
from ntk_speed import build_case  # noqa: E402


def median_ms(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if hasattr(out, "numpy"):
            out.numpy()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _scalar(tensors):
    return tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32)) for t in tensors])


def profile(case, repeats):
    model, x, trace_axes, _ = build_case(case)
    setup = ntk_module.kernel_setup(model, x, None, trace_axes, (), "auto", None, None,
                                    False, None)
    plan, rules = setup.plan, setup.rules
    print(f"\n== {case}: N={len(x)}, auto -> {setup.implementation} (block {setup.block}), "
          f"{len(rules)} rules, load {os.getloadavg()[0]:.1f}", flush=True)
    xt = tf.constant(x)
    rows = []
    # Whole calls per implementation, interleaved (load affects each alike).
    calls = collections.defaultdict(list)
    for impl in ("structured", "jacobian", "auto"):
        keras_ntk.empirical_ntk(model, x, trace_axes=trace_axes, implementation=impl)
    for _ in range(repeats):
        for impl in ("structured", "jacobian", "auto"):
            start = time.perf_counter()
            keras_ntk.empirical_ntk(model, x, trace_axes=trace_axes, implementation=impl)
            calls[impl].append(1e3 * (time.perf_counter() - start))
    for impl, times in calls.items():
        rows.append((f"call, implementation={impl}", float(np.median(times)), ""))
    block = tf.function(lambda x1: ntk_module._structured_block(plan, rules, x1, None),
                        jit_compile=True)
    rows.append(("block", median_ms(lambda: block(xt), repeats), ""))
    forward = tf.function(lambda x1: model(x1, training=False), jit_compile=True)
    rows.append(("forward", median_ms(lambda: forward(xt), repeats), ""))

    def factors_fn(x1):
        out = _structured.structured_factors(model, x1, rules, False, plan.sizes, plan.dtype)
        parts = []
        for a, gs in out:
            parts.append(a.ids if isinstance(a, _structured.Tokens) else a)
            parts.extend(gs)
        return _scalar(parts)

    factors_c = tf.function(factors_fn, jit_compile=True)
    rows.append(("factors (fwd+bwd+a)", median_ms(lambda: factors_c(xt), repeats), ""))
    # Concrete factors (eager), then per rule the a-factor and the contraction alone.
    facs = _structured.structured_factors(model, xt, rules, False, plan.sizes, plan.dtype)
    axes = plan.out_axes[0]
    n = len(x)
    totals = collections.Counter()
    for rule, (a, gs) in zip(rules, facs):
        name = f"{rule.layer.name} ({type(rule.layer).__name__})"
        inputs = [inp for inp, _ in rule.calls] if rule.calls else []
        dims = _structured.rule_dims(rule) if rule.calls else None
        g = gs[0]
        if isinstance(a, _structured.Tokens):
            ids, vocab = a.ids, a.vocabulary
            contract = tf.function(lambda i, g_: _structured.contract_structured(
                _structured.Tokens(i, vocab), g_, _structured.Tokens(i, vocab), g_, axes,
                plan.dtype), jit_compile=True)
            t_c = median_ms(lambda: contract(ids, g), repeats)
            t_a = 0.0
            dims = _structured.RuleDims(int(ids.shape[1]), 1, vocab, int(g.shape[-1]), True)
        else:
            contract = tf.function(lambda a_, g_: _structured.contract_structured(
                a_, g_, a_, g_, axes, plan.dtype), jit_compile=True)
            t_c = median_ms(lambda: contract(a, g), repeats)
            t_a = 0.0
            for inp in inputs:
                patches = tf.function(lambda i: rule.patches(i, plan.dtype), jit_compile=True)
                t_a += median_ms(lambda: patches(inp), repeats)
            dims = _structured.RuleDims(int(a.shape[1]), int(a.shape[2]), int(a.shape[3]),
                                        int(g.shape[-1]), False)
        form, (flops, _) = _structured.contraction_form(n, n, dims, axes)
        kind = type(rule.layer).__name__
        totals[kind + " a-factor"] += t_a
        totals[kind + " contract"] += t_c
        rows.append((f"  {name}: a-factor", t_a, f"P={dims.p} G={dims.g} A={dims.a} B={dims.b}"))
        rows.append((f"  {name}: contract", t_c, f"{form}, {flops / 1e9:.2f} GFLOP"))
    covered = {id(v) for rule in rules for v in rule.variables()}
    rest = [w for w in plan.weights if id(w) not in covered]
    if rest:
        from keras_ntk._jacobians import per_example_jacobians
        gen = tf.function(lambda x1: _scalar(per_example_jacobians(
            model, x1, rest, False, plan.sizes)), jit_compile=True)
        rows.append((f"generic ({sum(int(np.prod(w.shape)) for w in rest)} weights)",
                     median_ms(lambda: gen(xt), repeats), ""))
    for label, ms, note in rows:
        print(f"{label:60s} {ms:9.2f} ms  {note}", flush=True)
    print("totals by layer type:", flush=True)
    for label, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {ms:9.2f} ms", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="lenet,resnet18,transformer")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for case in args.cases.split(","):
        profile(case, args.repeats)


if __name__ == "__main__":
    main()
