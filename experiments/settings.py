"""The arguments of each study binary's `run`: what they mean and which values it refuses.

A binary's `run(...)` keeps its keyword arguments, with their defaults, in its
signature: gin binds them by name (`linear_vs_nonlinear.run.epochs = 5`) and
writes them into the operative config. Its first line gathers them into the
study's settings object of this module, whose docstring documents every
argument and whose `validate` refuses impossible values before any work:

    def run(*, output_dir, strategy, ..., overwrite=False):
        options = settings.LinearVsNonlinear(**locals())
        options.validate()

Each refusal is a ValueError naming the gin binding (`experiments.bindings`).
Checks that need the loaded dataset (sizes larger than a split) are a second
method, called once the data are loaded. The arguments the launcher passes
itself (`output_dir`, `strategy`, `model_builders`, `data_dir`, `overwrite`,
`simulate_crash_after_epochs`; `launcher.FROM_THE_BINARY`) cannot be bound
by a config; they are documented once, in `Launched`.
"""

import dataclasses

from experiments import bindings, entk, network_fit


@dataclasses.dataclass(kw_only=True)
class Launched:
    """What the launcher passes to every study's `run`.

    Attributes:
        output_dir: the run's directory (local or gs://; data_scaling: local).
        strategy: the `tf.distribute.Strategy` models are built in.
        model_builders: name → builder(input_shape, num_outputs, ...)
            (`experiments.configurables.MODELS`, gin-configured).
        data_dir: tfds data directory.
        overwrite: discard stored cells computed with other settings instead
            of refusing to run (`--overwrite`).
    """

    output_dir: str
    strategy: object
    model_builders: object
    data_dir: object
    overwrite: bool


# ---------------------------------------------------------------- study A


@dataclasses.dataclass(kw_only=True)
class LinearVsNonlinear(Launched):
    """The arguments of study A's `linear_vs_nonlinear.run`.

    Attributes:
        dataset: "digits", "mnist" or "cifar10".
        models: names of the models to study.
        tasks: among "eigenfunction" and "binary".
        ks: eigenfunction indices (1 = top eigenvector).
        seeds: data-order seeds; every seed starts from the same θ0.
        init_seed: the seed of θ0 (one per model).
        num_train, num_test: use the first examples of each split (None: all).
        epochs, batch_size, learning_rate, momentum: the training recipe.
        drop_remainder: drop each epoch's last incomplete batch (the
            reference code does; base.gin sets it).
        jit_compile: passed to `model.compile`.
        linearized_init_mode: "full" f(θ0) + J(θ0)(θ−θ0) (the reference's
            main comparison, train_ntk.py) or "difference" J(θ0)(θ−θ0).
        num_probe: training inputs on which kernels are compared.
        num_projection: number of eigenvectors of Θ0 over train+test for a_j
            and the label energy.
        ntk_batch_size: block size for `keras_ntk.empirical_ntk` (None: auto).
        ntk_implementation: its `implementation` argument.
        eigen_solver: how the eigenfunction tasks' eigenvectors of Θ0 on
            train+test are found: "dense" (form Θ, `numpy.linalg.eigh`),
            "lanczos" (`keras_ntk.ntk_eigsh`, matrix-free, only the top
            max(ks, num_projection) pairs) or "auto" (Lanczos above 8000 inputs).
        max_new_cells: stop after this many newly finished cells (None: all).
        verbose: passed to `model.fit`.
        tensorboard: write TensorBoard logs of every fit.
        fit_backups: back up every fit each epoch (a killed fit resumes at its
            last epoch; without, a killed cell resumes at its last finished
            model). Each costs about 0.15 s per epoch on the 2-core CPU.
        write_report: write figures and report.md at the end.
        simulate_crash_after_epochs: kill the process after this many epochs
            of the first fit (tests of resuming; `--simulate_crash_after_epochs`).
    """

    TASKS = ("eigenfunction", "binary")
    LINEARIZATION_MODES = ("full", "difference")

    dataset: str
    models: object
    tasks: object
    ks: object
    seeds: object
    init_seed: int
    num_train: object
    num_test: object
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    drop_remainder: bool
    jit_compile: object
    linearized_init_mode: str
    num_probe: int
    num_projection: int
    ntk_batch_size: object
    ntk_implementation: str
    eigen_solver: str
    max_new_cells: object
    verbose: object
    tensorboard: bool
    fit_backups: bool
    write_report: bool
    simulate_crash_after_epochs: object

    def validate(self):
        """Refuses unknown names and impossible numbers before any work, naming the binding."""
        checks = bindings.Bindings("linear_vs_nonlinear")
        tasks, ks = list(self.tasks), [int(k) for k in self.ks]
        checks.dataset(self.dataset)
        checks.models("models", list(self.models), self.model_builders)
        checks.known("tasks", tasks, self.TASKS, "task")
        if "eigenfunction" in tasks and (not ks or any(k < 1 for k in ks)):
            raise ValueError(f"Expected eigenfunction indices k >= 1. Received: ks={ks!r}")
        checks.known("eigen_solver", self.eigen_solver, entk.SOLVERS, "eigen_solver")
        checks.known("linearized_init_mode", self.linearized_init_mode,
                     self.LINEARIZATION_MODES, "linearized_init_mode")
        checks.check(epochs=(self.epochs, bindings.POSITIVE_INT),
                     batch_size=(self.batch_size, bindings.POSITIVE_INT),
                     learning_rate=(self.learning_rate, bindings.POSITIVE_NUMBER),
                     momentum=(self.momentum, bindings.MOMENTUM),
                     num_train=(self.num_train, bindings.OPTIONAL_POSITIVE_INT),
                     num_test=(self.num_test, bindings.OPTIONAL_POSITIVE_INT),
                     num_probe=(self.num_probe, bindings.POSITIVE_INT),
                     num_projection=(self.num_projection, bindings.POSITIVE_INT),
                     max_new_cells=(self.max_new_cells, bindings.OPTIONAL_NON_NEGATIVE_INT),
                     seeds=(list(self.seeds), bindings.DISTINCT_INTS))

    def validate_sizes(self, data):
        """Refuses sizes larger than the loaded dataset (tfds slicing would silently clip them)."""
        checks = bindings.Bindings("linear_vs_nonlinear")
        train_size = len(data.train.y)
        checks.at_most("num_train", self.num_train, train_size, f"(the {self.dataset} train split)")
        checks.at_most("num_test", self.num_test, len(data.test.y),
                       f"(the {self.dataset} test split)")
        checks.at_most("num_probe", self.num_probe, train_size, "training examples")
        if self.drop_remainder:
            checks.at_most("batch_size", self.batch_size, train_size,
                           "training examples with drop_remainder (no full batch otherwise)")


# ---------------------------------------------------------------- study B


@dataclasses.dataclass(kw_only=True)
class DataScaling(Launched):
    """The arguments of study B's `data_scaling.run`.

    Cells (network: one per (seed, n); kernel methods: one per seed, all n
    from one sliced kernel) live in the cell store (`experiments.cells`)
    with their operative settings; finished ones are skipped, ones of other
    settings refused (or recomputed with `overwrite`).

    Attributes:
        dataset: "digits", "mnist1d" (or a config such as "mnist1d/8000"),
            "mnist" or "cifar10".
        model: the architecture (a name in `model_builders`), C logits.
        methods: among "network", "entk_init", "entk_init_centred",
            "after_kernel", "infinite_ntk" (docs/study_b.md).
        n0s: pre-training sizes of the after-kernels (fitted on n ≥ n0 only).
        sizes: the n grid; None: `num_sizes` geometric sizes from `smallest_n`
            to all candidates.
        smallest_n, num_sizes: the default grid.
        seeds: seeds (θ0 and the training subsets).
        large_n, seeds_large_n: sizes ≥ `large_n` run only on the first
            `seeds_large_n` seeds (None: every seed at every size).
        split_seed: seed of the validation / n0 pool / candidates partition.
        num_validation: validation examples (ridge choice only).
        num_train, num_test: use the first examples of each split (None: all).
        ridge_factors: λ / mean(diag Θ_train) candidates.
        network_loss: "mse" (one-hot targets) or "cross_entropy".
        stop_criterion, train_steps, batch_size, learning_rate, momentum,
        convergence_loss, jit_compile: the network recipe
            (`network_fit.train_network`; `train_steps` is the cap).
        infinite_sigma_w2, infinite_sigma_b2: σw², σb² of the NTK-parameterized
            twin (1, 0 match LeCun-normal weights and zero biases at init).
        ntk_batch_size, ntk_implementation: `keras_ntk.empirical_ntk` options.
        after_kernel_f0: after-kernels also add the pre-trained network's
            outputs (f_n0 + Θ(Θ+λ)⁻¹(Y − f_n0)); default kernel-only.
        fit_window: (low, high) sizes of the power-law fits (None ends: open).
        local_points: the local exponent is fitted over this many largest sizes.
        num_bootstrap: bootstrap resamples (seeds × test examples).
        max_new_cells: stop after this many newly finished cells (None: all).
        write_figures: draw the figures at the end.
        simulate_crash_after_epochs: kill the process after this many chunks
            of the first network fit (tests of resuming).
    """

    METHODS = ("network", "entk_init", "entk_init_centred", "infinite_ntk", "after_kernel")
    NETWORK_LOSSES = ("mse", "cross_entropy")

    dataset: str
    model: str
    methods: object
    n0s: object
    sizes: object
    smallest_n: int
    num_sizes: int
    seeds: object
    large_n: object
    seeds_large_n: object
    split_seed: int
    num_validation: int
    num_train: object
    num_test: object
    ridge_factors: object
    network_loss: str
    stop_criterion: str
    train_steps: int
    batch_size: int
    learning_rate: float
    momentum: float
    convergence_loss: float
    jit_compile: object
    infinite_sigma_w2: float
    infinite_sigma_b2: float
    ntk_batch_size: object
    ntk_implementation: str
    after_kernel_f0: bool
    fit_window: object
    local_points: int
    num_bootstrap: int
    max_new_cells: object
    write_figures: bool
    simulate_crash_after_epochs: object

    def validate(self):
        """Refuses impossible settings before any work, naming the gin binding."""
        checks = bindings.Bindings("data_scaling", qualified=True)
        methods, seeds = list(self.methods), self.seeds
        checks.dataset(self.dataset, configs=True)
        checks.models("model", self.model, self.model_builders)
        # after_kernel runs one method per n0 in `n0s`.
        checks.known("methods", methods, self.METHODS, "method")
        checks.check(methods=(methods, bindings.DISTINCT))
        if "after_kernel" in methods:
            checks.check(n0s=([int(v) for v in self.n0s], bindings.NON_EMPTY_POSITIVE_INTS))
        checks.known("network_loss", self.network_loss, self.NETWORK_LOSSES, "network_loss")
        checks.known("stop_criterion", self.stop_criterion, network_fit.STOP_CRITERIA,
                     "stop_criterion")
        checks.check(sizes=(self.sizes, bindings.OPTIONAL_SIZES),
                     seeds=(list(seeds), bindings.DISTINCT_INTS),
                     fit_window=(self.fit_window, bindings.OPTIONAL_RANGE))
        large_n, seeds_large_n = self.large_n, self.seeds_large_n
        if (large_n is None) != (seeds_large_n is None) or (
                seeds_large_n is not None and not 1 <= seeds_large_n <= len(seeds)):
            raise ValueError(
                "Expected large_n and seeds_large_n both set (1 <= seeds_large_n <= len(seeds)) "
                f"or both None. Received: data_scaling.run.seeds_large_n={seeds_large_n}; "
                f"data_scaling.run.large_n={large_n!r}")

    def network_recipe(self):
        """The networks' training recipe (`network_fit.train_network`), as cells record it."""
        return dict(loss=self.network_loss, train_steps=self.train_steps,
                    batch_size=self.batch_size, learning_rate=self.learning_rate,
                    momentum=self.momentum, convergence_loss=self.convergence_loss,
                    stop_criterion=self.stop_criterion)

    def cell_settings(self, common, method, seed, n, seed_sizes, num_test):
        """The operative settings of one cell: `common` (data, model, split) and the method's.

        A network cell is one size `n`; a kernel cell holds every size of its
        seed (`seed_sizes`: the kernel's union, and so its inputs, is fixed by
        the largest). What only changes speed or memory is left out.
        """
        if method == "network":
            return dict(common, method=method, seed=seed, n=n, **self.network_recipe())
        kernel = dict(common, method=method, seed=seed, sizes=seed_sizes,
                      ridge_factors=list(self.ridge_factors), test_inputs=num_test)
        if method == "infinite_ntk":
            return dict(kernel, infinite_sigma_w2=self.infinite_sigma_w2,
                        infinite_sigma_b2=self.infinite_sigma_b2)
        if method in ("entk_init", "entk_init_centred"):
            return dict(kernel, ntk_implementation=self.ntk_implementation)
        return dict(kernel, ntk_implementation=self.ntk_implementation,
                    after_kernel_f0=bool(self.after_kernel_f0), **self.network_recipe())

    def recorded(self):
        """The settings results.json records (`settings`)."""
        return dict(self.network_recipe(), model=self.model,
                    ridge_factors=list(self.ridge_factors), split_seed=self.split_seed,
                    infinite_sigma_w2=self.infinite_sigma_w2,
                    infinite_sigma_b2=self.infinite_sigma_b2,
                    after_kernel_f0=bool(self.after_kernel_f0), large_n=self.large_n,
                    seeds_large_n=self.seeds_large_n,
                    fit_window=None if self.fit_window is None else list(self.fit_window),
                    local_points=self.local_points)

    def validate_candidates(self, num_train, num_candidates, n0s):
        """Refuses a split leaving fewer than 2 candidates (training − validation − n0 pool)."""
        if num_candidates < 2:
            raise ValueError(
                "No candidates left for the regression samples after the validation set and "
                f"the n0 pool. Received: num_train={num_train}, "
                f"num_validation={self.num_validation}, n0s={n0s}")

    def validate_sizes(self, num_train, num_candidates, n0s, sizes):
        """Refuses a grid the candidates (training examples − validation − n0 pool) cannot fill."""
        if max(sizes) > num_candidates:
            raise ValueError(
                f"Expected sizes at most {num_candidates} (candidates disjoint from the "
                f"validation set and the n0 pool: {num_train} training examples − "
                f"num_validation={self.num_validation} − max(n0s)={max(n0s, default=0)}). "
                f"Received: data_scaling.run.sizes={sizes}")


@dataclasses.dataclass(kw_only=True)
class KernelEvolution(Launched):
    """The arguments of study B's `kernel_evolution.run`.

    Attributes:
        dataset: "digits", "mnist" or "cifar10".
        model: "mlp" (`depth` hidden layers of `width`), "conv1d" (`depth`
            convolutions of `width` channels), "lenet" (filters (w, 2w),
            hidden (8w, 8w)) or "resnet18" (stage-1 width w).
        widths: the widths to compare.
        depth: hidden layers of the MLP.
        epochs, batch_size, learning_rate, momentum: SGD at a CONSTANT rate
            on all training examples.
        loss: "cross_entropy" (softmax) or "mse" (one-hot targets).
        seeds: seeds of θ0 and the data order (one network per width and seed).
        num_snapshots: about this many log-spaced velocity times t_i from 1
            to the last step − Δt (each with a snapshot at t_i and t_i + Δt).
        velocity_dt: Δt in steps, the same at every t_i (the velocity is the
            cosine distance of Θ(t_i) and Θ(t_i + Δt) divided by Δt).
        probe_seed: seed of the probe's training inputs (the same for every seed).
        num_probe, num_validation: training inputs of the probe set used as
            the kernel-regression training set and to choose its ridge; the
            probe set also holds every test input.
        num_train, num_test: use the first examples of each split (None: all).
        ridge_factors: λ / mean(diag Θ) candidates.
        jit_compile: passed to `model.compile`.
        save_kernels: also keep every snapshot kernel (NTKTracker save_dir,
            read with `keras_ntk.load_ntk_history`) under `kernels/`.
        ntk_batch_size, ntk_implementation: `keras_ntk.empirical_ntk` options.
        write_figures: draw the figures at the end.
        (`overwrite` discards the (width, seed) runs stored with other settings.)
    """

    LOSSES = ("cross_entropy", "mse")

    dataset: str
    model: str
    widths: object
    depth: int
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    loss: str
    seeds: object
    num_snapshots: int
    velocity_dt: int
    probe_seed: int
    num_probe: int
    num_validation: int
    num_train: object
    num_test: object
    ridge_factors: object
    jit_compile: object
    save_kernels: bool
    ntk_batch_size: object
    ntk_implementation: str
    write_figures: bool

    def validate(self):
        """Refuses unknown names and impossible numbers before any work, naming the binding."""
        checks = bindings.Bindings("kernel_evolution", qualified=True)
        checks.known("loss", self.loss, self.LOSSES, "loss")
        checks.models("model", self.model, self.model_builders)
        checks.dataset(self.dataset, configs=True)
        checks.check(widths=(list(self.widths), bindings.NON_EMPTY_POSITIVE_INTS),
                     seeds=(list(self.seeds), bindings.DISTINCT_INTS),
                     num_probe=(self.num_probe, bindings.POSITIVE_INT),
                     num_validation=(self.num_validation, bindings.POSITIVE_INT),
                     epochs=(self.epochs, bindings.POSITIVE_INT),
                     batch_size=(self.batch_size, bindings.POSITIVE_INT))

    def validate_sizes(self, data):
        """Refuses a probe and validation set larger than the loaded training split."""
        if self.num_probe + self.num_validation > len(data.train.y):
            raise ValueError(
                f"Expected num_probe + num_validation <= {len(data.train.y)} training examples. "
                f"Received: kernel_evolution.run.num_probe={self.num_probe}, "
                f"kernel_evolution.run.num_validation={self.num_validation}"
            )


# ---------------------------------------------------------------- study C


_AT_MOST_ONE = ("in (0, 1] (η/η_max of gradient flow)",
                lambda v: bindings.POSITIVE_NUMBER[1](v) and v <= 1)
_BELOW_ONE = ("in (0, 1) (discrete steps diverge at η_max)",
              lambda v: bindings.POSITIVE_NUMBER[1](v) and v < 1)


@dataclasses.dataclass(kw_only=True)
class Trainability(Launched):
    """The arguments of study C's `trainability.run`.

    `strategy` holds the finite networks of part 4; `model_builders` is
    unused (study C builds `models.ntk_fcn`/`ntk_cnn` per grid point) and
    accepted for the launcher's interface.

    Attributes:
        dataset: "digits", "mnist" or "cifar10".
        num_train, num_test: the first examples of each split for parts 1, 2
            (None: all).
        heldout: the held-out examples of parts 1, 2: "test" (the first
            num_test of the test split) or "test_and_unused_train" (also the
            training examples beyond num_train).
        activations: phase diagrams to draw, among "relu", "erf".
        relu_sigma_w2, erf_sigma_w2: the σw² grid per activation (ReLU ≤ 2).
        sigma_b2: σb² of every layer.
        depths: the depth grid (hidden layers, increasing, ≥ 0); one
            all-depths kernel recursion per σw² gives them all.
        times: gradient-flow times t (in steps of η) at which the training
            loss and accuracies are read.
        learning_rate_fraction: η / η_max of the gradient flow (≤ 1; 1 is
            the notebook's 2/λmax in neural-tangents' normalization).
        architectures: among "fcn", "cnn_flatten", "cnn_gap".
        architecture_depths: depths of part 3 (results' `test_accuracy` is
            the deepest).
        architecture_activation, architecture_sigma_w2: part 3's network.
        architecture_num_train, architecture_num_test: part 3's subset (the
            first examples of each split; CNN-GAP kernels cost (H·W)² per pair).
        conv_kernel_size: convolution window of part 3.
        ridge: kernel-regression ridge, relative to the mean diagonal (part 3).
        finite_widths, finite_seeds, finite_depth, finite_activation,
        finite_sigma_w2, finite_num_train, finite_steps: part 4.
        finite_learning_rate_fraction: η / η_max of part 4's discrete steps (< 1).
        kernel_batch_size: `infinite_kernels` block size (None: automatic).
        write_figures: draw the PNG figures at the end.
    """

    ARCHITECTURES = ("fcn", "cnn_flatten", "cnn_gap")
    # Held-out examples of parts 1-2: the test split, or also the training
    # examples beyond num_train (digits has 1797 examples in all).
    HELDOUT = ("test", "test_and_unused_train")
    ACTIVATIONS = ("relu", "erf")

    dataset: str
    num_train: object
    num_test: object
    activations: object
    relu_sigma_w2: object
    erf_sigma_w2: object
    sigma_b2: float
    depths: object
    times: object
    learning_rate_fraction: float
    heldout: str
    architectures: object
    architecture_depths: object
    architecture_activation: str
    architecture_sigma_w2: float
    architecture_num_train: int
    architecture_num_test: object
    conv_kernel_size: int
    ridge: float
    finite_widths: object
    finite_seeds: object
    finite_depth: int
    finite_activation: str
    finite_sigma_w2: float
    finite_num_train: int
    finite_steps: int
    finite_learning_rate_fraction: float
    kernel_batch_size: object
    write_figures: bool

    @property
    def grids(self):
        """The σw² grid per activation, as floats."""
        return {"relu": [float(s) for s in self.relu_sigma_w2],
                "erf": [float(s) for s in self.erf_sigma_w2]}

    def validate(self):
        """Refuses unknown names and impossible numbers before any work, naming the binding."""
        checks = bindings.Bindings("trainability")
        activations, grids = list(self.activations), self.grids
        checks.dataset(self.dataset)
        checks.known("activations", activations, self.ACTIVATIONS, "activation")
        for activation in activations:
            checks.check(**{f"{activation}_sigma_w2": (grids[activation],
                                                       bindings.POSITIVE_NUMBERS)})
        if "relu" in activations and any(s > 2.0 for s in grids["relu"]):
            raise ValueError("ReLU has no chaotic phase (q* is infinite for σw² > 2): keep "
                             f"relu_sigma_w2 ≤ 2. Received: relu_sigma_w2={list(grids['relu'])!r}")
        checks.check(depths=([int(d) for d in self.depths], bindings.INCREASING_NON_NEGATIVE_INTS),
                     times=([float(t) for t in self.times], bindings.NON_NEGATIVE_NUMBERS),
                     learning_rate_fraction=(self.learning_rate_fraction, _AT_MOST_ONE),
                     finite_learning_rate_fraction=(self.finite_learning_rate_fraction,
                                                    _BELOW_ONE))
        checks.known("heldout", self.heldout, self.HELDOUT, "heldout")
        checks.known("architectures", list(self.architectures), self.ARCHITECTURES,
                     "architecture")
        checks.check(num_train=(self.num_train, bindings.OPTIONAL_POSITIVE_INT),
                     num_test=(self.num_test, bindings.OPTIONAL_POSITIVE_INT),
                     architecture_num_train=(self.architecture_num_train, bindings.POSITIVE_INT),
                     architecture_num_test=(self.architecture_num_test,
                                            bindings.OPTIONAL_POSITIVE_INT),
                     finite_num_train=(self.finite_num_train, bindings.POSITIVE_INT),
                     finite_steps=(self.finite_steps, bindings.POSITIVE_INT),
                     finite_depth=(self.finite_depth, bindings.NON_NEGATIVE_INT),
                     conv_kernel_size=(self.conv_kernel_size, bindings.POSITIVE_INT),
                     architecture_depths=(list(self.architecture_depths),
                                          bindings.NON_NEGATIVE_INTS),
                     finite_widths=(list(self.finite_widths), bindings.POSITIVE_INTS),
                     sigma_b2=(self.sigma_b2, bindings.FINITE_NON_NEGATIVE),
                     ridge=(self.ridge, bindings.FINITE_NON_NEGATIVE))

    def validate_sizes(self, data):
        """Refuses more examples than the loaded dataset has (its splits as loaded)."""
        for binding, requested in (("num_train", self.num_train),
                                   ("architecture_num_train", self.architecture_num_train)):
            if requested is not None and requested > len(data.train.y) and (
                    self.heldout == "test_and_unused_train" or binding == "num_train"):
                raise ValueError(
                    f"trainability.run.{binding} asks for more training examples than "
                    f"{self.dataset} has ({len(data.train.y)}). Received: {binding}={requested}")
        if self.num_test is not None and self.num_test > len(data.test.y):
            raise ValueError(
                f"trainability.run.num_test asks for more test examples than {self.dataset} "
                f"has ({len(data.test.y)}). Received: num_test={self.num_test}")
