"""The cell store shared by the study binaries, and atomic files.

A study is a grid of cells (a model × task × seed, a σw² × depth, a width,
...). Each finished cell is one record, stored with the full settings that
produced it, so that a rerun into the same output directory either reuses
it (same settings), refuses to mix it with new ones (other settings: a
ValueError naming every setting that differs, old and new value) or, with
`overwrite=True` (the binaries' `--overwrite`), discards it and computes it
again. On disk, under `<output_dir>/cells/`:

* `<key>.json`: {"key", "settings", "settings_hash", "record"}, written
  atomically when the cell is finished (`CellStore.put`);
* `<key>/`: the cell's intermediate files (`CellStore.cell_dir`: fit
  backups, stage weights, eigenvectors, ...), stamped with the settings
  they were computed under (`<key>/settings.json`), so a cell cut short and
  resumed under other settings is refused or discarded like a finished one.

Every file is written atomically (`write_json_atomic`, `save_npz_atomic`,
`save_weights_atomic`): into a temporary file next to the target whose name
keeps the target's suffix (Keras requires `.weights.h5`) and carries this
host and process id, then renamed over the target. Temporary files left by
killed writers are removed when a store is opened
(`remove_temporary_files`). A file that is nevertheless truncated or corrupt
(written by older code, or damaged) is discarded with a log line naming it
by `load_or_discard`, and the caller computes it again.

Shards (`--shard=i/n`, `docs/scaling.md`): n jobs share one output
directory, each computing every n-th cell of the grid (`CellStore.mine`);
cells are separate files written atomically, so shards never collide. A
shard that finishes while cells of other shards are missing says which and
writes no results.json (`CellStore.gather`); the last one to finish (or a
run with `--merge`, which computes nothing) writes results.json and figures.

All paths go through `tf.io.gfile`, so the output directory may be `gs://`.
"""

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import socket
import time
import uuid
import zipfile

import numpy as np
from absl import logging

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
# "<stem>.tmp-<host>-<pid>-<random><suffix>"
_TEMPORARY = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{12}(\.|$)")
# Temporary files of another host (or of an unknown process) are left alone
# for this long: a writer elsewhere may still be renaming them.
_FOREIGN_TEMPORARY_SECONDS = 24 * 3600
_SETTINGS_STAMP = "settings.json"
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
               pickle.UnpicklingError)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


# ---------------------------------------------------------------- atomic files


def _split_suffix(name):
    if name.endswith(".weights.h5"):
        return name[: -len(".weights.h5")], ".weights.h5"
    return os.path.splitext(name)


def temporary_path(path):
    """A fresh temporary name next to `path`, keeping its suffix.

    `dir/x.weights.h5` → `dir/x.tmp-<host>-<pid>-<random>.weights.h5`.
    """
    directory, name = os.path.split(path)
    stem, suffix = _split_suffix(name)
    return os.path.join(
        directory, f"{stem}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}")


def _commit(write, path):
    """Runs `write(temporary)` then renames the temporary file over `path`."""
    gfile = _gfile()
    directory = os.path.dirname(path)
    if directory:
        gfile.makedirs(directory)
    temporary = temporary_path(path)
    try:
        write(temporary)
        gfile.rename(temporary, path, overwrite=True)
    except BaseException:
        if gfile.exists(temporary):
            gfile.remove(temporary)
        raise


def _write_bytes(path, data):
    with _gfile().GFile(path, "wb") as f:
        f.write(data)


def write_json_atomic(path, obj):
    """Writes `obj` as JSON to `path` atomically (temporary file, then rename)."""
    _commit(lambda t: _write_bytes(t, json.dumps(obj, indent=1).encode("utf-8")), path)


def save_npz_atomic(path, **arrays):
    """Writes `arrays` as an uncompressed .npz to `path` atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _commit(lambda t: _write_bytes(t, buffer.getvalue()), path)


def save_weights_atomic(model, path):
    """`model.save_weights(path)` atomically; `path` must end in `.weights.h5`."""
    if not str(path).endswith(".weights.h5"):
        raise ValueError(
            f"Expected a path ending in '.weights.h5' (Keras' weights format). Received: "
            f"path={path!r}")
    _commit(model.save_weights, str(path))


def load_json(path):
    """The JSON object in `path`."""
    with _gfile().GFile(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def load_npz(path):
    """The arrays of the .npz file `path`, as a dict (fully read)."""
    with _gfile().GFile(path, "rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}


def load_or_discard(path, loader):
    """`loader(path)`, or None when `path` is missing, truncated or corrupt.

    An unreadable file is deleted with a warning naming it and the error, so
    that the caller computes it again.

    Args:
        path: the file.
        loader: a function of the path (`load_json`, `load_npz`,
            `model.load_weights`, ...).

    Returns:
        What `loader` returned (None for `model.load_weights`: test the
        result against None only for loaders that return something), or
        None when the file is missing or was discarded.
    """
    import tensorflow as tf

    gfile = _gfile()
    if not gfile.exists(path):
        return None
    try:
        return loader(path)
    except (*_UNREADABLE, tf.errors.OpError) as error:
        logging.warning("Discarding %s: unreadable (%s: %s); it will be computed again.",
                        path, type(error).__name__, str(error).splitlines()[0][:200]
                        if str(error) else "")
        if gfile.isdir(path):
            gfile.rmtree(path)
        else:
            gfile.remove(path)
        return None


def load_weights_or_discard(model, path):
    """Loads `path` into `model`; False (file discarded) when missing or unreadable."""
    return load_or_discard(path, lambda p: model.load_weights(p) or True) is not None


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporary_files(directory):
    """Deletes temporary files of killed writers under `directory`; returns their paths.

    A temporary file of this host whose process is gone is removed; one of
    another host only when it is over a day old (it may still be written).
    """
    gfile = _gfile()
    removed = []
    if not gfile.isdir(directory):
        return removed
    now = time.time()
    for root, _, files in gfile.walk(directory):
        for name in files:
            match = _TEMPORARY.search(name)
            if match is None:
                continue
            path = os.path.join(root, name)
            if match["host"] == _HOST:
                stale = not _process_alive(int(match["pid"]))
            else:
                stale = now - gfile.stat(path).mtime_nsec / 1e9 > _FOREIGN_TEMPORARY_SECONDS
            if stale:
                gfile.remove(path)
                removed.append(path)
    if removed:
        logging.info("Removed %d temporary file(s) left by killed writes: %s", len(removed),
                     ", ".join(removed))
    return removed


# ---------------------------------------------------------------- settings


def _canonical(value):
    """`value` as plain JSON types (tuples → lists, numpy → Python)."""
    return json.loads(json.dumps(value, default=_json_default, sort_keys=True))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(
        f"Settings must be JSON-able (numbers, strings, lists, dicts). Received: "
        f"{type(value).__name__} {value!r}")


def settings_hash(settings):
    """SHA-256 of the canonical JSON of `settings` (sorted keys)."""
    text = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out or {prefix: []}
    return {prefix: value}


_MISSING = "<absent>"


def settings_differences(old, new):
    """[(name, old value, new value)] of the settings that differ (dotted names)."""
    old, new = _flatten(_canonical(old)), _flatten(_canonical(new))
    return [(name, old.get(name, _MISSING), new.get(name, _MISSING))
            for name in sorted(set(old) | set(new))
            if old.get(name, _MISSING) != new.get(name, _MISSING)]


def architecture(model):
    """A model's architecture as settings: its Keras config without layer names.

    Layer names depend on how many layers a process built before; the rest
    of the config (layers, sizes, activations, initializers) defines what a
    saved θ0 or a trained network is.
    """
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "name"}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        return value

    return _canonical(strip(model.get_config()))


# ---------------------------------------------------------------- shards

MERGE = "merge"
# The shard of this process, set by the launcher (`--shard`, `--merge`) before
# the study's `run` opens its store: None (every cell), (i, n) or MERGE.
_process_shard = None


def parse_shard(text):
    """(i, n) from "i/n" with 0 <= i < n, e.g. "1/4" → (1, 4)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(
            "Expected a shard 'i/n' with 0 <= i < n (shard i of n jobs, counted from 0). "
            f"Received: shard={text!r}")
    return int(match[1]), int(match[2])


def shard_from_tf_config(tf_config):
    """(i, n) of this task in a TF_CONFIG dict: i its rank among chief and workers.

    The cluster's chief (if any) comes first, then the workers in order;
    evaluators and parameter servers are not shards.
    """
    cluster = tf_config.get("cluster", {}) if isinstance(tf_config, dict) else {}
    task = tf_config.get("task", {}) if isinstance(tf_config, dict) else {}
    ranked = [("chief", i) for i in range(len(cluster.get("chief", [])))] + [
        ("worker", i) for i in range(len(cluster.get("worker", [])))]
    key = (task.get("type"), int(task.get("index", 0)))
    if key not in ranked:
        raise ValueError(
            "Expected TF_CONFIG to name a chief or worker task of its cluster (its rank is "
            f"the shard index). Received: TF_CONFIG task={task!r}, cluster types="
            f"{sorted(cluster)}")
    return ranked.index(key), len(ranked)


def set_process_shard(shard):
    """Sets the shard that `CellStore`s opened by this process use by default.

    Args:
        shard: None (every cell), (i, n), "i/n", or `MERGE` (no cell: only
            gather the finished ones).
    """
    global _process_shard
    if shard is None or shard == MERGE:
        _process_shard = shard
    elif isinstance(shard, str):
        _process_shard = parse_shard(shard)
    else:
        _process_shard = parse_shard(f"{shard[0]}/{shard[1]}")


def process_shard():
    """The shard set by `set_process_shard` (None, (i, n) or MERGE)."""
    return _process_shard


def _stable_index(key):
    return int(hashlib.sha256(str(key).encode("utf-8")).hexdigest()[:15], 16)


# ---------------------------------------------------------------- the store


class CellStore:
    """Finished cells of a study, each stored with the settings that produced it.

    Args:
        output_dir: the run's directory; cells live in `output_dir/cells/`.
        overwrite: discard a cell (record and intermediate files) stored
            under other settings instead of refusing to run.
        shard: which cells this process computes: None (all), (i, n) (the
            cells whose grid index is i modulo n, `mine`) or `MERGE` (none);
            default: the process' shard (`set_process_shard`, set by the
            launcher's `--shard`/`--merge`).

    Example:

    ```python
    store = CellStore(output_dir, overwrite=False)
    record = store.get("mlp-binary-seed0", settings)
    if record is None:
        backup = os.path.join(store.cell_dir("mlp-binary-seed0"), "backup")
        record = compute(...)
        store.put("mlp-binary-seed0", settings, record)
    ```

    A sharded loop skips the cells of other shards and builds results only
    from a complete grid (the binaries do not write this loop: they run
    `experiments.grid.Grid`, whose `run` and `gathered` are this loop):

    ```python
    for index, key in enumerate(keys):
        if store.get(key, settings[key]) is None and store.mine(index):
            store.put(key, settings[key], compute(key))
    records = store.gather({key: settings[key] for key in keys})
    if records is None:
        return None  # Other shards' cells are missing (logged): no results.json.
    ```
    """

    def __init__(self, output_dir, overwrite=False, shard="process"):
        self.output_dir = output_dir
        self.overwrite = bool(overwrite)
        if shard == "process":
            shard = _process_shard
        elif shard is not None and shard != MERGE:
            shard = parse_shard(shard if isinstance(shard, str) else f"{shard[0]}/{shard[1]}")
        self.shard = shard
        self.root = os.path.join(output_dir, "cells")
        self._claimed = {}
        remove_temporary_files(output_dir)

    def _check_key(self, key):
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(
                "Expected a cell key of letters, digits and . _ = , + - (no '/'), starting "
                f"with a letter or digit. Received: key={key!r}")

    def record_path(self, key):
        """The JSON file holding the finished cell `key`."""
        self._check_key(key)
        return os.path.join(self.root, f"{key}.json")

    def _dir(self, key):
        self._check_key(key)
        return os.path.join(self.root, key)

    def _refuse_or_discard(self, key, where, stored, settings):
        differences = settings_differences(stored, settings)
        if not differences:
            return False
        shown = "; ".join(f"{name}: {old!r} (stored) → {new!r} (now)"
                          for name, old, new in differences[:12])
        if len(differences) > 12:
            shown += f"; and {len(differences) - 12} more"
        if not self.overwrite:
            received = ", ".join(f"{name}={new!r}" for name, _, new in differences[:12])
            raise ValueError(
                f"Cell {key!r} in {self.output_dir} was computed with other settings: "
                f"{shown}. Rerun with --overwrite (CellStore(overwrite=True)) to discard "
                f"such cells and compute them again, or use a new output_dir. "
                f"Received: {received}")
        logging.warning("Discarding cell %s (%s), computed with other settings: %s",
                        key, where, shown)
        self.discard(key)
        return True

    def get(self, key, settings):
        """The record of the finished cell `key` computed with `settings`, or None.

        Raises:
            ValueError: the cell (finished, or its intermediate files) was
                computed with other settings, naming each one that differs,
                unless the store was opened with `overwrite=True`; then the
                stale cell is discarded and None returned.
        """
        settings = _canonical(settings)
        stored = load_or_discard(self.record_path(key), load_json)
        if stored is not None:
            if not isinstance(stored, dict) or "settings" not in stored or "record" not in stored:
                logging.warning("Discarding %s: not a cell record.", self.record_path(key))
                self.discard(key)
            elif not self._refuse_or_discard(key, "finished", stored["settings"], settings):
                return stored["record"]
        stamp_path = os.path.join(self._dir(key), _SETTINGS_STAMP)
        stamp = load_or_discard(stamp_path, load_json)
        if stamp is not None:
            self._refuse_or_discard(key, "intermediate files", stamp, settings)
        self._claimed[key] = settings
        return None

    def check_all(self, settings_by_key, on_finished=None):
        """Reads every cell of a grid before any work: {key: record, or None when unfinished}.

        Each stored cell (record or intermediate files) is checked against
        its settings as `get` does, in order, so a rerun with other settings
        is refused (ValueError naming every setting that differs) before the
        first cell is computed, wherever the stale cell lies in the grid.

        Args:
            settings_by_key: {key: settings} in grid order.
            on_finished: called with the key of each finished cell (progress logs).
        """
        records = {}
        for key, settings in settings_by_key.items():
            records[key] = self.get(key, settings)
            if records[key] is not None and on_finished is not None:
                on_finished(key)
        return records

    def cell_dir(self, key):
        """The directory for `key`'s intermediate files (created, stamped with its settings).

        Call `get(key, settings)` first: the directory is stamped with those
        settings so a resumed cell can be checked.
        """
        directory = self._dir(key)
        gfile = _gfile()
        gfile.makedirs(directory)
        stamp_path = os.path.join(directory, _SETTINGS_STAMP)
        if key in self._claimed and not gfile.exists(stamp_path):
            write_json_atomic(stamp_path, self._claimed[key])
        return directory

    def put(self, key, settings, record, discard_cell_dir=False):
        """Stores the finished cell `key` atomically.

        Args:
            key: the cell's name (letters, digits, `._=,+-`).
            settings: the JSON-able settings that produced it.
            record: the JSON-able result.
            discard_cell_dir: also delete its intermediate files.
        """
        settings = _canonical(settings)
        write_json_atomic(self.record_path(key), {
            "key": key, "settings_hash": settings_hash(settings), "settings": settings,
            "record": _canonical(record),
        })
        self._claimed.pop(key, None)
        if discard_cell_dir:
            self.discard_cell_dir(key)

    @property
    def sharded(self):
        """True when this process computes only part of the grid (a shard, or a merge)."""
        return self.shard is not None

    @property
    def shard_name(self):
        """"shard i/n", "merge" or "run" (unsharded), for log lines."""
        if self.shard is None:
            return "run"
        return MERGE if self.shard == MERGE else "shard %d/%d" % self.shard

    def mine(self, index_or_key):
        """Whether this process computes the cell at grid index (int) or with key (str).

        Unsharded: always. Shard (i, n): grid indices ≡ i (mod n), or, for a
        key, its SHA-256 modulo n (stable across processes and orderings).
        Merge: never.
        """
        is_index = isinstance(index_or_key, (int, np.integer)) and not isinstance(
            index_or_key, bool)
        if not is_index and not isinstance(index_or_key, str):
            raise TypeError(
                "Expected a grid index (int) or a cell key (str). Received: "
                f"index_or_key={index_or_key!r} of type {type(index_or_key).__name__}")
        if not is_index:
            self._check_key(index_or_key)
        if self.shard is None:
            return True
        if self.shard == MERGE:
            return False
        i, n = self.shard
        if is_index:
            return int(index_or_key) % n == i
        return _stable_index(index_or_key) % n == i

    def missing(self, keys):
        """The keys among `keys` that have no finished record yet, in order."""
        gfile = _gfile()
        return [key for key in keys if not gfile.exists(self.record_path(key))]

    def gather(self, settings_by_key):
        """{key: record} of every cell when all are finished, else None (logged).

        Reads each record written by any shard (checking its settings as
        `get` does). When cells are missing, logs which and how many and
        returns None: the caller writes no results.json; the last shard to
        finish, or a run with `--merge`, writes it.
        """
        missing = self.missing(list(settings_by_key))
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more"
                                                if len(missing) > 20 else "")
            logging.info(
                "%s: %d of %d cells are not finished yet (%s); results.json and the figures "
                "are written by the last shard to finish, or by a run with --merge.",
                self.shard_name, len(missing), len(settings_by_key), shown)
            return None
        records = {}
        for key, settings in settings_by_key.items():
            record = self.get(key, settings)
            if record is None:  # Discarded as unreadable or stale since `missing` looked.
                logging.info("Cell %s could not be read: no results.json yet.", key)
                return None
            records[key] = record
        return records

    def discard_cell_dir(self, key):
        """Deletes `key`'s intermediate files (not its record)."""
        gfile = _gfile()
        if gfile.exists(self._dir(key)):
            gfile.rmtree(self._dir(key))

    def discard(self, key):
        """Deletes the cell `key`: its record and its intermediate files."""
        gfile = _gfile()
        if gfile.exists(self.record_path(key)):
            gfile.remove(self.record_path(key))
        self.discard_cell_dir(key)
        self._claimed.pop(key, None)


# ---------------------------------------------------------------- progress and logs


def _now():
    return time.time()


class Progress:
    """Logs `<name> i of n (label)` with elapsed time and an ETA.

    The ETA is the mean time of the cells computed in this run times the
    cells left (skipped cells cost nothing).
    """

    def __init__(self, total, name="cell"):
        self.total, self.name = int(total), name
        self.done = self.computed = 0
        self.start = _now()

    def begin(self, label):
        logging.info("%s %d of %d: %s", self.name, self.done + 1, self.total, label)

    def skip(self, label, why="already finished"):
        self.done += 1
        logging.info("%s %d of %d (%s): %s, skipped", self.name, self.done, self.total, label,
                     why)

    def finish(self, label):
        self.done += 1
        self.computed += 1
        elapsed = self.elapsed
        logging.info("%s %d of %d (%s) done; elapsed %.0f s, ETA %.0f s", self.name, self.done,
                     self.total, label, elapsed, self.eta_after(elapsed))

    @property
    def elapsed(self):
        return _now() - self.start

    def eta_after(self, elapsed):
        """Seconds left after `elapsed` seconds: the mean time per computed cell × cells left."""
        if not self.computed:
            return 0.0
        return (self.total - self.done) * elapsed / self.computed


@contextlib.contextmanager
def summary_writer(log_dir):
    """A `tf.summary` file writer for `log_dir`, flushed and closed on exit.

    Example:

    ```python
    with summary_writer(os.path.join(output_dir, "tensorboard", key)) as writer:
        with writer.as_default():
            tf.summary.scalar("test_accuracy", accuracy, step=depth)
    ```
    """
    import tensorflow as tf

    writer = tf.summary.create_file_writer(log_dir)
    try:
        yield writer
    finally:
        writer.flush()
        writer.close()


def log_scalars(log_dir, step_scalars):
    """Writes {step: {tag: value}} as TensorBoard scalars under `log_dir` (a cell's log)."""
    import tensorflow as tf

    with summary_writer(log_dir) as writer, writer.as_default():
        for step, scalars in step_scalars.items():
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value, step=step)


def initial_weights(build, path, seed):
    """θ0 of a cell or study, saved once: `path` (`.weights.h5`) read back, or drawn and saved.

    An unreadable file is discarded (`load_weights_or_discard`); θ0 is then
    drawn again as `build()` after `keras.utils.set_random_seed(seed)` and
    saved atomically, so every cell that starts from it starts from the same
    weights, in this process or a resumed one.

    Args:
        build: function returning a fresh model of the architecture.
        path: where θ0 is kept (`<cell_dir>/....weights.h5`).
        seed: the seed θ0 is drawn with.

    Returns:
        `path`.
    """
    import keras

    if not load_weights_or_discard(build(), path):
        keras.utils.set_random_seed(seed)
        save_weights_atomic(build(), path)
        logging.info("Saved θ0 (seed %d) to %s", seed, path)
    return path
