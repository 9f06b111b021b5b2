"""experiments/settings.py: each study's settings object mirrors its `run` and documents it."""

import dataclasses
import inspect
import re

import pytest

from experiments import data_scaling, kernel_evolution, launcher, linear_vs_nonlinear, settings
from experiments import trainability

STUDIES = [(linear_vs_nonlinear, settings.LinearVsNonlinear),
           (data_scaling, settings.DataScaling),
           (kernel_evolution, settings.KernelEvolution),
           (trainability, settings.Trainability)]


def documented(cls):
    """The names that begin an entry of the Attributes sections of `cls` and its bases."""
    entry = re.compile(r"^ {8}([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*)(?::|,$)")
    names = set()
    for klass in cls.__mro__:
        for line in (klass.__doc__ or "").partition("Attributes:")[2].splitlines():
            match = entry.match(line)
            if match:
                names.update(match.group(1).split(", "))
    return names


@pytest.mark.parametrize("binary, cls", STUDIES, ids=lambda v: getattr(v, "__name__", ""))
def test_the_settings_object_has_exactly_the_arguments_of_run(binary, cls):
    """A new `run` argument without a field (or a stale field) fails here, not in a run."""
    arguments = set(inspect.signature(binary.run).parameters)
    assert arguments == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("binary, cls", STUDIES, ids=lambda v: getattr(v, "__name__", ""))
def test_every_argument_of_run_is_documented_once(binary, cls):
    arguments = set(inspect.signature(binary.run).parameters)
    assert arguments - documented(cls) == set()
    assert documented(settings.Launched) >= set(launcher.FROM_THE_BINARY) - {
        "simulate_crash_after_epochs"}
    assert f"experiments.settings.{cls.__name__}" in binary.run.__doc__


def test_a_refusal_names_the_binding_before_any_work(tmp_path):
    """Through `run`: nothing is written when a setting is refused."""
    with pytest.raises(ValueError, match=r"kernel_evolution\.run\.loss"):
        kernel_evolution.run(output_dir=str(tmp_path / "run"), strategy=None,
                             model_builders={"mlp": None}, loss="hinge")
    with pytest.raises(ValueError, match=r"Expected trainability\.run\.depths to be increasing"):
        trainability.run(output_dir=str(tmp_path / "run"), strategy=None, depths=(4, 1))
    assert not (tmp_path / "run").exists()
