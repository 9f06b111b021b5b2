"""keras-ntk: neural tangent kernels and linearized networks for Keras."""
from keras_ntk.linearize import Linearize
from keras_ntk.ntk import empirical_ntk, ntk_vector_product
from keras_ntk.layers import NTKDense, NTKConv2D, Erf
from keras_ntk.infinite import infinite_kernels, InfiniteKernels
from keras_ntk import predict

__version__ = "0.1.0"
