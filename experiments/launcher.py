"""The absl + gin skeleton shared by every study binary.

A study binary is `python -m experiments.<study> --gin_file=F [--gin_file=G]
--gin_bindings='a.b=1' --output_dir=DIR --strategy=auto|cpu|one_device|
mirrored|tpu [--tpu=ADDR] [--data_dir=D]`. It

1. configures logical CPUs when asked (hidden `--num_cpu_devices`, for
   MirroredStrategy tests on one CPU; must happen before TensorFlow
   initializes its runtime);
2. parses the gin files (paths that do not exist as given are looked up
   in `gin_configs/`, as are `include` statements) and bindings; a bad
   file or binding stops the run before any work with gin's message;
3. writes DIR/command.txt (the exact command) and DIR/config.gin (the
   parsed config; replaced by the operative config when the run ends);
4. calls the study's gin-configured `run(output_dir=..., strategy=...,
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
    "gin_bindings", [], "Gin bindings, e.g. 'linear_vs_nonlinear.run.epochs = 5'."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the run writes everything.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "auto", ["auto", "cpu", "one_device", "mirrored", "tpu"],
    "tf.distribute strategy: auto picks TPU (with --tpu), GPUs, or the CPU.",
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
    if _NUM_CPU_DEVICES.value:
        _configure_cpu_devices(_NUM_CPU_DEVICES.value)

    import gin
    import tensorflow as tf

    from experiments import configurables, train

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
