"""keras-ntk: neural tangent kernels and linearized networks for Keras."""
from keras_ntk import metrics
from keras_ntk import predict
from keras_ntk.callbacks import NTKTracker, load_ntk_history
from keras_ntk.infinite import InfiniteKernels, infinite_kernels
from keras_ntk.layers import Erf, NTKConv2D, NTKDense
from keras_ntk.linearize import Linearize
from keras_ntk.monte_carlo import MonteCarloKernels, monte_carlo_kernels
from keras_ntk.nngp import empirical_nngp
from keras_ntk.ntk import empirical_ntk, ntk_vector_product
from keras_ntk.spectral import NystromNTK, ntk_eigsh, nystrom_ntk

__version__ = "0.2.0.dev0"
