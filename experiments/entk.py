"""eNTK measurements of a Keras model that the studies take, in float64.

* `Kernels.kernel`: Θ(x, x) = J(x) J(x)ᵀ (`keras_ntk.empirical_ntk`, logits
  traced), as a float64 array;
* `Kernels.top_eigenpairs`: the leading eigenpairs of Θ over many inputs,
  by a dense `eigh` of the formed kernel or matrix-free by Lanczos
  (`keras_ntk.ntk_eigsh`: memory O(N·k), for CIFAR-scale N);
* `Kernels.eigenbasis_projection`: a_j = v_jᵀ Θ v_j in a fixed basis {v_j}
  (at the weights the basis comes from, the eigenvalues);
* `kernel_change`: how a kernel moved between two weights, seen from the
  labels: kernel-target alignment A(Θ, y) = yᵀΘy / (‖Θ‖_F ‖y‖²) (±1 labels)
  and its centred version, the kernel distance 1 − ⟨Θ0, ΘT⟩_F/(‖Θ0‖_F ‖ΘT‖_F)
  and the traces;
* `weight_change`: ‖θT − θ0‖, its square and ‖θT − θ0‖/‖θ0‖.
"""

import dataclasses

import numpy as np

SOLVERS = ("auto", "dense", "lanczos")
# Above this many inputs, solver "auto" uses Lanczos: the dense N×N float64
# kernel would be over 0.5 GB and its eigh O(N³).
DENSE_LIMIT = 8000


def resolve_solver(solver, num_inputs):
    """"dense" or "lanczos" for `num_inputs` inputs ("auto": Lanczos above `DENSE_LIMIT`)."""
    if solver not in SOLVERS:
        raise ValueError(f"Expected solver in {SOLVERS}. Received: solver={solver!r}")
    if solver == "auto":
        return "lanczos" if num_inputs > DENSE_LIMIT else "dense"
    return solver


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How the eNTK of a model is computed (blocks, implementation) and diagonalized.

    Args:
        batch_size: `keras_ntk.empirical_ntk` block size (None: automatic).
        implementation: its `implementation` argument.
        solver: "dense" or "lanczos" (see `resolve_solver`).
    """

    batch_size: object = None
    implementation: str = "auto"
    solver: str = "dense"

    def kernel(self, model, x):
        """Θ(x, x) of `model`, float64 (N, N)."""
        import keras_ntk

        return np.asarray(keras_ntk.empirical_ntk(model, x, batch_size=self.batch_size,
                                                  implementation=self.implementation),
                          dtype=np.float64)

    def top_eigenpairs(self, model, x, num):
        """(eigenvalues, eigenvectors[:, :num]) of Θ(x, x), descending.

        Dense: every eigenvalue (`experiments.data.eigenvectors_descending`);
        Lanczos: the top `num` pairs only, Θ never formed.
        """
        if self.solver == "lanczos":
            import keras_ntk

            values, vectors = keras_ntk.ntk_eigsh(model, x, k=num, batch_size=self.batch_size,
                                                  verbose=1)
        else:
            from experiments import data as data_lib

            values, vectors = data_lib.eigenvectors_descending(self.kernel(model, x))
        return values, vectors[:, :num]

    def eigenbasis_projection(self, model, x, eigenvectors):
        """a_j = v_jᵀ Θ v_j of `model`'s eNTK Θ over `x`, for the columns v_j.

        Dense: Θ is formed (N×N) and `keras_ntk.metrics.eigenbasis_projection`
        contracts it. Lanczos: a_j = Σ_i v_j[i] (Θ v_j)[i] from the matrix-free
        product `keras_ntk.ntk_vector_product` (implementation "ntvp").
        """
        import keras_ntk
        from keras_ntk import metrics

        eigenvectors = np.asarray(eigenvectors, np.float64)
        if self.solver == "lanczos":
            products = keras_ntk.ntk_vector_product(
                model, x, None, eigenvectors, implementation="ntvp", batch_size=self.batch_size)
            return np.sum(eigenvectors * np.asarray(products, np.float64), axis=0)
        return metrics.eigenbasis_projection(self.kernel(model, x), eigenvectors)


def _centered_alignment(kernel, labels):
    from keras_ntk import metrics

    if np.ptp(labels) == 0:
        return None  # Undefined for one class: the centred labels are zero.
    return float(metrics.kernel_alignment(kernel, labels, centered=True))


def kernel_change(kernel_init, kernel_final, labels):
    """Alignment (plain and centred) of both kernels with ±1 `labels`, their distance, traces."""
    from keras_ntk import metrics

    return {
        "alignment": {"init": float(metrics.kernel_alignment(kernel_init, labels)),
                      "final": float(metrics.kernel_alignment(kernel_final, labels))},
        "alignment_centered": {"init": _centered_alignment(kernel_init, labels),
                               "final": _centered_alignment(kernel_final, labels)},
        "kernel_distance": float(metrics.kernel_distance(kernel_init, kernel_final)),
        "trace": {"init": float(np.trace(kernel_init)), "final": float(np.trace(kernel_final))},
    }


def weights_norm(arrays):
    """‖θ‖ of a list of weight arrays, in float64."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays)))


def weight_change(initial_weights, final_weights):
    """‖θT − θ0‖ (float64), its square and ‖θT − θ0‖/‖θ0‖ of two lists of weight arrays."""
    theta0 = [np.asarray(w) for w in initial_weights]
    distance = weights_norm([np.asarray(w) - w0 for w, w0 in zip(final_weights, theta0)])
    return {"weight_distance": distance, "weight_distance_squared": distance**2,
            "relative_weight_distance": distance / weights_norm(theta0)}
