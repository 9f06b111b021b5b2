"""A study's grid of cells, run through the cell store: the one cell loop of the binaries.

Every study binary is a grid of cells (model × task × seed, σw², width ×
seed, ...). `Grid` runs it the same way for all of them (dopamine's runner
holds its loop in one place; the binary keeps its grid, its cell and its
assembly):

1. `check()` reads every stored cell of the grid BEFORE any work
   (`CellStore.check_all`): a cell stored under other settings is refused,
   naming each setting that differs, before the first cell is computed (or,
   with `--overwrite`, discarded); finished cells are logged as skipped;
2. `run(compute)` computes the unfinished cells in grid order, stores each
   record atomically as soon as it is finished, logs progress with an ETA
   and calls `after_each` (e.g. to rewrite results.json).

`run` is the single place where a process decides which cells it computes:
a job of a sharded grid (`--shard=i/n`) computes the cells at grid index
i mod n (`CellStore.mine`); the binary then assembles results only from a
complete grid (`CellStore.gather`).

Example:

```python
grid = Grid(store, [(key, settings[key]) for key in keys], name="cell")
grid.check()  # All grids of a binary are checked before any of them runs.
records = grid.run(lambda key: compute(key), after_each=lambda key, record: write())
```
"""

from absl import logging

from experiments import cells as cells_lib


class Grid:
    """The cells of one loop of a study, in order.

    Args:
        store: the run's `experiments.cells.CellStore`.
        cells: (key, settings[, label[, point]]) per cell, in grid order;
            `label` (default: the key) names the cell in log lines, `point`
            (default: the key) is what the binary computes the cell from
            (`points[key]`, e.g. a (width, seed) tuple).
        name: what a cell is called in progress lines ("cell", "run", ...).
    """

    def __init__(self, store, cells, name="cell"):
        self.store = store
        cells = [tuple(c) for c in cells]
        self.cells = [(c[0], c[1], c[2] if len(c) > 2 else c[0]) for c in cells]
        self.points = {c[0]: c[3] if len(c) > 3 else c[0] for c in cells}
        self.name = name
        self.labels = {key: label for key, _, label in self.cells}
        self.progress = cells_lib.Progress(len(self.cells), name)
        self.records = None

    @property
    def settings(self):
        """{key: settings} in grid order."""
        return {key: settings for key, settings, _ in self.cells}

    def check(self):
        """{key: record or None}: every stored cell read and checked against its settings.

        Raises:
            ValueError: a cell was stored under other settings (unless the
                store was opened with `overwrite`), naming them.
        """
        if self.records is None:
            self.records = self.store.check_all(
                self.settings, on_finished=lambda key: self.progress.skip(self.labels[key]))
        return self.records

    def run(self, compute, *, after_each=None, max_new=None, discard_cell_dir=False):
        """Computes the unfinished cells in grid order; returns {key: record or None}.

        Args:
            compute: function of a cell's key returning its JSON-able record.
            after_each: called with (key, record) after each new cell is stored.
            max_new: stop after this many new cells (None: all).
            discard_cell_dir: delete each cell's intermediate files once stored.
        """
        records = self.check()
        new = 0
        for index, (key, settings, label) in enumerate(self.cells):
            if records[key] is not None or not self.store.mine(index):
                continue  # Finished, or another shard's cell (--shard).
            if max_new is not None and new >= max_new:
                logging.info("Stopping after %d new %s(s) (max_new_cells).", new, self.name)
                break
            self.progress.begin(label)
            record = compute(key)
            self.store.put(key, settings, record, discard_cell_dir=discard_cell_dir)
            records[key] = record
            new += 1
            self.progress.finish(label)
            if after_each is not None:
                after_each(key, record)
        return records


def check_all(*grids):
    """Checks every cell of every grid (`Grid.check`) before any of them runs."""
    for grid in grids:
        grid.check()
