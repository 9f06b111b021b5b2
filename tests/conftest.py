"""Test set-up shared by every test module.

Two logical CPU devices must be configured before TensorFlow initializes its
runtime, so that MirroredStrategy tests have two replicas on a CPU-only
machine: this file runs before any test module imports TensorFlow.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No TF32 on GPUs, so float32 references agree. Op determinism
# (TF_DETERMINISTIC_OPS) is NOT enabled: Keras then silently turns
# `jit_compile=True` off, which would hide the XLA paths under test.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
      _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
tf.config.experimental.enable_tensor_float_32_execution(False)

import keras  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, excluded from `make test`")


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs, shared by every test.

    Separate strategy objects in one process reuse collective instance keys:
    a second one then fails with "Shape mismatch in the collective instance".
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def small_factor_blocks(monkeypatch):
    """The block-factor path (`keras_ntk._block_factors`, returned) from padded blocks of
    4 up to blocks of 8, with fresh caches and plain graphs, so that small inputs take
    it (19 = 8 + 8 + 3 examples)."""
    import collections

    from keras_ntk import _batching, _block_factors

    monkeypatch.setattr(_batching, "_JIT", "0")
    monkeypatch.setattr(_batching, "_SHARED", collections.OrderedDict())
    monkeypatch.setattr(_block_factors, "MIN_SIZE", 4)
    monkeypatch.setattr(_block_factors, "MAX_SIZE", 8)
    monkeypatch.setattr(_block_factors, "_SIZES", collections.OrderedDict())
    monkeypatch.setattr(_block_factors, "_PAIR_FUNCTIONS", collections.OrderedDict())
    monkeypatch.setattr(_block_factors, "factor_bytes", _block_factors.factor_bytes)
    return _block_factors


@pytest.fixture
def float64_keras():
    """Keras' floatx set to float64 for one test (restored after it)."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(previous)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds and a fresh Keras session."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _binary_command(study, output_dir, flags, gin_file, strategy):
    """The command line and environment of a study binary run from this checkout's root."""
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", f"experiments.{study}",
               f"--gin_file={gin_file or f'{study}/smoke.gin'}",
               f"--output_dir={output_dir}", f"--strategy={strategy}", *flags]
    return command, env


@pytest.fixture(scope="session")
def run_binary():
    """Runs a study binary in a subprocess, as users run it; returns a function.

    `run_binary(study, output_dir, *flags, gin_file=f"{study}/smoke.gin",
    strategy="cpu", check=True)` runs `python -m experiments.<study>` from
    the root of this checkout (so it imports this checkout's code), on the
    CPU, and returns the `subprocess.CompletedProcess` (stdout and stderr as
    text). With `check`, a non-zero exit fails the test with the end of
    stderr. conftest's two logical CPUs do not reach the subprocess: pass
    `--num_cpu_devices=2` for MirroredStrategy.
    """
    import subprocess

    def run(study, output_dir, *flags, gin_file=None, strategy="cpu", check=True,
            timeout=900):
        command, env = _binary_command(study, output_dir, flags, gin_file, strategy)
        result = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{command} failed:\n{result.stderr[-4000:]}")
        return result

    return run


@pytest.fixture(scope="session")
def kill_binary():
    """Runs a study binary as `run_binary` does and kills it (SIGKILL) once a condition holds.

    `kill_binary(study, output_dir, *flags, when, gin_file=None, strategy="cpu",
    timeout=900)` polls `when()` every 0.1 s while the binary runs, sends
    SIGKILL as soon as it is true (as a crash or a preempted job would end),
    and returns the return code (-9 when killed; the test should check it:
    a binary that finished first was not interrupted).
    """
    import signal
    import subprocess
    import time

    def kill(study, output_dir, *flags, when, gin_file=None, strategy="cpu", timeout=900):
        command, env = _binary_command(study, output_dir, flags, gin_file, strategy)
        process = subprocess.Popen(command, cwd=_ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        try:
            while process.poll() is None and time.time() < deadline:
                if when():
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.1)
        finally:
            if process.poll() is None and time.time() >= deadline:
                process.kill()
        return process.wait()

    return kill
