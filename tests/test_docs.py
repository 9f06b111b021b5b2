"""The documentation's examples run: every ```python block of README.md and docs/.

The blocks of one Markdown file run in order in one namespace (a later block
may use what an earlier one defined), in a temporary working directory, like
doctest runs the examples of one docstring. An HTML comment on the line before
a block (invisible on the site) changes how it is run:

* ``<!-- slow -->``: the block takes minutes; it runs only in the slow test
  (``make test-all``), together with the file's other blocks.
* ``<!-- skip: reason -->``: never run (a fragment that cannot run alone); the
  reason is required.

Tracebacks name the Markdown file and its line numbers. The tutorial notebooks
in docs/tutorials/ are executed by the slow notebook test below.
"""
import dataclasses
import os
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_TIMEOUT_SECONDS = 600

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>slow|skip)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class CodeBlock:
    """A fenced Python block: its code, first code line (1-based) and marker."""

    code: str
    line: int
    marker: str | None = None
    reason: str | None = None


def python_blocks(text):
    """The ```python blocks of a Markdown text, with their markers.

    Args:
        text: the Markdown source.

    Returns:
        A list of `CodeBlock`, in order.
    """
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group("fence"), match.group("info").lower()
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if info in ("python", "py", "python3"):
            marker = reason = None
            previous = i - 1
            while previous >= 0 and not lines[previous].strip():
                previous -= 1
            marker_match = _MARKER.match(lines[previous]) if previous >= 0 else None
            if marker_match:
                marker = marker_match.group("kind")
                reason = marker_match.group("reason")
                if marker == "skip" and not reason:
                    raise ValueError(
                        f"A `<!-- skip -->` marker needs a reason (`<!-- skip: why -->`). "
                        f"Received: line={previous + 1}"
                    )
            indent = len(match.group("indent"))
            code = "\n".join(line[indent:] if line[:indent].isspace() else line
                             for line in lines[start:end])
            blocks.append(CodeBlock(code + "\n", start + 1, marker, reason))
        i = end + 1
    return blocks


def _markdown_files():
    files = [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))
    return [f for f in files if python_blocks(f.read_text(encoding="utf-8"))]


def _run_blocks(path, blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        # Leading newlines make tracebacks point at the Markdown's own lines.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(path.relative_to(REPO)), "exec"), namespace)
    try:
        import matplotlib.pyplot as plt
        plt.close("all")
    except ImportError:
        pass


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_examples(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    fast = [b for b in blocks if b.marker is None]
    if any(b.marker == "slow" for b in blocks):
        # A fast block after a slow one may use what the slow one defined.
        first_slow = next(i for i, b in enumerate(blocks) if b.marker == "slow")
        fast = [b for b in blocks[:first_slow] if b.marker is None]
    if not fast:
        pytest.skip("only slow or skipped blocks")
    _run_blocks(path, fast, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [p for p in _markdown_files()
     if any(b.marker == "slow" for b in python_blocks(p.read_text(encoding="utf-8")))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_markdown_examples_slow(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    _run_blocks(path, [b for b in blocks if b.marker != "skip"], tmp_path, monkeypatch)


def test_block_extraction():
    text = (
        "Intro\n"                      # 1
        "```python\n"                  # 2
        "a = 1\n"                      # 3
        "```\n"                        # 4
        "<!-- slow -->\n"              # 5
        "```python\n"                  # 6
        "b = a + 1\n"                  # 7
        "c = 3\n"                      # 8
        "```\n"                        # 9
        "```sh\n"                      # 10
        "make test\n"                  # 11
        "```\n"                        # 12
        "<!-- skip: needs a GPU -->\n"  # 13
        "\n"                           # 14
        "````python\n"                 # 15
        "```\n"                        # 16
        "````\n"                       # 17
        "  ```python\n"                # 18
        "  d = 4\n"                    # 19
        "  ```\n"                      # 20
    )
    assert python_blocks(text) == [
        CodeBlock("a = 1\n", 3),
        CodeBlock("b = a + 1\nc = 3\n", 7, "slow"),
        CodeBlock("```\n", 16, "skip", "needs a GPU"),
        CodeBlock("d = 4\n", 19),
    ]
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks("<!-- skip -->\n```python\nx = 1\n```\n")


def test_tracebacks_name_markdown_lines(tmp_path, monkeypatch):
    page = REPO / "docs" / "page_for_the_traceback_test.md"
    blocks = python_blocks("text\n\n```python\nx = 1\ny = x / 0\n```\n")
    with pytest.raises(ZeroDivisionError) as error:
        _run_blocks(page, blocks, tmp_path, monkeypatch)
    frame = error.traceback[-1]
    assert str(frame.path) == "docs/page_for_the_traceback_test.md"
    assert frame.lineno + 1 == 5  # pytest's line numbers are 0-based


def _notebooks():
    return sorted((REPO / "docs" / "tutorials").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_tutorial_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    # The kernel draws with the inline backend (PNG outputs), which ipykernel
    # picks only when MPLBACKEND is unset.
    env_backend = os.environ.pop("MPLBACKEND", None)
    try:
        nbclient.NotebookClient(
            notebook, timeout=NOTEBOOK_TIMEOUT_SECONDS, kernel_name="python3",
            resources={"metadata": {"path": str(REPO)}},
        ).execute()
    finally:
        if env_backend is not None:
            os.environ["MPLBACKEND"] = env_backend
    # Each notebook checks its own numbers with asserts; it must also draw.
    images = [
        output for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.get("outputs", []) if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} drew no figure"


def test_readme_links_resolve():
    """README's relative links (to the site's pages in docs/) name existing files."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [t for t in targets if "://" not in t]
    assert {"docs/linearize.md", "docs/api/index.md", "CHANGELOG.md", "LICENSE"} <= set(relative)
    assert [t for t in relative if not (REPO / t).exists()] == []


def test_every_public_module_has_an_api_page():
    modules = {p.stem for p in (REPO / "keras_ntk").glob("*.py") if not p.name.startswith("_")}
    pages = {p.stem for p in (REPO / "docs" / "api").glob("*.md")} - {"index"}
    assert modules == pages
    for module in modules:
        page = (REPO / "docs" / "api" / f"{module}.md").read_text(encoding="utf-8")
        assert f"::: keras_ntk.{module}" in page
    mkdocs = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    assert [m for m in modules if f"api/{m}.md" not in mkdocs] == []


def test_site_builds_strict(tmp_path):
    """`make docs`: mkdocs --strict (no warning from links, griffe or autorefs)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    import subprocess
    import sys
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = [p.stem for p in (REPO / "keras_ntk").glob("*.py") if not p.name.startswith("_")]
    for module in modules:
        assert (site / "api" / f"{module}.html").exists()
    reference = (site / "api" / "ntk.html").read_text(encoding="utf-8")
    assert 'id="keras_ntk.ntk.empirical_ntk"' in reference
    for notebook in _notebooks():
        assert (site / "tutorials" / f"{notebook.stem}.html").exists()
