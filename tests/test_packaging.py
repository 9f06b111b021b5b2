"""Packaging: one version in one place, and a wheel that installs the library only.

The slow test builds the sdist and the wheel with `python -m build` (which
fetches setuptools into its isolated build environment: a package install),
installs the wheel into a fresh virtual environment and imports it there.
"""
import ast
import pathlib
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _source_version():
    """`__version__` read from keras_ntk/__init__.py's syntax tree, not imported."""
    tree = ast.parse((REPO / "keras_ntk" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(target, "id", None) == "__version__" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("keras_ntk/__init__.py assigns no __version__")


def test_version_in_one_place():
    import keras_ntk

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "keras_ntk.__version__"
    }
    assert not (REPO / "setup.py").exists()
    assert not (REPO / "setup.cfg").exists()
    assert keras_ntk.__version__ == _source_version()
    # The newest changelog entry is the current version.
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    first_entry = re.search(r"^## (\S+)", changelog, flags=re.MULTILINE).group(1)
    assert first_entry == keras_ntk.__version__


def test_wheel_holds_the_library_only():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["setuptools"]["packages"] == ["keras_ntk"]
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")
    # Every subpackage would have to be listed: keras_ntk has none.
    assert not [p for p in (REPO / "keras_ntk").iterdir() if (p / "__init__.py").exists()]


def _ignore_untracked_output(directory, names):
    del directory
    return {
        name
        for name in names
        if name in {".git", ".venv", ".cache", "runs", "site", "build", "dist", "__pycache__",
                    ".pytest_cache"}
        or name.endswith(".egg-info")
    }


@pytest.mark.slow
def test_build_and_install_wheel(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_ignore_untracked_output)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )
    version = _source_version()
    wheels = list(dist.glob("*.whl"))
    sdists = list(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"keras_ntk-{version}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"keras_ntk-{version}.tar.gz"]

    with tarfile.open(sdists[0]) as sdist:
        sdist_names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md",
            "keras_ntk/__init__.py"} <= sdist_names
    assert not [n for n in sdist_names if n.split("/")[0] in ("experiments", "tests")]

    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"keras_ntk-{version}.dist-info/METADATA").decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"keras_ntk", f"keras_ntk-{version}.dist-info"}
    assert not [name for name in names if name.startswith("experiments")]
    expected_modules = {
        f"keras_ntk/{p.name}" for p in (REPO / "keras_ntk").glob("*.py")
    }
    assert {name for name in names if name.startswith("keras_ntk/")} == expected_modules
    assert f"\nVersion: {version}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata
    assert "\nProvides-Extra: experiments\n" in metadata

    # A fresh environment that sees the installed TensorFlow without
    # downloading it again: --system-site-packages, plus, when this test runs
    # inside a virtual environment (whose packages the base interpreter does
    # not see), a .pth line naming this environment's site-packages. Only
    # site directories' own .pth files run, so this environment's editable
    # keras_ntk finder stays out.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    venv_python = venv / "bin" / "python"
    venv_purelib = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    outer = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]]
    pathlib.Path(venv_purelib, "outer_site_packages.pth").write_text(
        "\n".join(dict.fromkeys(outer)) + "\n", encoding="utf-8"
    )
    subprocess.run(
        [str(venv_python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheels[0])],
        check=True, capture_output=True, text=True,
    )
    # Outside the checkout (cwd = tmp_path), so nothing comes from the source tree.
    check = (
        "import importlib.util, numpy as np, keras, keras_ntk\n"
        "print(keras_ntk.__version__)\n"
        "print(keras_ntk.__file__)\n"
        "print(importlib.util.find_spec('experiments'))\n"
        "x = np.random.default_rng(0).normal(size=(5, 3)).astype('float32')\n"
        "model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
        "theta = keras_ntk.empirical_ntk(model, x)\n"
        "x64 = x.astype('float64')\n"
        "print(float(np.abs(np.asarray(theta) - (x64 @ x64.T + 1.0)).max()))\n"
    )
    result = subprocess.run(
        [str(venv_python), "-c", check], cwd=tmp_path, check=True,
        capture_output=True, text=True,
    )
    printed_version, module_file, experiments_spec, error = result.stdout.split("\n")[:4]
    assert printed_version == version
    assert pathlib.Path(module_file).is_relative_to(venv)
    assert experiments_spec == "None"
    # A linear model's NTK is X Xᵀ + 1 (weights and bias).
    assert float(error) < 1e-5
