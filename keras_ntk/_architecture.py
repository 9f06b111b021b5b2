"""When two models compute the same function of their inputs and weights.

One notion of "the same architecture" serves both places that rely on it:
the compiled block functions shared by all models of an architecture
(`_batching.shared_compiled`, weights passed as arguments) and the samples of
`monte_carlo_kernels`, whose weights are copied into the first sample's
model. Both run ONE model's Python code with another model's weight values,
which is exact when the two models differ only in those values and in names.
"""

import json

import keras
import numpy as np

from keras_ntk._weights import iter_layers


def _class_path(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_builtin(obj):
    return type(obj).__module__.startswith("keras.")


def architecture_key(model, custom_classes=False):
    """A hashable description of what `model` computes up to its weights' values, or None.

    Two models with equal keys compute the same function of (inputs, variable
    values): the same classes (the model's and every nested layer's), the same
    configs with layer names replaced by their order of appearance (so the
    wiring of a Functional model is compared, its names are not), and the same
    variables (name within the layer, shape, dtype, trainable), in order.

    Args:
        model: a Keras model.
        custom_classes: False (what a function compiled once and shared by
            unrelated models may rely on): only a Functional or Sequential model
            of Keras' own layers (no Lambda) has a key, as Keras' configs
            describe those completely. True: other classes too (subclassed models,
            users' layers), trusted to be described by their class and
            `get_config` (for the samples of one `model_fn`, which run the same
            code); a model whose own config is not implemented is described by
            its class and its layers'.

    Returns:
        A hashable key, or None when what the model computes is not known from
        its description (a class not trusted, a layer without `get_config`, a
        config that cannot be serialized).
    """
    layers = list(iter_layers(model, include_self=False))
    if not custom_classes and (
            type(model).__name__ not in ("Functional", "Sequential") or not _is_builtin(model)
            or not all(_is_builtin(layer) for layer in layers)
            or any(isinstance(layer, keras.layers.Lambda) for layer in layers)):
        return None
    try:
        try:
            model_config = keras.saving.serialize_keras_object(model)
            # How the model is trained (optimizer, loss; the optimizer's name is unique
            # per model: `sgd_1`, `sgd_2`, ...) does not change what it computes.
            model_config.pop("compile_config", None)
        except NotImplementedError:
            if not custom_classes:
                return None
            model_config = None  # a subclassed model: its class and its layers describe it
        description = json.loads(json.dumps({
            "model": [_class_path(model), model_config],
            "layers": [[_class_path(layer), layer.get_config()] for layer in layers],
        }, sort_keys=True, default=_plain_value if custom_classes else None))
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return None
    variables = tuple((v.path.split("/")[-1], tuple(v.shape), str(v.dtype), bool(v.trainable))
                      for v in model.variables)
    return json.dumps(_canonical_names(description, model, layers), sort_keys=True), variables


def _plain_value(value):
    """A users' config value JSON cannot write: an array by its entries, else its repr."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def _canonical_names(description, model, layers):
    """`description` with every layer name replaced by `#k`, k its order of appearance."""
    names = {model.name} | {layer.name for layer in layers}

    def collect(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "keras_history" and value:
                    names.add(value[0])
                elif key in ("input_layers", "output_layers"):
                    for item in value:
                        if isinstance(item, list) and item and isinstance(item[0], str):
                            names.add(item[0])
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(description)
    canonical = {}

    def rename(node):
        if isinstance(node, dict):
            return {k: rename(v) for k, v in sorted(node.items())}
        if isinstance(node, list):
            return [rename(v) for v in node]
        if isinstance(node, str) and node in names:
            return canonical.setdefault(node, f"#{len(canonical)}")
        return node

    return rename(description)
