"""The plan of an infinite-width kernel: a Keras model read as recursion steps.

`_architecture(model, input_shape)` walks a Sequential or functional model
(a graph: `Add`, `Average`, `Concatenate` on channels, nested models) and
returns its steps in topological order, each (op, mode, spatial): the kind,
hyper-parameters and input steps (`op.inputs`, −1 the model input) of each
step, and the representation of the kernel it acts on ("fcn"; "full"
positions × positions; "diag" the spatial diagonal only, when no pooling
layer follows). The last step is the model output.

Every layer is translated by `keras_ntk._kernel_layers._layer_ops`; layers
without a kernel raise `_Unsupported` there, and `unsupported_layers(model)`
lists them all (the hook for a Monte-Carlo fallback).
"""

import keras

from keras_ntk._kernel_layers import (SUPPORTED_LAYERS, _is_odd, _layer_ops,  # noqa: F401
                                      _Op, _Unsupported, _unsupported)

_WEIGHTED = ("dense", "conv")
# Steps that are linear maps of their input (a zero-mean input stays zero-mean
# and a fresh layer's outputs stay independent of other branches).
_LINEAR = ("avgpool", "gap", "flatten", "affine")


class _Builder:
    """Collects the steps of a model graph; `errors` collects unsupported layers."""

    def __init__(self, collect=False):
        self.ops = []
        self.errors = [] if collect else None

    def emit(self, ops, source):
        for op in ops:
            if not op.inputs:
                op.inputs = (source,)
            self.ops.append(op)
            source = len(self.ops) - 1
        return source

    def layer(self, layer, sources, shapes):
        """Adds one called layer on the steps `sources`; returns its output step."""
        try:
            if isinstance(layer, keras.Model):
                if len(sources) != 1:
                    raise _unsupported(layer, ": a nested model with several inputs")
                return self.model(layer, sources[0])
            if isinstance(layer, (keras.layers.Add, keras.layers.Average,
                                  keras.layers.Concatenate)):
                return self.fan_in(layer, sources, shapes)
            if len(sources) != 1:
                raise _unsupported(layer, ": called on several inputs")
            return self.emit(_layer_ops(layer), sources[0])
        except _Unsupported as error:
            if self.errors is None:
                raise
            self.errors.append(error)
            return sources[0]

    def fan_in(self, layer, sources, shapes):
        if isinstance(layer, keras.layers.Concatenate):
            axis = layer.get_config()["axis"]
            if axis not in (-1, len(shapes[0]) - 1):
                raise _unsupported(layer, f" with axis={axis} (only the channel axis)")
            widths = tuple(int(s[-1]) for s in shapes)
            op = _Op("concat", weights=tuple(w / sum(widths) for w in widths))
        else:
            scale = 1.0 / len(sources) ** 2 if isinstance(layer, keras.layers.Average) else 1.0
            op = _Op("add", scale=scale)
            self._check_independent(layer, sources)
        op.inputs = tuple(sources)
        self.ops.append(op)
        return len(self.ops) - 1

    def _check_independent(self, layer, sources):
        """The kernel of a sum is the sum of kernels only for uncorrelated branches.

        A branch ending in a fresh layer with weights (then linear maps only) is
        centred and uncorrelated with any branch not computed from that layer
        (neural-tangents' FanInSum assumes this, as in x + f(x) residual blocks).
        """
        source = [self._source(s) for s in sources]
        for i in range(len(sources)):
            for j in range(i + 1, len(sources)):
                si, sj = source[i], source[j]
                if (si is not None and sj is not None and si != sj) or (
                        si is not None and si not in _ancestors(self.ops, sources[j])) or (
                        sj is not None and sj not in _ancestors(self.ops, sources[i])):
                    continue
                raise _unsupported(layer, ": two of its inputs are correlated beyond their "
                                          "kernels (e.g. x + relu(x)); each summand but one "
                                          "must end in its own layer with weights")

    def _source(self, index):
        """The weighted step whose random output `index` linearly carries, else None."""
        while index >= 0:
            op = self.ops[index]
            if op.kind in _WEIGHTED:
                return index
            if op.kind not in _LINEAR:
                return None
            index = op.inputs[0]
        return None

    def model(self, model, source):
        if isinstance(model, keras.Sequential):
            for layer in model.layers:
                if not isinstance(layer, keras.layers.InputLayer):
                    source = self.layer(layer, [source], [_output_shape(layer)])
            return source
        return self.functional(model, source)

    def functional(self, model, source):
        try:
            config = model.get_config()
            layers, inputs, outputs = (config["layers"], config["input_layers"],
                                       config["output_layers"])
        except (AttributeError, KeyError, NotImplementedError, TypeError):
            raise ValueError(
                "infinite_kernels supports Sequential and functional Keras models. "
                f"Received: model={model.name!r}") from None
        inputs, outputs = _references(inputs), _references(outputs)
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                "infinite_kernels supports models with one input and one output. "
                f"Received: model={model.name!r} with {len(inputs)} inputs, "
                f"{len(outputs)} outputs")
        tensors = {(inputs[0][0], inputs[0][2]): source}
        for entry in layers:
            nodes = entry.get("inbound_nodes", [])
            if entry["class_name"] == "InputLayer" or not nodes:
                continue
            layer = model.get_layer(entry["name"])
            if len(nodes) > 1:
                raise _unsupported(layer, ": it is called more than once (shared weights)")
            arguments = []
            _tensors_in(nodes[0].get("args", []), arguments)
            _tensors_in(nodes[0].get("kwargs", {}), arguments)
            sources = [tensors[name, index] for name, index, _ in arguments]
            shapes = [shape for _, _, shape in arguments]
            tensors[entry["name"], 0] = self.layer(layer, sources, shapes)
        return tensors[outputs[0][0], outputs[0][2]]


def _references(value):
    """[name, node, tensor] triples from a config's input_layers/output_layers."""
    if value and isinstance(value[0], str):
        return [tuple(value)]
    return [tuple(v) for v in value]


def _tensors_in(value, found):
    """(layer name, tensor index, shape) of every Keras tensor in a node's arguments."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            name, _, index = value["config"]["keras_history"]
            found.append((name, index, tuple(value["config"]["shape"])))
        else:
            for v in value.values():
                _tensors_in(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tensors_in(v, found)


def _ancestors(ops, index):
    """Step `index` and every step it depends on (indices ≥ 0; -1 is the input)."""
    seen, stack = set(), [index]
    while stack:
        i = stack.pop()
        if i >= 0 and i not in seen:
            seen.add(i)
            stack.extend(ops[i].inputs)
    return seen


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return ()


def _prune(ops, output):
    """The steps the output depends on, renumbered in order; the output last."""
    order = sorted(_ancestors(ops, output))
    index = {old: new for new, old in enumerate(order)}
    index[-1] = -1
    pruned = []
    for old in order:
        op = ops[old]
        copy = _Op(op.kind, **op.params)
        copy.inputs = tuple(index[i] for i in op.inputs)
        pruned.append(copy)
    return pruned


def _model_ops(model, collect=False):
    """The steps of a model (inputs set), pruned to those the output depends on."""
    builder = _Builder(collect)
    output = builder.model(model, -1)
    if collect:
        return builder.errors
    if output == -1:
        return []
    return _prune(builder.ops, output)


def unsupported_layers(model):
    """Every layer of `model` without an infinite-width kernel here, as `_Unsupported`
    errors (`.layer`, `.reason`); an empty list when the whole model has one."""
    return _model_ops(model, collect=True)


def _centred(ops):
    """Per step: whether its outputs have zero mean (for LayerNorm)."""
    centred = []
    for op in ops:
        inputs = [centred[i] if i >= 0 else False for i in op.inputs]
        if op.kind in _WEIGHTED:
            centred.append(True)
        elif op.kind in _LINEAR + ("add", "concat", "layernorm") or _is_odd(op):
            centred.append(all(inputs))
        else:
            centred.append(False)
    return centred


def _plan(ops, input_shape, full_covariance=False):
    """Checks shapes and picks per step the representation of the kernel.

    Returns a list of (op, mode_in, spatial_in) where mode is "fcn", "full"
    (positions of x1 × positions of x2) or "diag" (spatial diagonal only).
    Steps from which no pooling layer is reachable only need the diagonal;
    `full_covariance=True` keeps the full covariance there too (the slow
    path, for tests). 1-D inputs (N, length, C) are read as (N, 1, length, C).
    """
    if len(input_shape) == 1:
        spatial_in = None
    elif len(input_shape) == 3:
        spatial_in = tuple(input_shape[:2])
    elif len(input_shape) == 2:
        spatial_in = (1, input_shape[0])
    else:
        raise ValueError(
            "infinite_kernels supports inputs of shape (N, features), (N, length, channels) "
            f"or (N, height, width, channels). Received: input_shape={input_shape}"
        )
    n = len(ops)
    needs_full = [False] * n
    for i in reversed(range(n)):
        if ops[i].kind in ("avgpool", "gap"):
            needs_full[i] = True
        if needs_full[i]:
            for j in ops[i].inputs:
                if j >= 0:
                    needs_full[j] = True
    centred = _centred(ops)
    for i, op in enumerate(ops):
        if op.kind == "layernorm" and not all(centred[j] if j >= 0 else False
                                               for j in op.inputs):
            raise ValueError(
                "infinite_kernels: LayerNormalization needs centred inputs (the output of a "
                "layer with weights, or of linear maps and odd activations of one); its "
                f"input's mean over features is not zero here. Received: step={op}")
    spatial_out, steps = [], []
    for i, op in enumerate(ops):
        spatials = [spatial_out[j] if j >= 0 else spatial_in for j in op.inputs]
        spatial = spatials[0]
        if any(s != spatial for s in spatials):
            raise ValueError(
                f"infinite_kernels: the inputs of {op.kind} have different shapes. "
                f"Received: spatial_shapes={spatials}")
        if spatial is None:
            mode = "fcn"
        else:
            mode = "full" if needs_full[i] or full_covariance else "diag"
        if op.kind in ("conv", "avgpool", "gap") and mode == "fcn":
            raise ValueError(
                f"infinite_kernels: a {op.kind} step needs an input of shape (N, height, "
                "width, channels) or (N, length, channels) and must come before Flatten/"
                f"global average pooling. Received: step={op}"
            )
        steps.append((op, mode, spatial))
        if op.kind in ("conv", "avgpool"):
            if op.kind == "conv":
                k, s, padding = op.params["kernel_size"], op.params["strides"], op.params["padding"]
            else:
                k, s, padding = op.params["pool_size"], op.params["strides"], op.params["padding"]
            new = []
            for size, kk, ss in zip(spatial, k, s):
                if padding == "same":
                    new.append(_same_padding(size, kk, ss)[0])
                else:
                    new.append((size - kk) // ss + 1)
            if min(new) < 1:
                raise ValueError(
                    f"infinite_kernels: step {op} leaves no output positions. "
                    f"Received: spatial_shape={spatial}"
                )
            spatial = tuple(new)
        elif op.kind in ("gap", "flatten"):
            spatial = None
        spatial_out.append(spatial)
    final = spatial_out[-1] if steps else spatial_in
    if final is not None:
        raise ValueError(
            "infinite_kernels needs a flat output: end the convolutional part with "
            f"Flatten or global average pooling. Received: input_shape={input_shape}"
        )
    return steps


def _input_mode(steps):
    """Representation of the model input's covariance: full if a consumer needs it."""
    modes = [mode for op, mode, _ in steps if -1 in op.inputs]
    if "full" in modes:
        return "full"
    return modes[0] if modes else "fcn"


def _same_padding(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def _architecture(model, input_shape):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected `model` to be a keras.Model (Sequential or functional). "
            f"Received: model={model!r}"
        )
    return _plan(_model_ops(model), tuple(input_shape))
