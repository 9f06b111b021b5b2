"""A study's grid of cells, run through the cell store: the one cell loop of the binaries.

Every study binary is a grid of cells (model × task × seed, σw², width ×
seed, ...). `Grid` runs it the same way for all of them (dopamine's runner
holds its loop in one place; the binary keeps its grid, its cell and its
assembly):

1. `check()` reads every stored cell of the grid BEFORE any work
   (`CellStore.check_all`), and the cells whose intermediate files the grid
   shares (`shared`, e.g. a saved θ0): a cell stored under other settings is
   refused, naming each setting that differs, before the first cell is
   computed (or, with `--overwrite`, discarded); finished cells are logged
   as skipped;
2. `run(compute)` computes the unfinished cells in grid order, stores each
   record atomically as soon as it is finished, logs progress with an ETA
   and calls `after_each` (e.g. to rewrite results.json);
3. `gathered()` gives the records to assemble: this run's, or with
   `--shard`/`--merge` every shard's once all are stored (None until then).

`run` is the single place where a process decides which cells it computes:
a job of a sharded grid (`--shard=i/n`) computes the work items at grid
index i mod n (`CellStore.mine`); the binary assembles results only from a
complete grid (`gathered`). A work item is one cell, or a group of cells
computed together (`groups`: e.g. two kernel methods scored on one kernel).

Example:

```python
grid = Grid(store, [(key, settings[key]) for key in keys], name="cell")
grid.check()  # All grids of a binary are checked before any of them runs.
grid.run(lambda key: compute(key), after_each=lambda key, record: write())
records = grid.gathered()  # None: other shards' cells are missing (logged).
```
"""

from absl import logging

from experiments import cells as cells_lib


class CellSkipped(Exception):
    """Raised by a `compute` function: this work item has no cell to store (the reason)."""


class Grid:
    """The cells of one loop of a study, in order.

    Args:
        store: the run's `experiments.cells.CellStore`.
        cells: (key, settings[, label[, point]]) per cell, in grid order;
            `label` (default: the key) names the cell in log lines, `point`
            (default: the key) is what the binary computes the cell from
            (`points[key]`, e.g. a (width, seed) tuple).
        name: what a work item is called in progress lines ("cell", "run", ...).
        groups: None (each cell is a work item, computed by `compute(key)`
            returning its record) or (label, point, keys) per work item in
            running order, each computed by one `compute(point)` returning
            {key: record} for its keys.
        shared: {key: settings} of cells whose intermediate files the grid's
            cells share (a saved θ0): checked with the grid, never computed here.
        complete: function of (key, record): False when a stored record
            lacks a file it needs (the cell is then computed again).
    """

    def __init__(self, store, cells, name="cell", *, groups=None, shared=None, complete=None):
        self.store = store
        cells = [tuple(c) for c in cells]
        self.cells = [(c[0], c[1], c[2] if len(c) > 2 else c[0]) for c in cells]
        self.points = {c[0]: c[3] if len(c) > 3 else c[0] for c in cells}
        self.name = name
        self.labels = {key: label for key, _, label in self.cells}
        self.grouped = groups is not None
        self.items = ([(label, point, list(keys)) for label, point, keys in groups]
                      if self.grouped else [(label, key, [key]) for key, _, label in self.cells])
        self.shared = dict(shared or {})
        self.complete = complete
        self.progress = cells_lib.Progress(len(self.items), name)
        self.records = None

    @property
    def settings(self):
        """{key: settings} in grid order."""
        return {key: settings for key, settings, _ in self.cells}

    @property
    def finished(self):
        """Whether every work item of the grid is finished (or skipped) in this process."""
        return self.progress.done == self.progress.total

    def _usable(self, key, record):
        return record is not None and (self.complete is None or self.complete(key, record))

    def check(self):
        """{key: record or None}: every stored cell read and checked against its settings.

        Raises:
            ValueError: a cell was stored under other settings (unless the
                store was opened with `overwrite`), naming them.
        """
        if self.records is None:
            self.store.check_all(self.shared)
            stored = self.store.check_all(self.settings)
            self.records = {key: record if self._usable(key, record) else None
                            for key, record in stored.items()}
            for label, _, keys in self.items:
                if all(self.records[key] is not None for key in keys):
                    self.progress.skip(label)
        return self.records

    def run(self, compute, *, after_each=None, max_new=None, discard_cell_dir=False):
        """Computes the unfinished work items in grid order; returns {key: record or None}.

        Args:
            compute: function of a cell's key returning its JSON-able record
                (of a group's point returning {key: record}, with `groups`);
                it may raise `CellSkipped(reason)`: nothing is stored.
            after_each: called with (key or point, what compute returned)
                after each new work item is stored.
            max_new: stop after this many new work items (None: all).
            discard_cell_dir: delete each cell's intermediate files once stored.
        """
        records = self.check()
        settings = self.settings
        new = 0
        for index, (label, point, keys) in enumerate(self.items):
            if all(records[key] is not None for key in keys) or not self.store.mine(index):
                continue  # Finished, or another shard's work item (--shard).
            if max_new is not None and new >= max_new:
                logging.info("Stopping after %d new %s(s) (max_new_cells).", new, self.name)
                break
            self.progress.begin(label)
            try:
                result = compute(point)
            except CellSkipped as skipped:
                self.progress.skip(label, str(skipped))
                continue
            computed = result if self.grouped else {point: result}
            for key in keys:
                self.store.put(key, settings[key], computed[key],
                               discard_cell_dir=discard_cell_dir)
                records[key] = computed[key]
            new += 1
            self.progress.finish(label)
            if after_each is not None:
                after_each(point, result)
        return records

    def gathered(self, excuse=None):
        """The records to assemble: {key: record or None}, or None while cells are missing.

        Unsharded: this run's records (None: a cell not computed, e.g. after
        `max_new`). Sharded or `--merge`: every shard's records once all are
        stored (`CellStore.gather`); None, with a log line naming the
        missing cells, until then.

        Args:
            excuse: function of the key of a cell without a record: why it
                has none (it is then left out, None in the result), or None
                (it is missing).
        """
        records = self.check()
        if not self.store.sharded:
            return records
        excused = set()
        if excuse is not None:
            excused = {key for key in self.store.missing(list(self.settings))
                       if excuse(key) is not None}
        gathered = self.store.gather({key: settings for key, settings in self.settings.items()
                                      if key not in excused})
        if gathered is None:
            return None
        unusable = [key for key, record in gathered.items() if not self._usable(key, record)]
        if unusable:
            logging.info("%s: cells %s lack their files: no results.json yet.",
                         self.store.shard_name, ", ".join(unusable[:20]))
            return None
        records.update(gathered)
        return records


def check_all(*grids):
    """Checks every cell of every grid (`Grid.check`) before any of them runs."""
    for grid in grids:
        grid.check()


def gathered(*grids):
    """[records of each grid] (`Grid.gathered`), or None when any grid misses cells (logged)."""
    records = [grid.gathered() for grid in grids]
    return None if any(r is None for r in records) else records
