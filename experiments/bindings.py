"""Refusing impossible gin settings of a study binary before any work, naming the binding.

Every binary checks the arguments of its `run` the same way before it loads
data or writes a file: a number out of range, a size larger than the dataset,
an unknown name. Each refusal is a ValueError in the house style, naming the
gin binding and ending with what was received:

    Expected linear_vs_nonlinear.run.epochs to be an int >= 1. Received: epochs=0

Example:

```python
bindings = Bindings("trainability")
bindings.check(num_train=(num_train, OPTIONAL_POSITIVE_INT),
               sigma_b2=(sigma_b2, FINITE_NON_NEGATIVE))
bindings.known("activations", activations, ACTIVATIONS, "activation")
```
"""

import math


def _int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ints(value, low):
    return isinstance(value, (list, tuple)) and all(_int(v) and v >= low for v in value)


# (what is expected, predicate) of one argument.
POSITIVE_INT = ("an int >= 1", lambda v: _int(v) and v >= 1)
NON_NEGATIVE_INT = ("an int >= 0", lambda v: _int(v) and v >= 0)
OPTIONAL_POSITIVE_INT = ("None or an int >= 1", lambda v: v is None or POSITIVE_INT[1](v))
OPTIONAL_NON_NEGATIVE_INT = ("None or an int >= 0",
                             lambda v: v is None or NON_NEGATIVE_INT[1](v))
POSITIVE_NUMBER = ("a number > 0", lambda v: _number(v) and v > 0)
FINITE_NON_NEGATIVE = ("a finite number >= 0", lambda v: _number(v) and v >= 0)
MOMENTUM = ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
DISTINCT_INTS = ("a non-empty list of distinct ints",
                 lambda v: _ints(v, -math.inf) and len(v) > 0 and len(set(v)) == len(v))
POSITIVE_INTS = ("a list of positive ints", lambda v: _ints(v, 1))
NON_EMPTY_POSITIVE_INTS = ("a non-empty list of positive ints",
                           lambda v: _ints(v, 1) and len(v) > 0)
NON_NEGATIVE_INTS = ("a list of non-negative ints", lambda v: _ints(v, 0))
INCREASING_NON_NEGATIVE_INTS = ("increasing ints >= 0", lambda v: len(v) > 0 and all(
    d >= 0 for d in v) and list(v) == sorted(set(v)))
DISTINCT = ("a list without repeats", lambda v: len(set(v)) == len(v))
POSITIVE_NUMBERS = ("a non-empty list of numbers > 0",
                    lambda v: len(v) > 0 and all(POSITIVE_NUMBER[1](s) for s in v))
NON_NEGATIVE_NUMBERS = ("a list of numbers >= 0",
                        lambda v: all(FINITE_NON_NEGATIVE[1](s) for s in v))
OPTIONAL_SIZES = ("None or positive sizes in increasing order without repeats",
                  lambda v: v is None or (len(v) > 0 and all(int(n) >= 1 for n in v) and sorted(
                      {int(n) for n in v}) == [int(n) for n in v]))
OPTIONAL_RANGE = ("None or (low, high) with low <= high (None: open)",
                  lambda v: v is None or (len(v) == 2 and (None in v or v[0] <= v[1])))


class Bindings:
    """The checks of one binary's `run` arguments.

    Args:
        study: the binary's gin name ("linear_vs_nonlinear", ...).
        qualified: name the argument in full after "Received:" as well
            (`Received: kernel_evolution.run.widths=[0, 8]`).
    """

    def __init__(self, study, qualified=False):
        self.study = study
        self.qualified = qualified

    def binding(self, name):
        return f"{self.study}.run.{name}"

    def received(self, name, value):
        return f"Received: {self.binding(name) if self.qualified else name}={value!r}"

    def check(self, **arguments):
        """Each `name=(value, kind)`: refuses a value the kind's predicate rejects."""
        for name, (value, (expected, accepts)) in arguments.items():
            if not accepts(value):
                raise ValueError(f"Expected {self.binding(name)} to be {expected}. "
                                 + self.received(name, value))

    def known(self, name, value, known, what, listed=None):
        """Refuses a name (or a list of names, non-empty) not among `known`.

        The message lists the known ones: "Unknown <what>(s) [...] in
        <study>.run.<name>. Known <what>s: a, b. Received: ..." (`listed`:
        their order, default `known`).
        """
        names = list(value) if isinstance(value, (list, tuple)) else [value]
        unknown = [v for v in names if v not in known]
        if unknown or not names:
            shown = ", ".join(listed if listed is not None else known)
            prefix = (f"Unknown {what}(s) {unknown} in {self.binding(name)}"
                      if isinstance(value, (list, tuple))
                      else f"Unknown {what} in {self.binding(name)}")
            raise ValueError(f"{prefix}. Known {what}s: {shown}. "
                             + self.received(name, list(value) if isinstance(value, tuple)
                                             else value))

    def dataset(self, dataset, *, configs=False):
        """Refuses a dataset `experiments.data` does not know (`configs`: "mnist1d/8000" too)."""
        from experiments import data as data_lib

        self.known("dataset", dataset.split("/")[0] if configs else dataset,
                   data_lib.KNOWN_DATASETS, "dataset")

    def models(self, name, value, model_builders):
        """Refuses a model name (or list of names) without a builder in `model_builders`."""
        self.known(name, value, model_builders, "model", listed=sorted(model_builders))

    def at_most(self, name, value, available, what):
        """Refuses `value` (None: all) above `available` `what` ("training examples")."""
        if value is not None and value > available:
            raise ValueError(f"Expected {self.binding(name)} <= {available} {what}. "
                             + self.received(name, value))
