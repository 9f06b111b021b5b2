"""The infinite-width NTK or NNGP of a model as a TensorFlow Probability PSD kernel.

Imported lazily by `keras_ntk.infinite.NTKPsdKernel` (TensorFlow Probability is
heavy and needs tf_keras).
"""

import tensorflow as tf
import tensorflow_probability as tfp

from keras_ntk._kernel_plan import _architecture
from keras_ntk._kernel_recursion import _compiled


def _pairwise_kernels(compiled, x1, x2):
    """Kernels of the pairs (x1[i], x2[i]) as tensors of shape (N,)."""
    v1 = compiled.self_variances(x1)
    v2 = compiled.self_variances(x2)
    return compiled.pairwise(x1, x2, v1, v2)


class NTKPsdKernel(tfp.math.psd_kernels.PositiveSemidefiniteKernel):
    """The infinite-width NTK or NNGP of a model as a tfp PSD kernel.

    The kernel plugs into `tfp.distributions.GaussianProcess` and
    `GaussianProcessRegressionModel`: the posterior of a GP with the NNGP
    kernel is Bayesian inference with the infinite network; with the NTK
    its mean is the infinite network trained to convergence by gradient
    descent on MSE (when the initial outputs are zero).

    Args:
        model: an architecture supported by `keras_ntk.infinite_kernels`.
        kind: "ntk" (default) or "nngp".
        input_shape: the example shape, default the model's input shape.
        dtype: "float64" (default) or "float32".
        name: the kernel's name.

    Example:

    ```python
    kernel = keras_ntk.infinite.NTKPsdKernel(model, kind="nngp")
    gp = tfp.distributions.GaussianProcessRegressionModel(
        kernel, index_points=x_test, observation_index_points=x_train,
        observations=y_train, observation_noise_variance=1e-2)
    mean = gp.mean()
    ```
    """

    def __init__(self, model, kind="ntk", input_shape=None, dtype="float64",
                 name="NTKPsdKernel"):
        parameters = dict(locals())
        if kind not in ("ntk", "nngp"):
            raise ValueError(f"Expected `kind` 'ntk' or 'nngp'. Received: kind={kind!r}")
        if input_shape is None:
            input_shape = tuple(model.input_shape[1:])
        self._model = model
        self._kind = kind
        self._example_shape = tuple(input_shape)
        self._compiled = _compiled(_architecture(model, self._example_shape))
        super().__init__(feature_ndims=len(self._example_shape),
                         dtype=tf.as_dtype(dtype), name=name, parameters=parameters)

    @classmethod
    def _parameter_properties(cls, dtype):
        return dict()

    def _pick(self, kernels):
        return kernels[1] if self._kind == "ntk" else kernels[0]

    def _apply(self, x1, x2, example_ndims=0):
        x1 = tf.convert_to_tensor(x1, self.dtype)
        x2 = tf.convert_to_tensor(x2, self.dtype)
        shape = tf.broadcast_dynamic_shape(tf.shape(x1), tf.shape(x2))
        x1 = tf.broadcast_to(x1, shape)
        x2 = tf.broadcast_to(x2, shape)
        lead = shape[:-self.feature_ndims]
        flat = tf.concat([[-1], shape[-self.feature_ndims:]], 0)
        values = self._pick(_pairwise_kernels(
            self._compiled, tf.reshape(x1, flat), tf.reshape(x2, flat)))
        return tf.reshape(values, lead)

    def _matrix(self, x1, x2):
        x1 = tf.convert_to_tensor(x1, self.dtype)
        x2 = tf.convert_to_tensor(x2, self.dtype)
        if x1.shape.rank != self.feature_ndims + 1 or x2.shape.rank != self.feature_ndims + 1:
            return super()._matrix(x1, x2)
        v1 = self._compiled.self_variances(x1)
        v2 = self._compiled.self_variances(x2)
        return self._pick(self._compiled.cross(x1, x2, v1, v2))
