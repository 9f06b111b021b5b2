"""Records neural-tangents' infinite-width kernels of graph, standard-parameterization and
layer cases as test data (tests/data/infinite_nt_reference.npz), for tests/test_infinite_graphs.py.

Run in the neural-tangents venv (not a test dependency):

    /work/ntvenv/bin/python benchmarks/infinite_nt_reference.py [--out tests/data/infinite_nt_reference.npz]

Each case is a `stax.serial` whose Keras twin is built in tests/test_infinite_graphs.py with
the same widths and variances. Standard-parameterized cases use the σw² = Var(W)·fan_in that
Keras' initializers imply at the layer's actual widths (written out below), e.g. Glorot
uniform on a 5 → 16 dense layer: Var(W) = 2/(5 + 16), σw² = 10/21. Inputs: float64 normals
from numpy's default_rng(0), saved beside the kernels. Records the neural-tangents and JAX
versions.
"""
import argparse
import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

# Variance of a standard normal truncated at ±2 (Keras' TruncatedNormal draws).
TRUNCATED = 1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2))
NUMERICAL_DEGREE = 25


def _wrn_block(channels, strides, mismatch):
    main = stax.serial(stax.Relu(), stax.Conv(channels, (3, 3), strides, "SAME", 1.4, 0.1),
                       stax.Relu(), stax.Conv(channels, (3, 3), (1, 1), "SAME", 1.3, 0.05))
    shortcut = (stax.Conv(channels, (3, 3), strides, "SAME", 1.2, 0.1) if mismatch
                else stax.Identity())
    return stax.serial(stax.FanOut(2), stax.parallel(main, shortcut), stax.FanInSum())


def _res_block():
    main = stax.serial(stax.Relu(), stax.Dense(8, 1.3, 0.2), stax.Erf(), stax.Dense(8, 1.1, 0.1))
    return stax.serial(stax.FanOut(2), stax.parallel(main, stax.Identity()), stax.FanInSum())


def cases():
    std = dict(parameterization="standard")
    numerical = lambda fn: stax.ElementwiseNumerical(fn, NUMERICAL_DEGREE)
    return {
        # NTK parameterization, residual FCN (Add with identity shortcuts).
        "resnet_fcn": ((6, 5), stax.serial(
            stax.Dense(8, 1.5, 0.1), _res_block(), _res_block(), stax.Relu(),
            stax.Dense(1, 1.2, 0.1))),
        # WideResNet-style blocks: identity shortcut, then a strided conv shortcut.
        "wrn_cnn": ((5, 6, 6, 2), stax.serial(
            stax.Conv(4, (3, 3), (1, 1), "SAME", 1.4, 0.1), _wrn_block(4, (1, 1), False),
            _wrn_block(6, (2, 2), True), stax.Relu(), stax.AvgPool((2, 2), (1, 1), "VALID"),
            stax.GlobalAvgPool(), stax.Dense(1, 1.1, 0.05))),
        # Concatenation on channels of two branches of widths 2 and 5.
        "concat_cnn": ((5, 5, 5, 2), stax.serial(
            stax.Conv(3, (3, 3), (1, 1), "SAME", 1.3, 0.1), stax.Relu(), stax.FanOut(2),
            stax.parallel(stax.Conv(2, (3, 3), (1, 1), "SAME", 1.2, 0.1),
                          stax.serial(stax.Conv(5, (1, 1), (1, 1), "SAME", 1.5, 0.0), stax.Erf())),
            stax.FanInConcat(-1), stax.Flatten(), stax.Dense(1, 1.1, 0.05))),
        # Keras defaults: Dense(16, relu) Glorot uniform 5→16; Dense(12, tanh) He normal with
        # RandomNormal(0, 0.2) bias; Dense(3) VarianceScaling(1.5, fan_out, uniform), no bias.
        "standard_fcn": ((6, 5), stax.serial(
            stax.Dense(16, math.sqrt(10 / 21), 0.0, **std), stax.Relu(),
            stax.Dense(12, math.sqrt(2.0), 0.2, **std), numerical(jnp.tanh),
            stax.Dense(3, math.sqrt(1.5 / 3 * 12), None, **std))),
        # Conv2D(4, 3, same, He uniform, TruncatedNormal(0.3) bias), ReLU,
        # Conv2D(6, 3, strides 2, valid, LeCun normal), GELU, Flatten, Dense(2, RandomNormal(0.1)).
        "standard_cnn": ((5, 5, 5, 2), stax.serial(
            stax.Conv(4, (3, 3), (1, 1), "SAME", math.sqrt(2.0), 0.3 * math.sqrt(TRUNCATED), **std),
            stax.Relu(),
            stax.Conv(6, (3, 3), (2, 2), "VALID", 1.0, 0.0, **std), stax.Gelu(approximate=False),
            stax.Flatten(), stax.Dense(2, math.sqrt(0.01 * 24), 0.0, **std))),
        # LayerNorm, LeakyReLU, Sin, Sign, sigmoid (numerical), Cos; Dense(10) Glorot 5→10.
        "layers_fcn": ((6, 5), stax.serial(
            stax.Dense(10, math.sqrt(5 * 2 / 15), 0.0, **std), stax.LayerNorm(-1, eps=1e-3),
            stax.LeakyRelu(0.1), stax.Dense(8, 1.4, 0.1), stax.Sin(), stax.Dense(8, 1.2, 0.1),
            stax.Sign(), stax.Dense(8, 1.1, 0.2), numerical(jax.nn.sigmoid),
            stax.Dense(8, 1.3, 0.1), stax.Cos(), stax.Dense(1, 1.0, 0.0))),
        # Conv1D(4, 3, same, Glorot: fan_in 6, fan_out 12), ReLU, AveragePooling1D(2),
        # Conv1D(3, 2, valid, He normal, elu), GlobalAveragePooling1D, Dense(1) Glorot 3→1.
        "conv1d": ((5, 7, 2), stax.serial(
            stax.Conv(4, (3,), (1,), "SAME", math.sqrt(6 * 2 / 18), 0.0,
                      dimension_numbers=("NWC", "WIO", "NWC"), **std), stax.Relu(),
            stax.AvgPool((2,), (2,), "VALID"),
            stax.Conv(3, (2,), (1,), "VALID", math.sqrt(2.0), 0.0,
                      dimension_numbers=("NWC", "WIO", "NWC"), **std),
            numerical(jax.nn.elu), stax.GlobalAvgPool(),
            stax.Dense(1, math.sqrt(3 * 2 / 4), 0.0, **std))),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/infinite_nt_reference.npz")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    arrays = {"versions": np.array([nt.__version__, jax.__version__])}
    for name, (shape, (_, _, kernel_fn)) in cases().items():
        x = rng.normal(size=shape)
        kernels = kernel_fn(x, None, ("nngp", "ntk"))
        arrays[f"{name}_x"] = x
        arrays[f"{name}_nngp"] = np.asarray(kernels.nngp, np.float64)
        arrays[f"{name}_ntk"] = np.asarray(kernels.ntk, np.float64)
        print(f"{name}: x {shape}, nngp[0, :3] {arrays[f'{name}_nngp'][0, :3]}, "
              f"ntk[0, :3] {arrays[f'{name}_ntk'][0, :3]}")
    np.savez_compressed(args.out, **arrays)
    print("saved", args.out)


if __name__ == "__main__":
    main()
