"""Tests of experiments/launcher.py and of the import direction among experiments/."""

import ast
import json
import os
import subprocess
import sys
import textwrap

from experiments import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TOY_BINARY = textwrap.dedent("""
    import json, os, sys
    from absl import app
    from experiments import launcher

    def run(*, output_dir, strategy, model_builders, data_dir=None, scale=1.0, {extra}):
        received = dict(locals())
        received.update(strategy=type(strategy).__name__, model_builders=sorted(model_builders))
        with open(os.path.join(output_dir, "received.json"), "w") as f:
            json.dump(received, f)

    app.run(lambda argv: launcher.main(argv, "toy", run))
""")


def _run_toy(tmp_path, extra, *flags):
    script = tmp_path / "toy.py"
    script.write_text(_TOY_BINARY.format(extra=extra))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, str(script), f"--output_dir={tmp_path / 'out'}",
                           "--strategy=cpu", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_binary_hands_its_run_to_the_launcher(tmp_path):
    result = _run_toy(tmp_path, "overwrite=False, simulate_crash_after_epochs=None",
                      "--gin_bindings=toy.run.scale = 2.5", "--overwrite",
                      "--simulate_crash_after_epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    received = json.loads((tmp_path / "out" / "received.json").read_text())
    assert received == {
        "output_dir": str(tmp_path / "out"), "strategy": "OneDeviceStrategy",
        "model_builders": sorted(models.MODELS), "data_dir": None, "scale": 2.5,
        "overwrite": True, "simulate_crash_after_epochs": 3,
    }
    assert "toy.run.scale = 2.5" in (tmp_path / "out" / "config.gin").read_text()
    # What the launcher passes cannot be bound by a config.
    result = _run_toy(tmp_path, "overwrite=False", "--gin_bindings=toy.run.overwrite = True")
    assert result.returncode != 0 and "Bad gin config or binding" in result.stderr


def test_a_flag_the_binary_does_not_take_is_refused_before_work(tmp_path):
    result = _run_toy(tmp_path, "verbose=0", "--overwrite")
    assert result.returncode != 0
    assert "toy has no --overwrite. Received: overwrite=True" in result.stderr
    assert not (tmp_path / "out").exists()
    # Without the flag the defaults reach run() untouched.
    result = _run_toy(tmp_path, "verbose=0")
    assert result.returncode == 0, result.stderr[-3000:]
    received = json.loads((tmp_path / "out" / "received.json").read_text())
    assert received["verbose"] == 0 and "overwrite" not in received


def _imports(path, package="experiments"):
    """Top-level names of `package` imported anywhere in `path` (also inside functions).

    `from experiments import data` and `import experiments.data` name `data`;
    `from experiments.figures.study_a import x` names `figures`.
    """
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module == package:
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith(package + ".")}
    return found


def test_no_import_circle_among_experiment_modules():
    """Nodes: the modules of experiments/ and its subpackages (a package is one node)."""
    directory = os.path.join(ROOT, "experiments")
    files = {}
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.endswith(".py") and name != "__init__.py":
            files[name[:-3]] = [path]
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            files[name] = [os.path.join(root, f) for root, _, names in os.walk(path)
                           for f in names if f.endswith(".py")]
    modules = set(files)
    graph = {m: (set().union(*(_imports(f) for f in files[m])) & modules) - {m}
             for m in modules}
    # The binaries depend on the launcher, never the reverse.
    for study in ("linear_vs_nonlinear", "data_scaling", "kernel_evolution", "trainability"):
        assert "launcher" in graph[study], study
    assert not graph["launcher"] & {"linear_vs_nonlinear", "data_scaling", "kernel_evolution",
                                    "trainability"}
    assert graph["cells"] == set()
    # Depth-first search for a cycle.
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", " → ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
