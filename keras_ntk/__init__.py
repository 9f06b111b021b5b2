"""keras-ntk: neural tangent kernels and linearized networks for Keras."""
from keras_ntk.linearize import Linearize

__version__ = "0.1.0"
