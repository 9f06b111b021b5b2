"""Walking a model's nested layers and naming a subset of its trainable weights.

Shared by `empirical_ntk(..., variables=...)`, `Linearize(..., variables=...)`
and the callbacks, so that "the weights of layer 'dense_2'" means the same
thing everywhere. `_children` is the one place in keras_ntk that reads Keras'
private layer tracking (`_layers`); everything else walks layers through
`iter_layers`.
"""

import keras


def _children(layer):
    """The layers directly held by `layer`, in creation order, each once.

    Keras tracks sublayers assigned as attributes in `_layers` (what its own
    `_flatten_layers` walks); the public attributes are read as well so that a
    layer type that keeps a sublayer outside that list (a `Wrapper`'s `layer`,
    `Bidirectional`'s forward and backward layers) is still found.
    """
    found = list(getattr(layer, "_layers", None) or [])
    try:
        found += list(getattr(layer, "layers", None) or [])
    except (AttributeError, TypeError, ValueError):
        pass
    for name in ("layer", "forward_layer", "backward_layer"):
        child = getattr(layer, name, None)
        if isinstance(child, keras.layers.Layer):
            found.append(child)
    return [child for child in found if isinstance(child, keras.layers.Layer)]


def iter_layers(layer, include_self=True):
    """Yields `layer` and every layer nested in it, each exactly once, depth first.

    Nested models, layers held as attributes of subclassed layers/models and
    wrapped layers are all visited; a layer shared by several parents is
    yielded once. Uses only public Keras attributes plus Keras' own tracking
    list (`_layers`); Keras' internal modules are not imported.

    Args:
        layer: a Keras layer or model.
        include_self: whether to yield `layer` itself first.

    Yields:
        `keras.layers.Layer` instances.
    """
    seen = set()
    stack = [layer]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current is not layer or include_self:
            yield current
        stack.extend(reversed(_children(current)))


def _describe(item):
    if isinstance(item, keras.layers.Layer):
        return f"layer '{item.name}'"
    if isinstance(item, str):
        return f"'{item}'"
    path = getattr(item, "path", None) or getattr(item, "name", None)
    return f"variable '{path}'" if path else repr(item)


def select_weights(model, variables=None, trainable=None):
    """The model's trainable weights named by `variables`, in `model.trainable_weights` order.

    Args:
        model: a Keras model or layer.
        variables: None for all trainable weights; otherwise a sequence (or a
            single item) whose items are any of
            * a Keras Variable that is a trainable weight of `model` (or the
              `tf.Variable` behind one, its `.value`);
            * a Keras layer nested in `model` (the layer itself allowed): all
              of its trainable weights;
            * a str: the name of a layer nested in `model` (found by walking
              the nested layers, see `iter_layers`), or failing that the
              `path` of one of its trainable weights (e.g. "dense_1/kernel").
            Items naming the same weight twice are allowed; each weight is
            returned once.
        trainable: `model.trainable_weights` if the caller has read it already.

    Returns:
        A list of Keras Variables, a sub-list of `model.trainable_weights`.

    Raises:
        ValueError: for a name that matches no layer or weight (or several
            layers), a variable or layer that is not part of `model` or has no
            trainable weight, or an empty selection.
        TypeError: for an item of another type.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
                              keras.layers.Dense(1, name="head")])
    select_weights(model, ["head"])              # [head/kernel, head/bias]
    select_weights(model, [model.layers[0].kernel])
    ```
    """
    weights = list(model.trainable_weights if trainable is None else trainable)
    if variables is None:
        return weights
    if isinstance(variables, (str, keras.layers.Layer, keras.Variable)) or not hasattr(
        variables, "__iter__"
    ):
        variables = [variables]
    variables = list(variables)
    if not variables:
        raise ValueError(
            "Expected `variables` to be None or to name at least one trainable weight. "
            f"Received: variables={variables}"
        )
    by_id = {id(w): w for w in weights}
    # A keras Variable wraps a backend variable (`.value`): accept either.
    for w in weights:
        inner = getattr(w, "value", None)
        if inner is not None and not isinstance(inner, (int, float)):
            by_id.setdefault(id(inner), w)
    layers = list(iter_layers(model))
    layer_ids = {id(layer) for layer in layers}
    chosen = set()

    def take_layer(layer, item):
        own = [by_id[id(w)] for w in layer.trainable_weights if id(w) in by_id]
        if not own:
            raise ValueError(
                f"Expected every item of `variables` to select trainable weights of the "
                f"model, but {_describe(layer)} has none. Received: variables item={item!r}"
            )
        chosen.update(id(w) for w in own)

    for item in variables:
        if isinstance(item, str):
            matches = [layer for layer in layers if layer.name == item]
            if len(matches) > 1:
                raise ValueError(
                    f"Expected a layer name in `variables` to be unique in the model, but "
                    f"{len(matches)} nested layers are named '{item}'; pass the layer "
                    f"objects instead. Received: variables item={item!r}"
                )
            if matches:
                take_layer(matches[0], item)
                continue
            paths = [w for w in weights if getattr(w, "path", None) == item]
            if paths:
                chosen.update(id(w) for w in paths)
                continue
            names = sorted({layer.name for layer in layers})
            raise ValueError(
                f"Expected every name in `variables` to be a layer of the model (one of "
                f"{names}) or the path of one of its trainable weights. "
                f"Received: variables item={item!r}"
            )
        elif isinstance(item, keras.layers.Layer):
            if id(item) not in layer_ids:
                raise ValueError(
                    f"Expected every layer in `variables` to be part of the model "
                    f"'{model.name}'. Received: variables item={_describe(item)}"
                )
            take_layer(item, _describe(item))
        elif hasattr(item, "shape") and hasattr(item, "dtype") and hasattr(item, "assign"):
            if id(item) not in by_id:
                raise ValueError(
                    f"Expected every variable in `variables` to be a trainable weight of "
                    f"the model '{model.name}'. Received: variables item={_describe(item)}"
                )
            chosen.add(id(by_id[id(item)]))
        else:
            raise TypeError(
                "Expected the items of `variables` to be Keras Variables, layers or layer "
                f"names. Received: variables item={item!r} of type {type(item).__name__}"
            )
    return [w for w in weights if id(w) in chosen]


def couples_examples(model):
    """Whether some layer mixes examples of a batch in training mode."""
    return any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in iter_layers(model)
    )


def weight_groups(model, weights):
    """[(name, [weights])]: `weights` grouped by the innermost layer holding them.

    Groups come in the order of their first weight in `weights`; a group is
    named by its layer's name (made unique with the weight's path prefix when
    two nested layers share a name).
    """
    owner = {}
    for layer in iter_layers(model):
        # Pre-order: a child comes after its parents, so the last layer seen
        # holding a weight is the innermost one.
        for w in layer.trainable_weights:
            owner[id(w)] = layer
    groups = {}
    for w in weights:
        layer = owner.get(id(w), model)
        groups.setdefault(id(layer), (layer, []))[1].append(w)
    names = [layer.name for layer, _ in groups.values()]
    out = []
    for layer, ws in groups.values():
        name = layer.name
        if names.count(name) > 1:
            path = getattr(ws[0], "path", "") or ""
            name = path.rsplit("/", 1)[0] if "/" in path else f"{name}_{id(layer)}"
        out.append((name, ws))
    return out
