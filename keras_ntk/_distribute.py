"""Kernel blocks split across the workers of a `MultiWorkerMirroredStrategy`.

Under a `tf.distribute.MultiWorkerMirroredStrategy` (a cluster described by
TF_CONFIG) every worker runs the same program and calls the kernel functions
with the same arguments inside `strategy.scope()`. The blocks of a call go
round by round, one per replica of the cluster (R replicas: worker w, ranked
chief first as TensorFlow ranks them, holds replicas w·L … w·L + L − 1 of its
L devices); each replica computes its block in replica context (a distributed
variable's handle is read only there), and every worker then receives every
block of the round by collective all-reduces (SUM) of zero-filled float64
buffers:

1. the length of each block's description, 2. the descriptions (dtype and
   shape per output), 3. the values (each block's numbers at its offset,
   zeros elsewhere: a sum with one non-zero term is exact).

Each block's `on_done` is then called in block order on every worker, so the
whole result (kernel, Θ·v product, eigenpairs of `ntk_eigsh`, which calls the
products) is on every worker, equal to what one process computes. A round
holds one block per replica in float64 twice (the buffer and its sum). Tasks
wrapped in `LocalTask` run first, on every worker, their results kept there
(the block factors of `_block_factors`); `gather` gives every worker the
decisions of all (the path of a call, which must be the same everywhere).

Host-side splits use one device per worker: `run_host_tasks(tasks)` (the
feature batches of `empirical_nngp`, called directly, not in replica context;
unlike `_batching.run_tasks`, which places compiled blocks on the replicas of
any strategy, a MirroredStrategy included) and
`worker_share` + `sum_over_workers` (the blocks of pairs of
`infinite_kernels`: each worker fills its share of zero results, then the
results are summed). Without such a strategy in scope every function here
leaves the work to the caller's process unchanged.
"""

import weakref

import numpy as np
import tensorflow as tf

# Blocks computed by this process under a multi-worker strategy (tests, logs): split
# between the workers, and run by every worker (`LocalTask`).
counts = {"blocks": 0, "local": 0}
# The replica of the next call's first block (see `run_tasks_on_workers`).
_offset = [0]

_DTYPES = (np.float16, np.float32, np.float64, np.int32, np.int64, np.complex64,
           np.complex128)


def multi_worker_strategy():
    """The MultiWorkerMirroredStrategy in scope with several workers, or None."""
    if not (tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context()):
        return None
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    return strategy if _workers(strategy)[1] > 1 else None


def _workers(strategy):
    """(rank of this worker, number of workers): chief first, then workers."""
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    ranked = [("chief", i) for i in range(_task_count(spec, "chief"))] + [
        ("worker", i) for i in range(_task_count(spec, "worker"))]
    if not ranked:
        return 0, 1
    return ranked.index((resolver.task_type, int(resolver.task_id))), len(ranked)


def _task_count(spec, kind):
    tasks = spec.get(kind, [])
    return len(tasks) if not isinstance(tasks, dict) else len(tasks)


def _sum(strategy, buffer):
    """The element-wise sum of `buffer` (float64, 1-D) over the workers, on every worker."""
    if buffer.size == 0:
        return buffer
    local = len(strategy.extended.worker_devices)

    def value(context):
        first = context.replica_id_in_sync_group % local == 0
        return tf.constant(buffer if first else np.zeros_like(buffer))

    values = strategy.experimental_distribute_values_from_function(value)
    return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))


def gather(strategy, values):
    """Every worker's `values` (numbers, as many on every worker), rows in rank order
    (workers, len(values)), on every worker: for decisions the workers must share."""
    rank, workers = _workers(strategy)
    buffer = np.zeros((workers, len(values)))
    buffer[rank] = values
    return _sum(strategy, buffer.ravel()).reshape(workers, len(values))


_BUDGETS = weakref.WeakKeyDictionary()  # strategy: the workers' smallest default budget


def common_budget(budget):
    """`budget` (this process's default memory budget), or under a multi-worker
    strategy with several workers the smallest of the workers' (gathered at the first
    call under that strategy): each reads its own available memory, and a budget that
    differs between workers would cut different blocks (mismatched collectives)."""
    strategy = multi_worker_strategy()
    if strategy is None:
        return budget
    agreed = _BUDGETS.get(strategy)
    if agreed is None:
        agreed = int(gather(strategy, [budget]).min())
        _BUDGETS[strategy] = agreed
    return agreed


def _describe(blocks):
    out = [len(blocks)]
    for b in blocks:
        out += [_DTYPES.index(b.dtype.type), b.ndim, *b.shape]
    return out


def _read_descriptions(description):
    blocks, pos = [], 1
    for _ in range(int(description[0])):
        dtype, ndim = _DTYPES[int(description[pos])], int(description[pos + 1])
        shape = tuple(int(d) for d in description[pos + 2:pos + 2 + ndim])
        blocks.append((dtype, shape))
        pos += 2 + ndim
    return blocks


def replica_function(blocks, first_replica=0):
    """A function for `strategy.run`: local replica r (replica `first_replica` + r of
    the cluster) computes blocks[r] = (fn, args), and a replica past the last block
    returns zeros shaped like the last block's outputs (never read; `strategy.run`
    needs one structure from every replica; blocks of one round may call different
    functions, e.g. diagonal blocks, but return one structure). Eager `strategy.run`
    runs the replicas in turn, so the last block is computed by then; only if it is
    not does an idle replica compute the last block again."""
    last = len(blocks) - 1
    spec = []  # the last block's outputs, as TensorSpecs

    def replica_fn(*_):
        context = tf.distribute.get_replica_context()
        replica = int(context.replica_id_in_sync_group) - first_replica
        if replica > last and spec:
            return tf.nest.map_structure(
                lambda s: None if s is None else tf.zeros(s.shape, s.dtype), spec[0])
        fn, args = blocks[min(replica, last)]
        out = fn(*[tf.nest.map_structure(tf.convert_to_tensor, a) for a in args])
        if replica == last:
            spec.append(tf.nest.map_structure(
                lambda t: None if t is None else tf.TensorSpec(t.shape, t.dtype), out))
        return out

    return replica_fn


def run_on_replicas(strategy, blocks, first_replica=0):
    """[[arrays] per block]: blocks[r] = (fn, args) computed by local replica r, in
    replica context (`replica_function`)."""
    outputs = strategy.run(replica_function(blocks, first_replica))
    per_replica = [strategy.experimental_local_results(o) for o in tf.nest.flatten(outputs)]
    return [[np.asarray(p[r]) for p in per_replica] for r in range(len(blocks))]


def run_group(strategy, group, first_replica=0):
    """Runs the tasks (fn, args, on_done) of `group` and calls each on_done with its arrays:
    task r on local replica r in replica context (`run_on_replicas`), or with `strategy`
    None one after the other, called directly."""
    if strategy is None:
        for fn, args, on_done in group:
            on_done([np.asarray(k) for k in fn(*args)])
        return
    blocks = run_on_replicas(strategy, [t[:2] for t in group], first_replica)
    for (_, _, on_done), out in zip(group, blocks):
        on_done(out)


def _compute_local(strategy, group, slots, first_replica, replica_context):
    """{j: [arrays]}: the blocks group[j], j in `slots`, computed by this worker's replicas."""
    if not replica_context:
        out = {}
        for j in slots:
            fn, args, _ = group[j]
            out[j] = [np.asarray(k) for k in fn(*args)]
        return out
    # In replica context (a distributed variable's handle is read only there): this
    # worker's local replica i computes group[slots[i]] (which worker computes a block is
    # what the exchange needs; which of its replicas, only this worker), so the replicas
    # without a block come last and return zeros.
    blocks = run_on_replicas(strategy, [group[j][:2] for j in slots], first_replica)
    return dict(zip(slots, blocks))


class LocalTask(tuple):
    """A task (fn, args, on_done) that every worker runs itself, before the tasks split
    between the workers, its result kept where it is (the factors of
    `_block_factors`: each worker computes every block's, instead of receiving them)."""


def _run_local(strategy, tasks, per_worker, first_replica, replica_context):
    """Runs `tasks` on this worker, one per local replica at a time; on_done here only."""
    for start in range(0, len(tasks), per_worker):
        group = tasks[start:start + per_worker]
        counts["local"] += len(group)
        run_group(strategy if replica_context else None, group, first_replica)


def run_tasks_on_workers(strategy, tasks, progbar=None, replica_context=True):
    """Runs [(fn, args, on_done)] blocks split across workers; every on_done runs everywhere.

    Blocks go round by round, one per replica of the cluster: replica r
    (worker r // L, its local replica r mod L, L devices per worker) computes
    block j of a round when r = (j + offset) mod R; then the round's blocks are
    exchanged. The offset moves on by the number of blocks of each call (the
    same on every worker), so that calls with few blocks (the Θ·v products of
    `ntk_eigsh`) do not all start on the first worker.
    `replica_context=False` calls the functions directly, one block per
    worker and round (host code that reads no distributed variable handle,
    e.g. a forward pass). `LocalTask`s run first, on every worker.
    """
    rank, workers = _workers(strategy)
    per_worker = len(strategy.extended.worker_devices) if replica_context else 1
    step = workers * per_worker
    first_replica = rank * per_worker
    local = [t for t in tasks if isinstance(t, LocalTask)]
    if local:
        _run_local(strategy, local, per_worker, first_replica, replica_context)
        tasks = [t for t in tasks if not isinstance(t, LocalTask)]
        if progbar is not None:
            progbar.update(len(local))
    offset = _offset[0] % step
    _offset[0] += len(tasks)
    for start in range(0, len(tasks), step):
        group = tasks[start:start + step]
        owner = [(j + offset) % step for j in range(len(group))]
        slots = [j for j in range(len(group))
                 if first_replica <= owner[j] < first_replica + per_worker]
        mine = _compute_local(strategy, group, slots, first_replica,
                              replica_context) if slots else {}
        counts["blocks"] += len(mine)
        lengths = np.zeros(len(group))
        for r, blocks in mine.items():
            lengths[r] = len(_describe(blocks))
        lengths = _sum(strategy, lengths).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        descriptions = np.zeros(int(offsets[-1]))
        for r, blocks in mine.items():
            descriptions[offsets[r]:offsets[r + 1]] = _describe(blocks)
        descriptions = _sum(strategy, descriptions)
        layouts = [_read_descriptions(descriptions[offsets[t]:offsets[t + 1]])
                   for t in range(len(group))]
        sizes = [[int(np.prod(shape)) for _, shape in layout] for layout in layouts]
        value_offsets = np.concatenate([[0], np.cumsum([sum(s) for s in sizes])]).astype(
            np.int64)
        values = np.zeros(int(value_offsets[-1]))
        for r, blocks in mine.items():
            if blocks:
                values[value_offsets[r]:value_offsets[r + 1]] = np.concatenate(
                    [b.astype(np.float64).ravel() for b in blocks])
        values = _sum(strategy, values)
        for t, (_, _, on_done) in enumerate(group):
            pos, blocks = int(value_offsets[t]), []
            for (dtype, shape), size in zip(layouts[t], sizes[t]):
                blocks.append(values[pos:pos + size].reshape(shape).astype(dtype))
                pos += size
            on_done(blocks)
        if progbar is not None:
            progbar.update(len(local) + start + len(group))


def run_host_tasks(tasks):
    """Runs [(fn, args, on_done)] host functions here, or split across workers.

    Split (one function per worker and round, never in replica context) when a
    `MultiWorkerMirroredStrategy` with several workers is in scope; else every
    function runs in this process, in order, whatever the strategy (compiled
    kernel blocks go to the replicas through `_batching.run_tasks` instead).
    """
    strategy = multi_worker_strategy()
    if strategy is not None:
        run_tasks_on_workers(strategy, tasks, replica_context=False)
        return
    for fn, args, on_done in tasks:
        on_done([np.asarray(k) for k in fn(*args)])


def worker_share(items):
    """This worker's share of `items` (every W-th from its rank), or all of them.

    All of them unless a `MultiWorkerMirroredStrategy` with several workers is
    in scope; then pair it with `sum_over_workers` on zero-filled results.
    """
    strategy = multi_worker_strategy()
    if strategy is None:
        return list(items)
    rank, workers = _workers(strategy)
    share = list(items)[rank::workers]
    counts["blocks"] += len(share)
    return share


def sum_over_workers(*arrays):
    """The arrays summed over the workers (each filled its `worker_share`), or as they are."""
    strategy = multi_worker_strategy()
    if strategy is None:
        return arrays
    summed = _sum(strategy, np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]))
    out, pos = [], 0
    for a in arrays:
        out.append(summed[pos:pos + a.size].reshape(a.shape).astype(a.dtype))
        pos += a.size
    return tuple(out)
