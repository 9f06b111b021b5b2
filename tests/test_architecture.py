"""The import structure of keras_ntk and experiments (docs/architecture.md), from the source.

Imports are read with `ast` (every `import`, also those inside functions), so
these tests see the files as they are, without importing them.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("gin", "absl", "experiments")  # the library knows nothing of the binaries


def module_name(path, root):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path, package):
    """The modules `path` imports: `import a.b` gives a.b; `from a import b` gives a.b
    when that is a module and a otherwise (b is then a name defined by a). Relative
    imports are resolved against `package`, the package `path` belongs to."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                names.add((base, alias.name))
    return names


def resolved_imports(path, package, modules):
    """The modules among `modules` (dotted names) that `path` imports."""
    found = set()
    for item in imported_modules(path, package):
        if isinstance(item, tuple):
            base, attr = item
            target = f"{base}.{attr}" if f"{base}.{attr}" in modules else base
        else:
            target = item
        if target in modules:
            found.add(target)
    return found


def package_modules(root, package):
    """{dotted module name: path} for the .py files of `package` (not its subfolders)."""
    return {module_name(p, root): p for p in (root / package).glob("*.py")}


def import_graph(root, package):
    """{module: set of modules of `package` it imports} for the .py files of `package`."""
    files = package_modules(root, package)
    graph = {}
    for name, path in files.items():
        own_package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = resolved_imports(path, own_package, files) - {name}
    return graph


def top_level_imports(path):
    """Every module `path` imports (for `from a import b`: a)."""
    out = set()
    for item in imported_modules(path, "keras_ntk"):
        module = item[0] if isinstance(item, tuple) else item
        out.add(module)
    return out


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def write_package(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "from pkg import b\n\ndef f():\n    return b.g()\n",
        "pkg/b.py": "def g():\n    from pkg.c import h\n    return h()\n",
        "pkg/c.py": "import pkg.a\n\ndef h():\n    return 1\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"},
                     "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_the_checker_sees_a_module_importing_its_package_init(tmp_path):
    # `from pkg import name` where name is re-exported by __init__ runs __init__,
    # which imports the module back: a cycle.
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\nfrom pkg.b import g\n",
        "pkg/a.py": "def f():\n    return 1\n",
        "pkg/b.py": "from pkg import f\n\ndef g():\n    return f()\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg"}
    assert find_cycle(graph) == ["pkg", "pkg.b", "pkg"]


def test_keras_ntk_has_no_import_cycle():
    graph = import_graph(ROOT, "keras_ntk")
    assert {"keras_ntk.ntk", "keras_ntk._batching", "keras_ntk._weights"} <= set(graph)
    assert "keras_ntk._batching" in graph["keras_ntk.ntk"]
    assert find_cycle(graph) is None


def test_experiments_have_no_import_cycle():
    graph = import_graph(ROOT, "experiments")
    assert "experiments.launcher" in graph
    assert find_cycle(graph) is None


def test_experiments_use_only_public_keras_ntk_modules():
    """The binaries see the library as its users do: no `keras_ntk._*` module."""
    library = package_modules(ROOT, "keras_ntk")
    private = []
    for path in sorted((ROOT / "experiments").glob("*.py")):
        for module in resolved_imports(path, "experiments", library):
            if module.split(".")[-1].startswith("_") and module != "keras_ntk":
                private.append((path.name, module))
    assert private == []


@pytest.mark.parametrize("path", sorted((ROOT / "keras_ntk").glob("*.py")),
                         ids=lambda p: p.name)
def test_keras_ntk_imports_neither_gin_absl_experiments_nor_keras_src(path):
    modules = top_level_imports(path)
    assert not {m.split(".")[0] for m in modules} & set(FORBIDDEN)
    assert not [m for m in modules if m == "keras.src" or m.startswith("keras.src.")]


def test_only_the_weights_walker_reads_keras_layer_tracking():
    """`_layers` (Keras' private list of tracked sublayers) is read in one place."""
    readers = []
    for path in sorted((ROOT / "keras_ntk").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "_layers":
                readers.append(path.name)
            elif isinstance(node, ast.Constant) and node.value == "_layers":
                readers.append(path.name)
    assert readers == ["_weights.py"]


def test_no_keras_ntk_module_is_over_800_lines():
    """One concern per module (issue 17): a file that grows past this wants splitting."""
    lengths = {path.name: len(path.read_text().splitlines())
               for path in (ROOT / "keras_ntk").glob("*.py")}
    assert lengths["ntk.py"] > 100  # the count reads real files
    assert {name: n for name, n in lengths.items() if n > 800} == {}
