"""Where the first call's memory goes: XLA's buffers against compilation (issue 18 §3).

For one case of `benchmarks/ntk_speed.py --memory-estimates`, implementation and
block size, in a fresh process with XLA's dumps on (`--xla_dump_to`), prints one JSON
line: the first call's resident high-water mark above the baseline (as in
`ntk_speed.py`, but raised somewhat by the dumps themselves), and, per compiled module
of the block function, XLA's own buffer assignment (the working memory of one
execution: temporaries, parameters and outputs, reused by live range, which the
estimate must model) and its instruction count after optimization. The rest of the
first call's peak is tracing and compilation.

Run: `python benchmarks/ntk_memory_breakdown.py resnet18 structured 64` (a diagnostic
for the cost model in `keras_ntk/_costs.py`; not a test).
"""

import glob
import json
import os
import re
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="ntk_memory_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import keras_ntk  # noqa: E402
from keras_ntk import ntk as ntk_module  # noqa: E402
from ntk_speed import _status_bytes, estimate_case  # noqa: E402


def buffer_stats(path):
    """(bytes of all allocations, bytes of the temporaries) of one buffer-assignment dump."""
    text = open(path).read()
    total = temp = 0
    for m in re.finditer(r"^allocation \d+: size (\d+)(.*)$", text, re.M):
        size, rest = int(m.group(1)), m.group(2)
        total += size
        if "preallocated-temp" in rest or ("parameter" not in rest and "constant" not in rest
                                           and "output" not in rest):
            temp += size
    return total, temp


def main(case, implementation, block):
    model, x, trace_axes, baseline = estimate_case(case)
    keras_ntk.empirical_ntk(model, x, trace_axes=trace_axes, implementation=implementation,
                            batch_size=block, memory_budget=2**40)
    first = _status_bytes("VmHWM") - baseline
    setup = ntk_module.kernel_setup(model, x, None, trace_axes, (), implementation, block,
                                    2**40, False, None)
    modules = []
    for path in sorted(glob.glob(os.path.join(DUMP, "*buffer-assignment.txt"))):
        name = os.path.basename(path)
        hlo = path.replace("-buffer-assignment.txt", ".txt")
        instructions = 0
        if os.path.exists(hlo):
            instructions = sum(1 for line in open(hlo) if " = " in line)
        total, temp = buffer_stats(path)
        modules.append(dict(module=name[:60], buffers=total, temp=temp,
                            instructions=instructions))
    print(json.dumps(dict(case=case, implementation=setup.implementation, n=len(x),
                          block=setup.block, first_call=first, ops=setup.profile.ops,
                          activations=setup.profile.activations, modules=modules)))


if __name__ == "__main__":
    import shutil

    try:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    finally:
        shutil.rmtree(DUMP, ignore_errors=True)
