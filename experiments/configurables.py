"""The only module that registers experiment objects with gin.

Configs may name:

* models, by the names in `MODELS` (`mlp`, `lenet`, `resnet18`), with their
  hyperparameters bound as `mlp.widths = (512, 512)`, `lenet.filters = ...`,
  `resnet18.width = 16`; a study's `run(models=[...])` lists model names.
* study entry points, `STUDIES`: `linear_vs_nonlinear.run` (study A), whose
  arguments are the experiment (dataset, tasks, ks, seeds, recipe, ...);
  `trainability.run` (study C: σw²/depth grids, architectures, widths);
  `data_scaling.run` and `kernel_evolution.run` (study B).

Arguments that the binary passes itself (output_dir, strategy,
model_builders, data_dir) are deny-listed: a config cannot set them.
keras_ntk stays gin-free.
"""

import gin

from experiments import linear_vs_nonlinear, models
from experiments import trainability
from experiments import data_scaling, kernel_evolution

_FROM_THE_BINARY = ["output_dir", "strategy", "model_builders", "data_dir"]

MODELS = {
    name: gin.external_configurable(builder, name=name, module="models",
                                    denylist=["input_shape", "num_outputs"])
    for name, builder in models.MODELS.items()
}

STUDIES = {
    "linear_vs_nonlinear": gin.external_configurable(
        linear_vs_nonlinear.run, name="run", module="linear_vs_nonlinear",
        denylist=_FROM_THE_BINARY,
    ),
    "trainability": gin.external_configurable(
        trainability.run, name="run", module="trainability", denylist=_FROM_THE_BINARY,
    ),
    "data_scaling": gin.external_configurable(
        data_scaling.run, name="run", module="data_scaling", denylist=_FROM_THE_BINARY,
    ),
    "kernel_evolution": gin.external_configurable(
        kernel_evolution.run, name="run", module="kernel_evolution", denylist=_FROM_THE_BINARY,
    ),
}
