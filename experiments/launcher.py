"""The absl + gin skeleton shared by every study binary.

A study binary is `python -m experiments.<study> --gin_file=F [--gin_file=G]
--gin_bindings='a.b=1' --output_dir=DIR --strategy=auto|cpu|one_device|
mirrored|tpu [--tpu=ADDR] [--data_dir=D] [--shard=i/n|tf_config | --merge]`. It

0. refuses, before any work, multi-worker training (`--strategy=multi_worker`,
   or a TF_CONFIG cluster of several tasks without `--shard`): Keras 3's
   `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585);
   a cluster runs a study as shards instead (`--shard`, docs/scaling.md);
1. configures logical CPUs when asked (hidden `--num_cpu_devices`, for
   MirroredStrategy tests on one CPU; must happen before TensorFlow
   initializes its runtime);
2. parses the gin files (paths that do not exist as given are looked up
   in `gin_configs/`, as are `include` statements) and bindings; a bad
   file or binding stops the run before any work with gin's message;
3. writes DIR/command.txt (the exact command) and DIR/config.gin (the
   parsed config; replaced by the operative config when the run ends);
4. sets the process' shard (`experiments.cells.set_process_shard`): with
   `--shard=i/n` the study computes every n-th cell of its grid into the
   shared DIR and writes results.json only once every cell is there (the
   last shard to finish); `--shard=tf_config` takes i and n from TF_CONFIG;
   `--merge` computes no cell and writes results.json from a complete DIR;
5. calls the study's gin-configured `run(output_dir=..., strategy=...,
   model_builders=..., data_dir=..., overwrite=...)`, which writes
   results.json, figures and TensorBoard logs and resumes from what DIR
   already holds (`experiments.cells`: a cell stored under other settings
   is refused, naming them, or recomputed with `--overwrite`).

The binary depends on the launcher, never the reverse (as dopamine's
`train.py` calls `run_experiment`): a study module ends with

    def main(argv):
        launcher.main(argv, "linear_vs_nonlinear", run)

and the launcher registers that `run` with gin as `<study>.run`
(`configurable`); `experiments.configurables` registers the models.

All paths go through `tf.io.gfile`, so DIR may be a `gs://` bucket.
"""

import inspect
import json
import os
import re
import shlex
import sys

from absl import app, flags, logging

GIN_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "gin_configs")

_GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", [], "Gin config files; relative paths are also looked up in gin_configs/."
)
_GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin bindings, e.g. 'linear_vs_nonlinear.run.epochs = 5'. The "
    "arguments of each study's run are documented in experiments/settings.py."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the run writes everything.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "auto", ["auto", "cpu", "one_device", "mirrored", "tpu", "multi_worker"],
    "tf.distribute strategy: auto picks TPU (with --tpu), GPUs, or the CPU. multi_worker is "
    "refused (Keras 3 cannot fit under it, keras-team/keras#20585): use --shard.",
)
_SHARD = flags.DEFINE_string(
    "shard", None,
    "'i/n': compute every n-th cell of the grid (those at index i mod n) into the shared "
    "--output_dir; the last shard to finish writes results.json. 'tf_config': i and n from "
    "the TF_CONFIG environment variable (rank among chief and workers).",
)
_MERGE = flags.DEFINE_bool(
    "merge", False,
    "Compute no cell: write results.json and figures from the cells in --output_dir when all "
    "are there (otherwise log the missing ones and exit 0).",
)
_TPU = flags.DEFINE_string("tpu", None, "TPU address for --strategy=tpu ('local' for a TPU VM).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data directory (default: $KERAS_NTK_DATA_DIR or "
    "~/.cache/keras_ntk/tensorflow_datasets)."
)
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Split the CPU into this many logical devices (tests).",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Discard cells stored in --output_dir under other settings and compute them again "
    "(default: refuse, naming the settings that differ).",
)
_CRASH_AFTER_EPOCHS = flags.DEFINE_integer(
    "simulate_crash_after_epochs", None,
    "Kill the process after this many epochs of the first fit (tests of resuming).",
)
for _name in ("num_cpu_devices", "simulate_crash_after_epochs"):
    flags.FLAGS[_name].help += " (hidden: for tests)"


# Binaries whose cell loop honours `--shard` (`grid.Grid.run` / `Grid.gathered`).
SHARDED_STUDIES = ("data_scaling", "kernel_evolution", "linear_vs_nonlinear", "trainability")

MULTI_WORKER_TRAINING = (
    "{study} cannot train under MultiWorkerMirroredStrategy: Keras 3's model.fit fails "
    "under it (keras-team/keras#20585, 'Attempt to convert a value (PerReplica...)'). Run "
    "one job per machine with --shard=i/n (or --shard=tf_config) into one shared "
    "--output_dir; each job uses the devices of its machine (--strategy=mirrored); see "
    "docs/scaling.md. Received: {received}"
)

# Arguments of `run` that the launcher passes itself: configs cannot bind them.
FROM_THE_BINARY = ("output_dir", "strategy", "model_builders", "data_dir", "overwrite",
                   "simulate_crash_after_epochs")


def configurable(study, run):
    """`run` registered with gin as `<study>.run`; returns the gin-configured function.

    The arguments in `FROM_THE_BINARY` are deny-listed. Registering the same
    function again (tests) returns an equivalent wrapper.
    """
    import gin

    parameters = inspect.signature(run).parameters
    return gin.external_configurable(
        run, name="run", module=study,
        denylist=[name for name in FROM_THE_BINARY if name in parameters],
    )


def _qualified(config_text, study):
    """gin's config text with the study's `run` named in full (`<study>.run.x = ...`).

    gin prints the shortest unique selector, `run.x` when one binary is
    registered; the full name tells a reader which study the file configures.
    """
    return re.sub(r"(?m)^(# Parameters for )?run([.:])", rf"\g<1>{study}.run\g<2>", config_text)


def _resolve_gin_file(path):
    if os.path.exists(path) or "://" in path:
        return path
    candidate = os.path.join(GIN_CONFIGS_DIR, path)
    if os.path.exists(candidate):
        return candidate
    raise app.UsageError(
        f"Gin file not found as given nor under {GIN_CONFIGS_DIR}. Received: gin_file={path!r}"
    )


def _configure_cpu_devices(count):
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
    )


def _tf_config():
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError as error:
        raise app.UsageError(f"TF_CONFIG is not JSON ({error}). Received: TF_CONFIG={text!r}")


def _cluster_tasks(tf_config):
    cluster = (tf_config or {}).get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def process_shard(study, strategy, shard, merge):
    """The shard of this process (None, (i, n) or "merge") from the flags and TF_CONFIG.

    Raises `app.UsageError` (before any work) for multi-worker training, a
    shard the study cannot honour, or contradictory flags.
    """
    from experiments import cells

    tf_config = _tf_config()
    if strategy == "multi_worker":
        raise app.UsageError(MULTI_WORKER_TRAINING.format(
            study=study, received="strategy='multi_worker'"))
    if shard is not None and merge:
        raise app.UsageError(
            f"--merge computes no cell; it cannot be one shard. Received: shard={shard!r}, "
            "merge=True")
    if shard is None and not merge and _cluster_tasks(tf_config) > 1:
        raise app.UsageError(MULTI_WORKER_TRAINING.format(
            study=study,
            received=f"TF_CONFIG with {_cluster_tasks(tf_config)} chief/worker tasks and no "
                     "--shard"))
    if shard is None and not merge:
        return None
    if study not in SHARDED_STUDIES:
        raise app.UsageError(
            f"{study} does not run in shards yet (binaries that do: "
            f"{', '.join(SHARDED_STUDIES)}). Received: "
            + (f"shard={shard!r}" if shard is not None else "merge=True"))
    if merge:
        return cells.MERGE
    try:
        if shard.strip().lower() == "tf_config":
            if tf_config is None:
                raise ValueError(
                    "Expected the TF_CONFIG environment variable with --shard=tf_config. "
                    "Received: TF_CONFIG unset")
            return cells.shard_from_tf_config(tf_config)
        return cells.parse_shard(shard)
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def main(argv, study, run):
    """Runs the binary `study` (e.g. "linear_vs_nonlinear") whose entry point is `run`."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments. Received: argv={argv[1:]}")
    if _OUTPUT_DIR.value is None:
        raise app.UsageError("--output_dir is required. Received: output_dir=None")
    parameters = inspect.signature(run).parameters
    optional = {"overwrite": _OVERWRITE.value,
                "simulate_crash_after_epochs": _CRASH_AFTER_EPOCHS.value}
    for name, value in optional.items():
        if value not in (None, False) and name not in parameters:
            raise app.UsageError(f"{study} has no --{name}. Received: {name}={value!r}")
    shard = process_shard(study, _STRATEGY.value, _SHARD.value, _MERGE.value)
    if _NUM_CPU_DEVICES.value:
        _configure_cpu_devices(_NUM_CPU_DEVICES.value)

    import gin
    import tensorflow as tf

    from experiments import cells, configurables, train

    configured_run = configurable(study, run)
    gin.add_config_file_search_path(GIN_CONFIGS_DIR)
    files = [_resolve_gin_file(f) for f in _GIN_FILES.value]
    try:
        gin.parse_config_files_and_bindings(files, _GIN_BINDINGS.value)
    except (ValueError, KeyError, TypeError, IOError) as error:
        raise app.UsageError(f"Bad gin config or binding: {error}") from error

    output_dir = _OUTPUT_DIR.value
    tf.io.gfile.makedirs(output_dir)
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", f"experiments.{study}"]
                       + sys.argv[1:])
    with tf.io.gfile.GFile(os.path.join(output_dir, "command.txt"), "w") as f:
        f.write(command + "\n")
    with tf.io.gfile.GFile(os.path.join(output_dir, "config.gin"), "w") as f:
        f.write(_qualified(gin.config_str(), study))

    strategy = train.make_strategy(_STRATEGY.value, _TPU.value)
    logging.info("Strategy %s with %d replica(s).", type(strategy).__name__,
                 strategy.num_replicas_in_sync)
    cells.set_process_shard(shard)
    if shard is not None:
        logging.info("Cells of %s into the shared %s.",
                     "no shard (merge)" if shard == cells.MERGE else "shard %d/%d" % shard,
                     output_dir)
    configured_run(
        output_dir=output_dir,
        strategy=strategy,
        model_builders=configurables.MODELS,
        data_dir=_DATA_DIR.value,
        **{name: value for name, value in optional.items() if name in parameters},
    )
    with tf.io.gfile.GFile(os.path.join(output_dir, "config.gin"), "w") as f:
        f.write(_qualified(gin.operative_config_str(), study))
    logging.info("Done: %s", output_dir)
