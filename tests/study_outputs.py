"""Helpers of the study binaries' tests: results compared to rounding, a stale stored cell.

Test modules import it (pytest puts tests/ on sys.path). A rerun in another
process may differ in the last bits of LAPACK results (threaded sums), never in
structure, labels or verdicts: `assert_same_results`.
"""

import contextlib
import json
import os

import pytest


@contextlib.contextmanager
def configured_run(study, run, gin_file, bindings=()):
    """`run` registered and configured as the launcher does (gin_configs/`gin_file`,
    `bindings`), in-process; gin's config is cleared on exit."""
    import gin

    from experiments import launcher

    configured = launcher.configurable(study, run)
    gin.add_config_file_search_path(launcher.GIN_CONFIGS_DIR)
    gin.parse_config_files_and_bindings([os.path.join(launcher.GIN_CONFIGS_DIR, gin_file)],
                                        list(bindings))
    try:
        yield configured
    finally:
        gin.clear_config()


def make_stale(cells_dir, unfinished, stale, setting, value):
    """Deletes the record of cell `unfinished` and stores `setting=value` in cell `stale`'s.

    A rerun must then compute `unfinished` and refuse `stale`: the check of
    every stored cell before any work is tested by the refusal coming first.
    """
    (cells_dir / f"{unfinished}.json").unlink()
    path = cells_dir / f"{stale}.json"
    stored = json.loads(path.read_text())
    stored["settings"][setting] = value
    path.write_text(json.dumps(stored))


def numbers_and_rest(value, skip=(), path=""):
    """([(path, number)], [(path, other leaf)]) of a JSON tree; keys in `skip` left out."""
    if isinstance(value, dict):
        parts = [numbers_and_rest(v, skip, f"{path}.{k}") for k, v in sorted(value.items())
                 if k not in skip]
    elif isinstance(value, list):
        parts = [numbers_and_rest(v, skip, f"{path}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, value)], []
    else:
        return [], [(path, value)]
    return ([n for numbers, _ in parts for n in numbers], [r for _, rest in parts for r in rest])


def assert_same_results(got, want, skip=(), rel=1e-9, abs=1e-12):
    """Same structure and non-numeric leaves; numbers equal to `rel`/`abs`."""
    got_numbers, got_rest = numbers_and_rest(got, skip)
    want_numbers, want_rest = numbers_and_rest(want, skip)
    assert got_rest == want_rest
    assert [p for p, _ in got_numbers] == [p for p, _ in want_numbers]
    assert [v for _, v in got_numbers] == pytest.approx([v for _, v in want_numbers],
                                                        rel=rel, abs=abs)
