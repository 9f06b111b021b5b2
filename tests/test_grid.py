"""Tests of experiments/grid.py: the cell loop shared by the study binaries.

References: the records written by hand into the store, and the list of cells a
`compute` function was called with.
"""

import logging as std_logging

import pytest

from experiments import cells, grid


def _grid(tmp_path, settings, overwrite=False):
    store = cells.CellStore(str(tmp_path), overwrite=overwrite)
    return store, grid.Grid(store, [(key, value, key.upper()) for key, value in settings.items()])


SETTINGS = {"a": {"rate": 0.1, "seed": 0}, "b": {"rate": 0.1, "seed": 1},
            "c": {"rate": 0.1, "seed": 2}}


def test_only_unfinished_cells_are_computed_in_order_and_stored(tmp_path, caplog):
    store, cell_grid = _grid(tmp_path, SETTINGS)
    store.put("b", SETTINGS["b"], {"value": 20})
    computed, after = [], []

    def compute(key):
        computed.append(key)
        return {"value": 10 * (ord(key) - ord("a") + 1)}

    with caplog.at_level(std_logging.INFO):
        records = cell_grid.run(compute, after_each=lambda key, record: after.append(key))
    assert computed == ["a", "c"] and after == ["a", "c"]
    assert records == {"a": {"value": 10}, "b": {"value": 20}, "c": {"value": 30}}
    assert store.get("c", SETTINGS["c"]) == {"value": 30}
    # Finished cells are logged as skipped by their label, with the grid's counts.
    assert "cell 1 of 3 (B): already finished, skipped" in caplog.text
    assert "cell 3 of 3 (C) done" in caplog.text


def test_a_stale_cell_anywhere_in_the_grid_is_refused_before_any_work(tmp_path):
    store, cell_grid = _grid(tmp_path, SETTINGS)
    store.put("c", dict(SETTINGS["c"], rate=0.2), {"value": 30})  # The LAST cell is stale.
    computed = []
    with pytest.raises(ValueError, match=r"Cell 'c' .*rate: 0.2 \(stored\) → 0.1 \(now\)"):
        cell_grid.run(lambda key: computed.append(key) or {})
    assert computed == []  # Refused before the first (unfinished) cell was computed.
    # The refusal also comes from a check of several grids before any of them runs.
    _, other = _grid(tmp_path / "unused", {"x": {}})
    _, same = _grid(tmp_path, SETTINGS)
    with pytest.raises(ValueError, match="rate"):
        grid.check_all(other, same)


def test_overwrite_discards_stale_cells_before_any_work_and_recomputes_them(tmp_path):
    store, _ = _grid(tmp_path, SETTINGS)
    store.put("a", SETTINGS["a"], {"value": 1})
    store.put("c", dict(SETTINGS["c"], rate=0.2), {"value": 3})
    _, cell_grid = _grid(tmp_path, SETTINGS, overwrite=True)
    assert cell_grid.check() == {"a": {"value": 1}, "b": None, "c": None}
    assert not (tmp_path / "cells" / "c.json").exists()  # Discarded by the check.
    records = cell_grid.run(lambda key: {"value": key})
    assert records == {"a": {"value": 1}, "b": {"value": "b"}, "c": {"value": "c"}}


def test_max_new_stops_after_that_many_new_cells(tmp_path, caplog):
    store, cell_grid = _grid(tmp_path, SETTINGS)
    with caplog.at_level(std_logging.INFO):
        records = cell_grid.run(lambda key: {"value": key}, max_new=2)
    assert records == {"a": {"value": "a"}, "b": {"value": "b"}, "c": None}
    assert "Stopping after 2 new cell(s) (max_new_cells)." in caplog.text
    assert store.get("c", SETTINGS["c"]) is None


def test_points_and_intermediate_files_of_a_cell(tmp_path):
    store = cells.CellStore(str(tmp_path))
    cell_grid = grid.Grid(store, [("w8-s0", {"w": 8}, "width 8", (8, 0))], name="run")
    assert cell_grid.points == {"w8-s0": (8, 0)}

    def compute(key):
        (tmp_path / "cells" / key).mkdir(parents=True, exist_ok=True)
        (tmp_path / "cells" / key / "partial.npz").write_bytes(b"x")
        return {"width": cell_grid.points[key][0]}

    assert cell_grid.run(compute, discard_cell_dir=True) == {"w8-s0": {"width": 8}}
    assert not (tmp_path / "cells" / "w8-s0").exists()
