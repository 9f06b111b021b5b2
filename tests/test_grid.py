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


def test_groups_compute_several_cells_at_once_and_a_skip_stores_nothing(tmp_path, caplog):
    store = cells.CellStore(str(tmp_path))
    settings = {"k-a": {"m": "a"}, "k-b": {"m": "b"}, "inf": {"m": "inf"}}
    complete = {"k-a": True, "k-b": True}
    cell_grid = grid.Grid(store, list(settings.items()), groups=[
        ("k-a,k-b", ("kernel", 0), ["k-a", "k-b"]), ("inf", ("infinite", 0), ["inf"])],
        complete=lambda key, record: complete[key])
    calls = []

    def compute(point):
        calls.append(point)
        if point[0] == "infinite":
            raise grid.CellSkipped("no closed form")
        return {"k-a": {"v": 1}, "k-b": {"v": 2}}

    with caplog.at_level(std_logging.INFO):
        records = cell_grid.run(compute)
    assert calls == [("kernel", 0), ("infinite", 0)]
    assert records == {"k-a": {"v": 1}, "k-b": {"v": 2}, "inf": None}
    assert "cell 2 of 2 (inf): no closed form, skipped" in caplog.text
    assert cell_grid.finished and not (tmp_path / "cells" / "inf.json").exists()
    # A stored record that lacks its file (`complete` False) is computed again, with its group.
    complete["k-b"] = False
    again = grid.Grid(store, list(settings.items()), groups=cell_grid.items[:1],
                      complete=lambda key, record: complete[key])
    assert again.check() == {"k-a": {"v": 1}, "k-b": None, "inf": None}
    calls.clear()
    again.run(compute)
    assert calls == [("kernel", 0)]


def test_a_stale_shared_cell_is_refused_with_the_grid(tmp_path):
    store = cells.CellStore(str(tmp_path))
    assert store.get("init-seed0", {"seed": 0, "rate": 0.1}) is None
    store.cell_dir("init-seed0")  # Intermediate files stamped with their settings (θ0).
    cell_grid = grid.Grid(cells.CellStore(str(tmp_path)), [("a", {"seed": 0})],
                          shared={"init-seed0": {"seed": 0, "rate": 0.2}})
    computed = []
    with pytest.raises(ValueError, match=r"Cell 'init-seed0'.*rate: 0.1 \(stored\) → 0.2"):
        cell_grid.run(lambda key: computed.append(key) or {})
    assert computed == []


def test_gathered_waits_for_every_shard_and_excuses_cells_without_records(tmp_path):
    settings = [(f"c{i}", {"i": i}) for i in range(4)]
    shards = [grid.Grid(cells.CellStore(str(tmp_path), shard=(i, 2)), settings) for i in range(2)]
    shards[0].run(lambda key: {"value": key})
    assert shards[0].gathered() is None  # c1, c3 belong to shard 1.
    shards[1].run(lambda key: None if key == "c3" else {"value": key})
    (tmp_path / "cells" / "c3.json").unlink()  # c3 stands for a cell that has no record.
    merge = grid.Grid(cells.CellStore(str(tmp_path), shard=cells.MERGE), settings)
    assert merge.gathered() is None
    assert merge.gathered(excuse=lambda key: "no record" if key == "c3" else None) == {
        "c0": {"value": "c0"}, "c1": {"value": "c1"}, "c2": {"value": "c2"}, "c3": None}
    # Unsharded: this run's records, None for cells it did not compute.
    whole = grid.Grid(cells.CellStore(str(tmp_path)), settings)
    assert whole.gathered()["c3"] is None
