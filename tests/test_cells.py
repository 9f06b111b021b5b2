"""Tests of experiments/cells.py: the cell store and atomic files."""

import json
import logging as std_logging
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from experiments import cells

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"dataset": "digits", "learning_rate": 0.05, "widths": (32, 16), "seed": 0}


def _no_temporary_files(directory):
    return [os.path.join(r, f) for r, _, files in os.walk(directory) for f in files
            if ".tmp-" in f]


def _small_model(width=4):
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(width, activation="relu"),
                             keras.layers.Dense(1)])


def test_a_stored_cell_is_returned_under_equal_settings(tmp_path):
    store = cells.CellStore(str(tmp_path))
    assert store.get("mlp-seed0", SETTINGS) is None
    store.put("mlp-seed0", SETTINGS, {"accuracy": 0.75, "curve": [1.0, 0.5]})
    # A fresh store (a rerun); a tuple and a list are the same setting.
    again = cells.CellStore(str(tmp_path))
    same = dict(SETTINGS, widths=[32, 16])
    assert again.get("mlp-seed0", same) == {"accuracy": 0.75, "curve": [1.0, 0.5]}
    stored = json.loads((tmp_path / "cells" / "mlp-seed0.json").read_text())
    assert stored["settings"]["widths"] == [32, 16]
    # The hash is the SHA-256 of the sorted, compact canonical JSON.
    import hashlib
    text = json.dumps({"dataset": "digits", "learning_rate": 0.05, "seed": 0,
                       "widths": [32, 16]}, sort_keys=True, separators=(",", ":"))
    assert stored["settings_hash"] == hashlib.sha256(text.encode()).hexdigest()
    assert not _no_temporary_files(tmp_path)


def test_a_changed_setting_is_refused_naming_it(tmp_path):
    store = cells.CellStore(str(tmp_path))
    store.put("mlp-seed0", SETTINGS, {"accuracy": 0.75})
    changed = dict(SETTINGS, learning_rate=0.1, widths=(32, 8))
    with pytest.raises(ValueError) as error:
        cells.CellStore(str(tmp_path)).get("mlp-seed0", changed)
    message = str(error.value)
    assert "learning_rate: 0.05 (stored) → 0.1 (now)" in message
    assert "widths: [32, 16] (stored) → [32, 8] (now)" in message
    assert "dataset" not in message.split("Received:")[0].split("settings:")[1]
    assert "--overwrite" in message and "new output_dir" in message
    assert message.endswith("Received: learning_rate=0.1, widths=[32, 8]")
    # Nothing was deleted.
    assert cells.CellStore(str(tmp_path)).get("mlp-seed0", SETTINGS) == {"accuracy": 0.75}
    # A setting that appears or disappears is named too.
    with pytest.raises(ValueError, match=r"momentum: '<absent>' \(stored\) → 0.9 \(now\)"):
        cells.CellStore(str(tmp_path)).get("mlp-seed0", dict(SETTINGS, momentum=0.9))


def test_check_all_reads_every_cell_and_refuses_a_stale_one_wherever_it_is(tmp_path):
    store = cells.CellStore(str(tmp_path))
    grid = {f"mlp-seed{s}": dict(SETTINGS, seed=s) for s in range(3)}
    store.put("mlp-seed1", grid["mlp-seed1"], {"accuracy": 0.5})
    finished = []
    assert cells.CellStore(str(tmp_path)).check_all(grid, on_finished=finished.append) == {
        "mlp-seed0": None, "mlp-seed1": {"accuracy": 0.5}, "mlp-seed2": None}
    assert finished == ["mlp-seed1"]
    # The last cell stored under another rate: refused although the first is unfinished.
    store.put("mlp-seed2", dict(grid["mlp-seed2"], learning_rate=0.1), {"accuracy": 0.25})
    with pytest.raises(ValueError, match=r"Cell 'mlp-seed2'.*learning_rate: 0.1 \(stored\) → "
                                         r"0.05 \(now\)"):
        cells.CellStore(str(tmp_path)).check_all(grid)


def test_a_changed_architecture_is_named_by_its_config_path(tmp_path):
    store = cells.CellStore(str(tmp_path))
    store.put("init", {"model": cells.architecture(_small_model(4))}, {})
    keras.backend.clear_session()
    # Same architecture built later in the process (other layer names): accepted.
    assert cells.CellStore(str(tmp_path)).get(
        "init", {"model": cells.architecture(_small_model(4))}) == {}
    with pytest.raises(ValueError, match=r"model\.layers\[1\]\.config\.units: 4 \(stored\) → "
                                         r"8 \(now\)"):
        cells.CellStore(str(tmp_path)).get("init", {"model": cells.architecture(_small_model(8))})


def test_overwrite_discards_only_stale_cells_and_their_files(tmp_path):
    store = cells.CellStore(str(tmp_path))
    store.get("a", SETTINGS)
    np.save(os.path.join(store.cell_dir("a"), "partial.npy"), np.ones(3))
    store.put("a", SETTINGS, {"value": 1})
    store.put("b", dict(SETTINGS, learning_rate=0.1), {"value": 2})
    fresh = cells.CellStore(str(tmp_path), overwrite=True)
    assert fresh.get("a", dict(SETTINGS, learning_rate=0.1)) is None
    assert not (tmp_path / "cells" / "a.json").exists()
    assert not (tmp_path / "cells" / "a").exists()
    # A cell stored under the current settings is kept.
    assert fresh.get("b", dict(SETTINGS, learning_rate=0.1)) == {"value": 2}
    fresh.put("a", dict(SETTINGS, learning_rate=0.1), {"value": 3})
    assert cells.CellStore(str(tmp_path)).get("a", dict(SETTINGS, learning_rate=0.1)) == {
        "value": 3}


def test_a_cell_cut_short_is_checked_by_its_stamped_settings(tmp_path):
    store = cells.CellStore(str(tmp_path))
    assert store.get("cell", SETTINGS) is None
    directory = store.cell_dir("cell")
    cells.write_json_atomic(os.path.join(directory, "stages.json"), {"network": 0.5})
    # Killed here: no record. A rerun with the same settings resumes from the files.
    store = cells.CellStore(str(tmp_path))
    assert store.get("cell", SETTINGS) is None
    assert cells.load_json(os.path.join(store.cell_dir("cell"), "stages.json")) == {
        "network": 0.5}
    with pytest.raises(ValueError, match=r"learning_rate: 0.05 \(stored\) → 0.2 \(now\)"):
        cells.CellStore(str(tmp_path)).get("cell", dict(SETTINGS, learning_rate=0.2))
    store = cells.CellStore(str(tmp_path), overwrite=True)
    assert store.get("cell", dict(SETTINGS, learning_rate=0.2)) is None
    assert not os.path.exists(os.path.join(directory, "stages.json"))
    store.cell_dir("cell")
    assert cells.load_json(os.path.join(directory, "settings.json"))["learning_rate"] == 0.2


def test_put_can_discard_the_intermediate_files(tmp_path):
    store = cells.CellStore(str(tmp_path))
    store.get("c", SETTINGS)
    store.cell_dir("c")
    store.put("c", SETTINGS, {"x": 1}, discard_cell_dir=True)
    assert not (tmp_path / "cells" / "c").exists()
    assert cells.CellStore(str(tmp_path)).get("c", SETTINGS) == {"x": 1}


@pytest.mark.parametrize("key", ["a/b", "../x", "", ".hidden", "a b"])
def test_keys_are_single_safe_path_components(tmp_path, key):
    with pytest.raises(ValueError, match="Received: key="):
        cells.CellStore(str(tmp_path)).get(key, {})


def test_settings_must_be_json_able(tmp_path):
    with pytest.raises(TypeError, match="JSON-able"):
        cells.CellStore(str(tmp_path)).get("a", {"model": object()})


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _capture_absl_warnings(caplog):
    caplog.set_level(std_logging.WARNING, logger="absl")


def test_truncated_files_are_discarded_and_recomputed(tmp_path, caplog):
    _capture_absl_warnings(caplog)
    vectors = np.random.RandomState(0).normal(size=(40, 5))
    npz_path = str(tmp_path / "eigen.npz")
    cells.save_npz_atomic(npz_path, eigenvectors=vectors)
    np.testing.assert_array_equal(cells.load_or_discard(npz_path, cells.load_npz)["eigenvectors"],
                                  vectors)
    json_path = str(tmp_path / "stages.json")
    cells.write_json_atomic(json_path, {"network": {"test": 0.9}})
    model = _small_model()
    weights_path = str(tmp_path / "init.weights.h5")
    cells.save_weights_atomic(model, weights_path)
    reference = [w.numpy() for w in model.weights]

    for path in (npz_path, json_path, weights_path):
        _truncate(path)
    assert cells.load_or_discard(npz_path, cells.load_npz) is None
    assert cells.load_or_discard(json_path, cells.load_json) is None
    other = _small_model()
    assert not cells.load_weights_or_discard(other, weights_path)
    for path in (npz_path, json_path, weights_path):
        assert not os.path.exists(path)
        assert any(path in r.getMessage() and "Discarding" in r.getMessage()
                   for r in caplog.records), path

    # The caller computes again, and the new files read back exactly.
    cells.save_npz_atomic(npz_path, eigenvectors=vectors)
    cells.save_weights_atomic(model, weights_path)
    assert cells.load_weights_or_discard(other, weights_path)
    for got, want in zip(other.weights, reference):
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(cells.load_npz(npz_path)["eigenvectors"], vectors)
    assert not _no_temporary_files(tmp_path)


def test_a_truncated_record_is_recomputed(tmp_path, caplog):
    _capture_absl_warnings(caplog)
    store = cells.CellStore(str(tmp_path))
    store.put("a", SETTINGS, {"value": 1.5})
    _truncate(tmp_path / "cells" / "a.json", keep=0.6)
    assert cells.CellStore(str(tmp_path)).get("a", SETTINGS) is None
    assert any("a.json" in r.getMessage() for r in caplog.records)


def test_save_weights_atomic_keeps_the_keras_suffix(tmp_path, monkeypatch):
    seen = []
    model = _small_model()
    original = model.save_weights
    monkeypatch.setattr(model, "save_weights", lambda p: (seen.append(p), original(p)))
    cells.save_weights_atomic(model, str(tmp_path / "w.weights.h5"))
    (temporary,) = seen
    assert temporary.endswith(".weights.h5") and ".tmp-" in temporary
    assert os.listdir(tmp_path) == ["w.weights.h5"]
    with pytest.raises(ValueError, match="Received: path="):
        cells.save_weights_atomic(model, str(tmp_path / "w.h5"))


_KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from experiments import cells
    path = sys.argv[1]

    def write_half_then_die(temporary):
        with open(temporary, "wb") as f:
            f.write(b"PK" + b"x" * 1000)
            f.flush()
        os._exit(9)  # Killed in the middle of the write: no rename, no cleanup.

    cells._commit(write_half_then_die, path)
""")


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    target = tmp_path / "cells" / "k" / "eigen.npz"
    cells.save_npz_atomic(str(target), v=np.arange(3))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr[-2000:]
    (left,) = _no_temporary_files(tmp_path)
    assert left.endswith(".npz") and os.path.dirname(left) == str(target.parent)
    # The target still holds the last complete write.
    np.testing.assert_array_equal(cells.load_npz(str(target))["v"], np.arange(3))
    # A temporary file of a live writer (this process) is left alone.
    alive = cells.temporary_path(str(tmp_path / "results.json"))
    open(alive, "w").close()
    cells.CellStore(str(tmp_path))
    assert _no_temporary_files(tmp_path) == [alive]
    os.remove(alive)


def test_progress_counts_and_eta(monkeypatch, caplog):
    caplog.set_level(std_logging.INFO, logger="absl")
    clock = iter([100.0, 130.0, 190.0])
    monkeypatch.setattr(cells, "_now", lambda: next(clock))
    progress = cells.Progress(5, "phase cell")  # starts at t=100
    progress.skip("a")
    progress.finish("b")  # 30 s for 1 computed cell, 3 cells left: 90 s.
    progress.finish("c")  # 90 s for 2 computed cells, 2 left: 90 s.
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "phase cell 1 of 5 (a): already finished, skipped",
        "phase cell 2 of 5 (b) done; elapsed 30 s, ETA 90 s",
        "phase cell 3 of 5 (c) done; elapsed 90 s, ETA 90 s",
    ]


def test_summary_writer_is_closed_and_holds_the_scalars(tmp_path):
    log_dir = str(tmp_path / "tb")
    with cells.summary_writer(log_dir) as writer:
        with writer.as_default():
            for step in range(3):
                tf.summary.scalar("accuracy", 0.25 * step, step=step)
    # Closed: writing again through it is a no-op error-free, and the file is complete.
    (event_file,) = tf.io.gfile.glob(os.path.join(log_dir, "events.*"))
    values = {}
    for event in tf.compat.v1.train.summary_iterator(event_file):
        for value in event.summary.value:
            values[event.step] = float(tf.make_ndarray(value.tensor))
    assert values == {0: 0.0, 1: 0.25, 2: 0.5}


def test_log_scalars_writes_each_step_and_tag(tmp_path):
    log_dir = str(tmp_path / "tb")
    cells.log_scalars(log_dir, {1: {"a": 0.5, "b": 2.0}, 4: {"a": 0.25}})
    (event_file,) = tf.io.gfile.glob(os.path.join(log_dir, "events.*"))
    values = {(event.step, value.tag): float(tf.make_ndarray(value.tensor))
              for event in tf.compat.v1.train.summary_iterator(event_file)
              for value in event.summary.value}
    assert values == {(1, "a"): 0.5, (1, "b"): 2.0, (4, "a"): 0.25}


def test_initial_weights_are_drawn_once_with_the_seed_and_read_back(tmp_path):
    path = str(tmp_path / "init" / "theta0.weights.h5")
    keras.utils.set_random_seed(3)
    expected = [w.numpy() for w in _small_model().weights]  # The seeded draw, by hand.
    assert cells.initial_weights(_small_model, path, seed=3) == path
    saved = _small_model()
    saved.load_weights(path)
    for got, want in zip(saved.weights, expected):
        np.testing.assert_array_equal(got.numpy(), want)
    # Read back, not drawn again, whatever the seed; a truncated file is drawn again.
    mtime = os.path.getmtime(path)
    assert cells.initial_weights(_small_model, path, seed=4) == path
    assert os.path.getmtime(path) == mtime
    _truncate(tmp_path / "init" / "theta0.weights.h5", keep=0.5)
    cells.initial_weights(_small_model, path, seed=3)
    again = _small_model()
    again.load_weights(path)
    np.testing.assert_array_equal(again.weights[0].numpy(), expected[0])
