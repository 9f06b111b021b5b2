"""The models that gin configs may name, registered with gin.

Configs may name models by the names in `MODELS` (`mlp`, `lenet`,
`resnet18`), with their hyperparameters bound as `mlp.widths = (512, 512)`,
`lenet.filters = ...`, `resnet18.width = 16`; a study's `run(models=[...])`
or `run(model=...)` lists model names and receives `MODELS` as
`model_builders`. Datasets are named by the strings of
`experiments.data.KNOWN_DATASETS` (the `digits` tfds builder registers
itself when `experiments.data` is imported).

A study's `run` is registered by the launcher (`launcher.configurable`)
when its binary starts: this module imports no binary, so the import
direction is binary → launcher → configurables → models. keras_ntk stays
gin-free.
"""

import gin

from experiments import models

MODELS = {
    name: gin.external_configurable(builder, name=name, module="models",
                                    denylist=["input_shape", "num_outputs"])
    for name, builder in models.MODELS.items()
}
