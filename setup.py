"""keras-ntk: neural tangent kernels and linearized networks for Keras."""
import setuptools

setuptools.setup(
    name="keras-ntk",
    version="0.1.0",
    description=(
        "Neural tangent kernels, linearized networks and NTK-tracking callbacks "
        "for TensorFlow/Keras."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_ntk", "keras_ntk.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "tensorflow-datasets",
        # tfds 4.9 imports it when preparing a builder but declares it only
        # for Python < 3.9.
        "importlib_resources",
        "tensorboard",
        "tensorflow-probability",
        "tf_keras",
        "numpy",
        "scipy",
        "absl-py",
        "gin-config",
    ],
    extras_require={
        "test": ["pytest", "scikit-learn"],
        # mnist1d generates MNIST-1D offline; it imports requests and matplotlib.
        "experiments": ["matplotlib", "scikit-learn", "mnist1d", "requests"],
        "gpu": ["tensorflow[and-cuda]"],
    },
)
