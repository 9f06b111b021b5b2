"""`Linearize`: the first-order Taylor twin of any Keras model."""

import contextlib
import dataclasses
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_ntk import _weights
from keras_ntk._exact_calls import exact_derivatives, forward_mode_watch
from keras_ntk._jacobians import unrolled

_MODES = ("full", "difference")
_JVP_METHODS = ("auto", "forward", "double_vjp")
_ORDERS = (1, 2)


def _check_backend():
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "keras_ntk requires the TensorFlow Keras backend (set "
            "KERAS_BACKEND=tensorflow before importing keras). "
            f"Received: backend={keras.backend.backend()!r}"
        )


@dataclasses.dataclass(frozen=True)
class _WrappedState:
    """The wrapped model's variables, held outside Keras' attribute tracking.

    Keras tracks every variable assigned to a layer attribute; these belong to
    the wrapped model and must not become weights of the wrapper.
    """

    trainable: tuple  # the linearized weights (`variables`), in model order
    fixed: tuple  # the other trainable weights, held at their build-time values
    non_trainable: tuple
    indices: tuple  # positions of `trainable` in the model's trainable weights


@dataclasses.dataclass(frozen=True)
class _Untracked:
    """A value Keras must not track (e.g. the user's `variables` list)."""

    value: object


def _read(variables):
    """Current values as tensors (`.value` can be a tf.Variable, even mirrored)."""
    return [tf.convert_to_tensor(v) for v in variables]


def _contains_recurrent_layer(layer):
    """Whether `layer` is or contains a recurrent layer (a tf.while_loop)."""
    return any(isinstance(sub, keras.layers.RNN) for sub in _weights.iter_layers(layer))


def _all_ints(items):
    return isinstance(items, (list, tuple)) and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in items
    )


def _select(layer, variables):
    """Positions, in `layer.trainable_weights`, of the weights named by `variables`.

    A list of ints (what `get_config` stores) is taken as positions directly;
    anything else goes through `select_weights` (variables, layers, names).
    """
    weights = list(layer.trainable_weights)
    if variables is None:
        return list(range(len(weights)))
    items = list(variables) if isinstance(variables, (list, tuple)) else None
    if items and _all_ints(items):
        bad = [i for i in items if not 0 <= i < len(weights)]
        if bad:
            raise ValueError(
                f"Expected weight positions in [0, {len(weights)}) (the wrapped model has "
                f"{len(weights)} trainable weights). Received: variables={items}"
            )
        return sorted(set(int(i) for i in items))
    chosen = {id(w) for w in _weights.select_weights(layer, variables)}
    return [i for i, w in enumerate(weights) if id(w) in chosen]


def _double_vjp_jvp(tape, flat_outputs, primals, tangents):
    """J·t in reverse mode: J·t = ∂/∂u ⟨Jᵀu, t⟩ (the VJP is linear in u, so u = 0 works)."""
    zero = tf.UnconnectedGradients.ZERO
    cotangents = [tf.zeros_like(y) for y in flat_outputs]
    with tf.GradientTape(watch_accessed_variables=False) as transpose_tape:
        transpose_tape.watch(cotangents)
        vjps = tape.gradient(
            flat_outputs, primals, output_gradients=cotangents, unconnected_gradients=zero
        )
        pairing = tf.add_n(
            [tf.reduce_sum(v * tf.cast(t, v.dtype)) for v, t in zip(vjps, tangents)]
        )
    return transpose_tape.gradient(pairing, cotangents, unconnected_gradients=zero)


def _tracing_for_xla():
    """Whether the graph being traced now will be compiled by XLA (`jit_compile=True`).

    TensorFlow marks such graphs with an XLA control-flow context (its own
    `tf.while_loop` reads it the same way); no public API says so. If the
    check is unavailable, answers True: the custom-gradient path, which is
    right under XLA and only costs memory without it.
    """
    try:
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415
    except ImportError:  # pragma: no cover (TensorFlow moved it)
        return True
    try:
        return bool(
            control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
        )
    except AttributeError:  # pragma: no cover
        return True


def _is_float(tensor):
    return tensor.dtype.is_floating


def _to_float32(tensor):
    if tensor.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(tensor, tf.float32)
    return tensor


def _check_optimizer(optimizer):
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "Expected `optimizer` to be a Keras optimizer (e.g. `model.optimizer`). "
            f"Received: optimizer={optimizer!r} of type {type(optimizer).__name__}"
        )


def _reset_optimizer_slots(optimizer, variables):
    """Resets `optimizer`'s per-variable state for `variables` to its initial values.

    A fresh optimizer of the same configuration is built on `variables` alone;
    its slot variables carry the same names as the originals' (Keras derives
    them from the variable's path) and their initial values (zeros, or e.g.
    Adagrad's `initial_accumulator_value`).
    """
    _check_optimizer(optimizer)
    if not optimizer.built:
        return  # Nothing trained yet: no state to reset.
    config = optimizer.get_config()
    # Variables an optimizer holds for all weights (its step counter, a
    # learning-rate variable): those of a fresh optimizer built on no weights.
    shared = optimizer.__class__.from_config(config)
    shared.build([])
    shared_names = {v.name for v in shared.variables}
    fresh = optimizer.__class__.from_config(config)
    fresh.build(list(variables))
    current = {}
    for v in optimizer.variables:
        current.setdefault(v.name, []).append(v)
    for v in fresh.variables:
        if v.name in shared_names:
            continue
        for target in current.get(v.name, ()):
            if tuple(target.shape) == tuple(v.shape):
                target.assign(v.value)


@dataclasses.dataclass(frozen=True)
class _HeldValues:
    """Values of the wrapped model's weights that δ does not move, read once per call."""

    fixed: list  # trainable weights left out of `variables`
    frozen: list  # non-trainable weights (e.g. BatchNorm statistics)


def _live(layer_ref):
    """The layer behind a weak reference held by a gradient function."""
    layer = layer_ref()
    if layer is None:
        raise RuntimeError(
            "The Linearize layer this gradient belongs to no longer exists. Received: a "
            "gradient requested after the layer was freed"
        )
    return layer


def _add_input_gradient(layer_ref, inputs, flat_inputs, primals, deltas, held, zeros, result):
    """Custom-gradient paths: adds a zero term carrying ∂f_lin/∂x, computed if asked for.

    ∂f_lin/∂x differentiates the JVP itself (second order). Kept out of the
    δ-gradient, it is built only when something upstream of the inputs is
    differentiated (a trainable layer before the wrapper, input saliency);
    inside the δ-gradient, XLA would compile it into every training step.
    A module function holding the layer weakly: see `Linearize.call`.
    """
    positions = [i for i, x in enumerate(flat_inputs) if _is_float(x)]

    @tf.custom_gradient
    def input_term(*float_inputs):
        def grad(*upstream, variables=None):
            layer = _live(layer_ref)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(float_inputs)
                replaced = list(flat_inputs)
                for position, x in zip(positions, float_inputs):
                    replaced[position] = x
                _, terms = layer._taylor_terms(inputs, replaced, primals, deltas, held)
                targets = layer._combine(terms)
            input_grads = tape.gradient(
                targets,
                list(float_inputs),
                output_gradients=list(upstream),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            return list(input_grads), [None] * len(variables or ())

        return list(zeros), grad

    terms = input_term(*[flat_inputs[i] for i in positions])
    terms = list(terms) if isinstance(terms, (list, tuple)) else [terms]
    return [y + z for y, z in zip(result, terms)]


@keras.saving.register_keras_serializable(package="keras_ntk")
class Linearize(keras.layers.Wrapper):
    """Wraps a Keras model into its linearization around its current weights.

    For a model f(x; θ) with trainable weights θ, `Linearize` computes the
    first-order Taylor expansion around θ0 (the weights when the wrapper is
    built):

        f_lin(x; δ) = f(x; θ0) + J(x; θ0) · δ,    J = ∂f/∂θ at θ0,

    where the offsets δ (one per trainable weight of the wrapped model, zeros
    at start) are the ONLY trainable weights of the wrapper. `model.fit` thus
    trains the linearized model with any optimizer, loss, metric or callback;
    the effective weights are θ = θ0 + δ (`linearized_weights()`).

    J is never formed: J·δ is a Jacobian-vector product, in forward mode
    (`tf.autodiff.ForwardAccumulator`, one forward pass carrying the tangent
    δ) or as J·δ = ∂/∂u ⟨Jᵀu, δ⟩ (see `jvp_method`). The δ-gradient is exact:
    J·δ is linear in δ and θ0 is a constant, so ∂⟨u, f_lin⟩/∂δ = Jᵀu. At
    order 1 without XLA, f0 + J·δ is an ordinary differentiable function of x
    and δ: no `tf.custom_gradient` (in graph mode each one stays in
    TensorFlow's global gradient registry with its traced graph, ~1 MiB per
    model), and ∂f_lin/∂x (a trainable layer before the wrapper, input
    saliency) is computed only when something upstream of x is
    differentiated. In a step compiled by XLA, forward mode supplies Jᵀu as
    one ordinary reverse pass at θ0 through `tf.custom_gradient`: the step
    costs about one forward-mode and one reverse-mode pass and compiles once
    (differentiating TensorFlow's forward-mode functions under XLA would
    recompile the step at every step; the double VJP compiles once but costs
    up to 2× per step on convolutional models).

    The wrapped model is evaluated in inference mode (`training=False`):
    Dropout is off and BatchNorm uses moving statistics that are frozen at
    build time (or given by `non_trainable_values`), so the linearized model
    is a fixed function of x and δ. The wrapped model object is never
    modified: its variables are read once, at build, and training the wrapper
    changes only the wrapper's own weights. Wrapping a trained model
    linearizes it at its current weights.

    Args:
        layer: The Keras model or layer to linearize (Sequential, functional,
            subclassed; single or multiple inputs and outputs).
        mode: `"full"` returns f(x; θ0) + J·δ; `"difference"` returns J·δ
            only (the centred variant, which is zero at δ = 0).
        jvp_method: how J·δ is computed. `"forward"`: forward mode
            (`tf.autodiff.ForwardAccumulator`), the fastest. `"double_vjp"`:
            J·δ = ∂/∂u ⟨Jᵀu, δ⟩, two reverse-mode passes, for ops forward
            mode cannot go through (TensorFlow's forward mode fails on the
            `tf.while_loop` of recurrent layers in graph mode). `"auto"`
            (default): `"double_vjp"` when the model contains a
            `keras.layers.RNN`, else `"forward"`. With `"forward"` (and with
            `order=2`) recurrent layers are traced unrolled over time.
        non_trainable_values: Optional list of arrays, one per
            non-trainable weight of the wrapped model (e.g. BatchNorm moving
            statistics), frozen instead of the model's current values. This
            separates the linearization point from the normalization
            statistics (e.g. linearize trained weights with the statistics
            of initialization).
        variables: Optional subset of the wrapped model's trainable weights
            to linearize in: Keras Variables, layers (all their trainable
            weights) or layer names, e.g. `["head"]` for a linear probe. δ
            exists only for these; the other trainable weights are held at
            their build-time values. Default: all trainable weights. Stored
            in the config as positions in `layer.trainable_weights`.
        order: 1 (default) for the linear model f0 + J·δ; 2 for the
            second-order Taylor model f0 + J·δ + ½ δᵀHδ (H the Hessian of
            each output with respect to the weights): a forward-mode
            accumulator differentiates the reverse-mode J·δ along δ, and the
            δ-gradient is a Hessian-vector product (forward over reverse).
            Measured 2.5× a plain training step for an MLP (order 1: 1.3-1.4×);
            compiles once under XLA; recurrent layers are traced unrolled.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: The wrapped model's inputs (any nested structure).
        training: Ignored: the linearization is always evaluated in
            inference mode.

    Returns:
        The wrapped model's output structure.

    Example:

    ```python
    net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256,
        activation="relu"), keras.layers.Dense(10)])
    lin = keras.Sequential([keras.Input((64,)), keras_ntk.Linearize(net)])
    lin.compile(optimizer="sgd", loss="mse")
    lin.fit(x, y, epochs=5)          # trains δ only; `net` is unchanged
    lin.layers[0].linearized_weights()  # θ0 + δ, in `net.trainable_weights` order
    ```
    """

    def __init__(
        self,
        layer,
        *,
        mode="full",
        jvp_method="auto",
        non_trainable_values=None,
        variables=None,
        order=1,
        **kwargs,
    ):
        _check_backend()
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "Linearize expects a Keras layer or model to wrap. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        if mode not in _MODES:
            raise ValueError(
                f"Expected `mode` to be one of {_MODES}. Received: mode={mode!r}"
            )
        if jvp_method not in _JVP_METHODS:
            raise ValueError(
                f"Expected `jvp_method` to be one of {_JVP_METHODS}. "
                f"Received: jvp_method={jvp_method!r}"
            )
        if order not in _ORDERS or isinstance(order, bool):
            raise ValueError(
                f"Expected `order` to be one of {_ORDERS} (the Taylor order). "
                f"Received: order={order!r}"
            )
        if order == 2 and jvp_method == "double_vjp":
            raise ValueError(
                "The second-order model (order=2) is computed with nested forward-mode "
                "accumulators and cannot use jvp_method='double_vjp'. "
                f"Received: order={order!r}, jvp_method={jvp_method!r}"
            )
        super().__init__(layer, **kwargs)
        self.mode = mode
        self.jvp_method = jvp_method
        self.order = order
        # Held outside Keras' attribute tracking: a Variable in a list assigned
        # to the layer would become one of its weights.
        self._spec = _Untracked(variables)
        self._pending_non_trainable_values = (
            None
            if non_trainable_values is None
            else [np.asarray(v) for v in non_trainable_values]
        )
        self._wrapped = None

    # ------------------------------------------------------------------ build

    def build(self, input_shape=None):
        if not self.layer.built or not self.layer.weights:
            # Subclassed models create their variables when first called.
            spec = keras.tree.map_shape_structure(
                lambda shape: keras.KerasTensor(shape), input_shape
            )
            self.layer(spec, training=False)
        all_trainable = list(self.layer.trainable_weights)
        non_trainable = tuple(self.layer.non_trainable_weights)
        if not all_trainable:
            raise ValueError(
                "Linearize needs a layer with trainable weights to linearize "
                "around. Received: layer="
                f"{self.layer.name!r} with 0 trainable weights"
            )
        indices = tuple(_select(self.layer, self._spec.value))
        trainable = tuple(all_trainable[i] for i in indices)
        fixed = tuple(w for i, w in enumerate(all_trainable) if i not in set(indices))
        self._wrapped = _WrappedState(trainable, fixed, non_trainable, indices)
        self._initial = [
            self._snapshot_weight(f"initial_{i}", v) for i, v in enumerate(trainable)
        ]
        self._deltas = [
            self.add_weight(
                name=f"delta_{i}",
                shape=v.shape,
                dtype=v.dtype,
                initializer="zeros",
                trainable=True,
            )
            for i, v in enumerate(trainable)
        ]
        values = self._pending_non_trainable_values
        if values is None:
            values = [None] * len(non_trainable)
        else:
            self._check_non_trainable_values(values, non_trainable)
        self._frozen = [
            self._snapshot_weight(f"frozen_{i}", v, value)
            for i, (v, value) in enumerate(zip(non_trainable, values))
        ]
        # Trainable weights left out of `variables` stay at their current value.
        self._fixed = [self._snapshot_weight(f"fixed_{i}", v) for i, v in enumerate(fixed)]
        self._pending_non_trainable_values = None
        self.built = True

    def _snapshot_weight(self, name, variable, value=None):
        """A non-trainable copy of `variable` (or of `value` when given)."""

        # Initializers run eagerly (in an init scope), even when `build` is
        # traced inside a symbolic call, so the snapshot holds real values.
        def initializer(shape, dtype=None):
            source = variable.value if value is None else value
            return tf.identity(tf.cast(source, dtype or variable.dtype))

        return self.add_weight(
            name=name,
            shape=variable.shape,
            dtype=variable.dtype,
            initializer=initializer,
            trainable=False,
        )

    @staticmethod
    def _check_non_trainable_values(values, variables):
        if len(values) != len(variables):
            raise ValueError(
                "Expected one value per non-trainable weight of the wrapped "
                f"model ({len(variables)}). Received: "
                f"non_trainable_values with {len(values)} entries"
            )
        for value, variable in zip(values, variables):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Expected a value of shape {tuple(variable.shape)} for "
                    f"non-trainable weight {variable.path!r}. Received: "
                    f"shape={tuple(value.shape)}"
                )

    # ---------------------------------------------- only δ, θ0, state are ours

    @property
    def weights(self):
        """The wrapper's own weights: δ (trainable), θ0 and frozen state."""
        return list(self._trainable_variables) + list(self._non_trainable_variables)

    @property
    def variables(self):
        return self.weights

    @property
    def deltas(self):
        """The trainable offsets δ, one per linearized weight, in model order."""
        return list(self._deltas)

    @property
    def linearized_variables(self):
        """The wrapped model's weights that are linearized (δ's), in model order."""
        return list(self._wrapped.trainable)

    def _in_model_order(self, linearized):
        """All trainable weights of the wrapped model, `linearized` at the chosen positions."""
        values = iter(linearized)
        fixed = iter(_read(self._fixed))
        chosen = set(self._wrapped.indices)
        total = len(self._wrapped.trainable) + len(self._wrapped.fixed)
        return [next(values) if i in chosen else next(fixed) for i in range(total)]

    @property
    def initial_weights(self):
        """θ0 (the linearization point), in the order of the wrapped model's trainable weights.

        With `variables`, the weights left out are included at their fixed values.
        """
        return self._in_model_order(_read(self._initial))

    def linearized_weights(self):
        """Returns θ0 + δ, in the order of the wrapped model's trainable weights.

        With `variables`, the weights left out are included at their fixed
        values, so the list can be assigned to the wrapped model directly.
        """
        current = [t + d for t, d in zip(_read(self._initial), _read(self._deltas))]
        return self._in_model_order(current)

    def relinearize(self, optimizer=None):
        """Moves the linearization point to the current weights: θ0 ← θ0 + δ, δ ← 0.

        Args:
            optimizer: optional Keras optimizer that trains this wrapper (e.g.
                `model.optimizer`). Its per-variable state for δ (momentum,
                Adam moments, ...) is reset to what a fresh optimizer of the
                same configuration starts from, so that the next `fit` starts
                like a first one. Its step counter (`iterations`, shared by
                all variables and read by learning-rate schedules and Adam's
                bias correction) is left as it is.
        """
        # Every argument is checked before θ0 moves: a rejected call changes nothing.
        if not self.built:
            raise ValueError(
                "Expected a built Linearize layer (call it on data, or build it, before "
                "relinearizing: θ0 is taken at build time). Received: an unbuilt layer "
                f"{self.name!r}"
            )
        if optimizer is not None:
            _check_optimizer(optimizer)
        for initial, delta in zip(self._initial, self._deltas):
            initial.assign(initial.value + delta.value)
            delta.assign(tf.zeros_like(delta.value))
        if optimizer is not None:
            _reset_optimizer_slots(optimizer, self._deltas)

    # ------------------------------------------------------------------- call

    def call(self, inputs, training=None):
        del training  # Always inference mode: see the class docstring.
        flat_inputs = [tf.convert_to_tensor(x) for x in tf.nest.flatten(inputs)]
        # Every variable is read here, outside the custom gradients: under a
        # distribution strategy, custom_gradient cannot watch mirrored variables.
        primals = _read(self._initial)
        deltas = _read(self._deltas)
        held = _HeldValues(fixed=_read(self._fixed), frozen=_read(self._frozen))
        if self.order == 1 and not (
            self._resolved_jvp_method() == "forward" and _tracing_for_xla()
        ):
            # f0 + J·δ as an ordinary differentiable function of x and δ (θ0 is
            # a constant for every tape: only δ is trainable), no custom
            # gradient: see the class docstring. TensorFlow computes ∂f_lin/∂x
            # only when x leads to a source of the gradient.
            outputs, terms = self._taylor_terms(inputs, flat_inputs, primals, deltas, held)
            return tf.nest.pack_sequence_as(outputs, self._combine(terms))
        return self._custom_gradient_call(inputs, flat_inputs, primals, deltas, held)

    def _custom_gradient_call(self, inputs, flat_inputs, primals, deltas, held):
        """f_lin with its δ-gradient supplied by `tf.custom_gradient`.

        Order 2: Jᵀu + Hδ·u (differentiating the nested accumulators directly
        would differentiate the second-order term through a third-order graph).
        Order 1 in forward mode under XLA: Jᵀu as one ordinary VJP at θ0.
        Differentiating through TensorFlow's forward-mode functions there makes
        XLA recompile the step at every step, and the double VJP, which
        compiles once, costs up to 2× per step on convolutional models
        (benchmarks/linearize_step.py); under XLA the registry entry below is
        small beside XLA's own per-model compile cache.
        """
        # In graph mode `tf.custom_gradient` registers each gradient function in
        # TensorFlow's global gradient registry, which is never cleared: the
        # gradient functions below must not hold this layer (or its model)
        # strongly, or no wrapped model could ever be freed. They get the
        # layer through a weak reference (it is alive while gradients are
        # taken: they are taken while the step that called it is traced).
        # TensorFlow's own wrapper still holds the traced graph (~1 MiB per
        # model, benchmarks/memory_growth.py `plain_custom_gradient_fit`).
        layer_ref = weakref.ref(self)
        output_structure = input_zeros = None  # set while tracing `linearized`
        second_order = self.order == 2

        @tf.custom_gradient
        def linearized(*tangents):
            nonlocal output_structure, input_zeros
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch(primals)
                outputs, terms = self._taylor_terms(inputs, flat_inputs, primals, tangents, held)
            flat_f0 = terms[0]
            output_structure = outputs
            # From f(x; θ0) alone: the input term must not be reachable from δ.
            input_zeros = [tf.zeros_like(_to_float32(y)) for y in flat_f0]

            def grad(*upstream, variables=None):
                upstream = [tf.cast(u, y.dtype) for u, y in zip(upstream, flat_f0)]
                if second_order:
                    delta_grads = _live(layer_ref)._second_order_gradient(
                        inputs, flat_inputs, primals, tangents, held, upstream
                    )
                else:
                    # Linear in δ: ∂⟨u, f_lin⟩/∂δ = Jᵀu, one ordinary VJP at θ0.
                    delta_grads = tape.gradient(
                        flat_f0,
                        primals,
                        output_gradients=upstream,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO,
                    )
                return list(delta_grads), [None] * len(variables or ())

            return self._combine(terms), grad

        result = linearized(*deltas)
        result = list(result) if isinstance(result, (list, tuple)) else [result]
        if any(_is_float(x) for x in flat_inputs):
            result = _add_input_gradient(
                layer_ref, inputs, flat_inputs, primals, deltas, held, input_zeros, result
            )
        return tf.nest.pack_sequence_as(output_structure, result)

    def _state_mapping(self, primals, held):
        """(variable, value) pairs that evaluate the wrapped model at θ = `primals`."""
        mapping = list(zip(self._wrapped.trainable, primals))
        mapping += list(zip(self._wrapped.fixed, held.fixed))
        mapping += list(zip(self._wrapped.non_trainable, held.frozen))
        return mapping

    def _second_order_gradient(self, inputs, flat_inputs, primals, tangents, held, upstream):
        """∂/∂δ ⟨u, f0 + J·δ + ½ δᵀHδ⟩ = Jᵀu + Σ_o u_o H_o δ, by forward-over-reverse.

        With g(θ) = ∂⟨u, f(θ)⟩/∂θ (one VJP), the first term is g(θ0) and the
        second is the JVP of g along δ (a Hessian-vector product), so one
        accumulator around one reverse pass gives both.
        """
        mapping = self._state_mapping(primals, held)
        zero = tf.UnconnectedGradients.ZERO
        with tf.autodiff.ForwardAccumulator(primals, list(tangents)) as accumulator:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(primals)
                with self._call_scope(mapping):
                    outputs = self.layer(
                        tf.nest.pack_sequence_as(inputs, flat_inputs), training=False
                    )
            flat = tf.nest.flatten(outputs)
            upstream = [tf.cast(u, y.dtype) for u, y in zip(upstream, flat)]
            vjps = tape.gradient(flat, primals, output_gradients=upstream, unconnected_gradients=zero)
        hvps = [accumulator.jvp(g, unconnected_gradients=zero) for g in vjps]
        return [g + h for g, h in zip(vjps, hvps)]

    @contextlib.contextmanager
    def _call_scope(self, mapping):
        """Where the wrapped model is called to be differentiated: at θ0 (`mapping`, a
        `keras.StatelessScope`), its resizing layers replaced (`exact_derivatives`;
        grouped convolutions keep TensorFlow's op: forward mode of the split one fails
        under XLA), ops forward mode drops warned about, and where forward mode runs
        through the model (jvp_method "forward", order 2) its recurrent layers traced
        unrolled (TensorFlow's forward mode cannot run through their `tf.while_loop` in
        graph mode; `_jacobians.unrolled`, as the kernels do; it needs the number of
        time steps)."""
        forward = self.order == 2 or self._resolved_jvp_method() == "forward"
        with keras.StatelessScope(state_mapping=mapping), exact_derivatives(
                self.layer, grouped=False), forward_mode_watch("Linearize"), (
                unrolled(self.layer) if forward else contextlib.nullcontext()):
            yield

    def _resolved_jvp_method(self):
        if self.jvp_method != "auto":
            return self.jvp_method
        return "double_vjp" if _contains_recurrent_layer(self.layer) else "forward"

    def _taylor_terms(self, inputs, flat_inputs, primals, tangents, held):
        """The wrapped model's output structure and its flat Taylor terms.

        The terms at θ = `primals` in the direction `tangents` are
        [f(x; θ), J·δ] for order 1 and [f(x; θ), J·δ, δᵀHδ] for order 2 (H
        the Hessian of each output with respect to θ).
        """
        mapping = self._state_mapping(primals, held)
        tangents = list(tangents)

        def evaluate():
            with self._call_scope(mapping):
                return self.layer(
                    tf.nest.pack_sequence_as(inputs, flat_inputs), training=False
                )

        zero = tf.UnconnectedGradients.ZERO
        if self.order == 2:
            # The second directional derivative: an accumulator differentiates
            # the JVP once more along δ. The inner JVP is taken in reverse mode
            # (double VJP): two nested accumulators also give δᵀHδ, but make
            # XLA recompile the training step at every call (measured 230×).
            with tf.autodiff.ForwardAccumulator(primals, tangents) as outer:
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(primals)
                    outputs = evaluate()
                flat_f0 = tf.nest.flatten(outputs)
                flat_jvp = _double_vjp_jvp(tape, flat_f0, primals, tangents)
            flat_hvp = [outer.jvp(j, unconnected_gradients=zero) for j in flat_jvp]
            return outputs, [flat_f0, flat_jvp, flat_hvp]
        if self._resolved_jvp_method() == "forward":
            with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
                outputs = evaluate()
            flat_f0 = tf.nest.flatten(outputs)
            flat_jvp = [accumulator.jvp(y, unconnected_gradients=zero) for y in flat_f0]
        else:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(primals)
                outputs = evaluate()
            flat_f0 = tf.nest.flatten(outputs)
            flat_jvp = _double_vjp_jvp(tape, flat_f0, primals, tangents)
        return outputs, [flat_f0, flat_jvp]

    def _combine(self, terms):
        """Sums the Taylor terms: f0 + J·δ (+ ½ δᵀHδ), or without f0 in "difference" mode.

        Mixed precision: derivatives come back in float16; add in float32.
        """
        flat_f0, flat_jvp = terms[0], terms[1]
        outputs = [_to_float32(j) for j in flat_jvp]
        if len(terms) == 3:
            outputs = [y + 0.5 * _to_float32(h) for y, h in zip(outputs, terms[2])]
        if self.mode == "difference":
            return outputs
        return [_to_float32(f) + y for f, y in zip(flat_f0, outputs)]

    def compute_output_spec(self, inputs, training=None):
        spec = self.layer.compute_output_spec(inputs)

        def to_float32(s):
            if s.dtype in ("float16", "bfloat16"):
                return keras.KerasTensor(s.shape, dtype="float32")
            return s

        return keras.tree.map_structure(to_float32, spec)

    # ----------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config["mode"] = self.mode
        config["jvp_method"] = self.jvp_method
        config["order"] = self.order
        if self._wrapped is not None:
            selected = list(self._wrapped.indices)
            all_chosen = not self._wrapped.fixed
            config["variables"] = None if all_chosen else selected
        elif self._spec.value is None or _all_ints(self._spec.value):
            config["variables"] = self._spec.value
        else:
            raise ValueError(
                "Cannot serialize a Linearize layer whose `variables` are objects or names "
                "before it is built (positions are stored). Build it first. Received: "
                f"variables={self._spec.value!r}"
            )
        return config
