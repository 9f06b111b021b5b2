"""Datasets and tasks of the experiments: tfds pipelines, the `digits` and `mnist1d` builders.

`digits` is a tfds builder made from scikit-learn's bundled copy of the UCI
handwritten digits (1797 grayscale 8×8 images, pixel values 0..16, ten
classes): `tfds.load("digits")` works offline, with nothing to download.

How the split and the order are defined (reproducible by construction):

* The 1797 images, in scikit-learn's order, are permuted once with
  `numpy.random.RandomState(0).permutation(1797)`; the first 1437 permuted
  images form `train`, the remaining 360 form `test` (an 80/20 split).
* Every example carries an `index` feature: its position in its split under
  that permutation (0..1436 for train, 0..359 for test). tfds shuffles
  examples when it writes the files (by a hash of the key), so the order in
  which `tfds.load` yields them is NOT the permutation order; `load_split`
  sorts by `index`, so arrays (and slices of them) are identical on every
  machine and every run. Shuffling for training happens later, with an
  explicit seed (`experiments.train`).

`mnist1d` is a tfds builder of MNIST-1D (Greydanus 2020), generated
procedurally and offline by the `mnist1d` package
(`mnist1d.data.make_dataset(get_dataset_args())`; its `get_dataset`, which
downloads by default, is never called). How it is defined:

* ONE generation of `MNIST1D_GENERATED_SAMPLES` = 40 000 examples with the
  package's default arguments (seed 42, 40 points per sequence, its 80/20
  split: 32 000 train, 8 000 test). The package's generator draws class by
  class and then permutes, so datasets generated at different sizes are not
  nested; we therefore always generate at the largest size and take
  prefixes. It reseeds the global `random` and `numpy.random` generators:
  their states are saved and restored around it.
* A config with `num_samples` = N (default 40 000; `Mnist1dConfig`, names
  like "mnist1d/8000") holds the first 0.8·N examples of the generated train
  part as `train` and the first 0.2·N of the generated test part as `test`
  (so the test set of a smaller config is a subset of every larger one's,
  and never meets any config's train set).
* Every example carries `index`, its position in its split; `load_split`
  sorts by it (tfds shuffles on write), so the order is the generator's.
* `load_split` returns inputs shaped (1, 40, 1) (a 1×40 "image" with one
  channel, for Conv2D with 1×k kernels; an MLP flattens it) as the package
  makes them (centred, unit standard deviation over all 40 000 sequences).

`mnist` and `cifar10` come from `tfds.load` (downloaded into `data_dir` by
tfds the first time; no network is needed once prepared). Their order is
tfds' deterministic file order with `shuffle_files=False`.

Tasks built on a dataset (`Task`):

* `multiclass`: the dataset's labels.
* `binary` (the paper's CIFAR2, and digits2 likewise): label 1 for classes
  5–9, 0 for classes 0–4.
* `eigenfunction` tasks: with Θ0 the empirical NTK at initialization on
  train+test inputs and v_k its k-th eigenvector (eigenvalues in descending
  order, k counted from 1), the label of example i is (sign(v_k[i]) + 1)/2.
  Built in `experiments.linear_vs_nonlinear` from the saved θ0 with
  `eigenfunction_labels`.
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

DIGITS_NUM_TRAIN = 1437
DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0
MNIST1D_GENERATED_SAMPLES = 40_000
MNIST1D_TRAIN_FRACTION = 0.8

# Largest pixel value of each dataset's stored images (to scale into [0, 1]);
# mnist1d is stored as the generator's standardized floats.
_PIXEL_MAX = {"digits": 16.0, "mnist": 255.0, "cifar10": 255.0, "mnist1d": 1.0}
# Builders of ours whose examples carry an `index` to sort by.
_INDEXED = ("digits", "mnist1d")
KNOWN_DATASETS = tuple(sorted(_PIXEL_MAX))
KNOWN_TASKS = ("multiclass", "binary", "eigenfunction")


def default_data_dir():
    """Where tfds data live unless `data_dir` is given.

    `$KERAS_NTK_DATA_DIR` when set, otherwise `~/.cache/keras_ntk/tensorflow_datasets`.
    """
    return os.environ.get(
        "KERAS_NTK_DATA_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "keras_ntk", "tensorflow_datasets"),
    )


def digits_split_indices():
    """Indices into scikit-learn's digits array of the train and test splits.

    Returns:
        A pair of int arrays (train 1437, test 360): a fixed permutation
        (`RandomState(0)`) cut at 1437.
    """
    permutation = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(
        DIGITS_NUM_TRAIN + DIGITS_NUM_TEST
    )
    return permutation[:DIGITS_NUM_TRAIN], permutation[DIGITS_NUM_TRAIN:]


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8×8 handwritten digits (UCI), as a tfds dataset.

    1797 images, 8×8×1, uint8 values 0..16, ten classes; `train` has 1437
    images and `test` 360 (a fixed permutation with seed 0, see the module
    docstring). Each example has `image`, `label` and `index` (its position
    in its split; sort by it for a reproducible order).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fixed 1437/360 split from RandomState(0)."}
    # No checksums file to look up (nothing is downloaded); this also keeps
    # tfds from resolving the module path through `importlib_resources`.
    code_path = None

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tf.int64,
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: scikit-learn ships the data.
        train, test = digits_split_indices()
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits  # Imported lazily: heavy.

        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]
        for position, source in enumerate(indices):
            yield int(position), {
                "image": images[source],
                "label": int(digits.target[source]),
                "index": position,
            }


@functools.lru_cache(maxsize=1)
def generate_mnist1d(num_samples=MNIST1D_GENERATED_SAMPLES):
    """The one MNIST-1D generation all `mnist1d` configs take prefixes of.

    `mnist1d.data.make_dataset` with the package's default arguments and
    `num_samples` (the builder passes `MNIST1D_GENERATED_SAMPLES`), offline;
    about 6 s on an idle core, cached for the process (do not modify the
    arrays). The generator seeds the global `random` and `numpy.random`
    state; both are restored after.

    Returns:
        dict(x (32000, 40), y (32000,), x_test (8000, 40), y_test (8000,)),
        float32 inputs and int64 labels.
    """
    import random

    from mnist1d import data as mnist1d_data  # Imported lazily: pulls matplotlib.

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        args = mnist1d_data.get_dataset_args()
        args.num_samples = int(num_samples)
        generated = mnist1d_data.make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {
        "x": generated["x"].astype(np.float32), "y": generated["y"].astype(np.int64),
        "x_test": generated["x_test"].astype(np.float32),
        "y_test": generated["y_test"].astype(np.int64),
    }


def mnist1d_split_sizes(num_samples):
    """(train, test) sizes of the `mnist1d` config with `num_samples` examples (80/20)."""
    if not 10 <= num_samples <= MNIST1D_GENERATED_SAMPLES:
        raise ValueError(
            f"Expected 10 <= num_samples <= {MNIST1D_GENERATED_SAMPLES} (prefixes of one "
            f"generation). Received: num_samples={num_samples}"
        )
    num_train = int(num_samples * MNIST1D_TRAIN_FRACTION)
    return num_train, num_samples - num_train


class Mnist1dConfig(tfds.core.BuilderConfig):
    """An `mnist1d` config: `num_samples` examples, 80% train, 20% test."""

    def __init__(self, *, num_samples, **kwargs):
        mnist1d_split_sizes(num_samples)
        super().__init__(**kwargs)
        self.num_samples = int(num_samples)


def mnist1d_config(num_samples):
    """A config of `num_samples` examples, named by its size (e.g. "8000")."""
    return Mnist1dConfig(name=str(int(num_samples)), num_samples=int(num_samples),
                         description=f"The first {int(num_samples)} MNIST-1D examples (80/20).")


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D (Greydanus 2020), generated offline, as a tfds dataset.

    Sequences of 40 floats, ten classes; `train` and `test` are prefixes of
    the generated train/test parts (see the module docstring). Each example
    has `x` (40,) float32, `label` and `index` (its position in its split;
    sort by it for a reproducible order). Default config: 40 000 examples
    (32 000 train, 8 000 test); `tfds.load("mnist1d/4000")` for 4 000, or
    `tfds.builder("mnist1d", config=mnist1d_config(n))` for any n.
    """

    name = "mnist1d"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prefixes of one 40 000-example generation (seed 42)."}
    BUILDER_CONFIGS = [mnist1d_config(n) for n in (MNIST1D_GENERATED_SAMPLES, 4000)]
    code_path = None  # Nothing is downloaded (see Digits).

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "x": tfds.features.Tensor(shape=(40,), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": np.int64,
            }),
            supervised_keys=("x", "label"),
            homepage="https://github.com/greydanus/mnist1d",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data are generated.
        generated = generate_mnist1d(MNIST1D_GENERATED_SAMPLES)
        num_train, num_test = mnist1d_split_sizes(self.builder_config.num_samples)
        return {
            "train": self._generate_examples(generated["x"][:num_train],
                                             generated["y"][:num_train]),
            "test": self._generate_examples(generated["x_test"][:num_test],
                                            generated["y_test"][:num_test]),
        }

    def _generate_examples(self, xs, ys):
        for position, (x, y) in enumerate(zip(xs, ys)):
            yield position, {"x": x, "label": int(y), "index": position}


@dataclasses.dataclass
class Split:
    """Arrays of one split: inputs scaled to [0, 1] float32 and int labels."""

    x: np.ndarray
    y: np.ndarray


def _family(name):
    """The builder of a dataset name: "mnist1d/4000" (a config) → "mnist1d"."""
    return name.split("/")[0]


def _check_dataset(name):
    if _family(name) not in KNOWN_DATASETS:
        raise ValueError(
            f"Unknown dataset. Known datasets: {', '.join(KNOWN_DATASETS)}. "
            f"Received: dataset={name!r}"
        )


def load_split(name, split, *, data_dir=None):
    """Loads a tfds split into memory as arrays, in a reproducible order.

    Args:
        name: "digits", "mnist1d", "mnist" or "cifar10" (a config may follow,
            e.g. "mnist1d/4000").
        split: a tfds split string, slices allowed (e.g. "train[:1000]").
        data_dir: tfds data directory; default `default_data_dir()`.

    Returns:
        A `Split` with x (N, H, W, C) float32 in [0, 1] (mnist1d: (N, 1, 40, 1),
        standardized) and y (N,) int64.
    """
    _check_dataset(name)
    data_dir = data_dir or default_data_dir()
    family = _family(name)
    if family in _INDEXED:
        # Sort by the stored position so the order does not depend on tfds'
        # shuffle-on-write; slice afterwards so "train[:n]" means the first n
        # of the documented permutation.
        base, _, rest = split.partition("[")
        data = tfds.as_numpy(tfds.load(
            name, split=base, data_dir=data_dir, batch_size=-1, shuffle_files=False
        ))
        order = np.argsort(data["index"])
        x, y = data["image" if family == "digits" else "x"][order], data["label"][order]
        if family == "mnist1d":
            x = x.reshape(len(x), 1, 40, 1)
        if rest:
            start, _, stop = rest.rstrip("]").partition(":")
            part = slice(int(start) if start else None, int(stop) if stop else None)
            x, y = x[part], y[part]
    else:
        # Batched iteration rather than `batch_size=-1` (one huge element):
        # the latter aborts under `tfds.testing.mock_data`.
        dataset = tfds.load(
            name, split=split, data_dir=data_dir, as_supervised=True, shuffle_files=False,
        ).batch(4096)
        batches = list(tfds.as_numpy(dataset))
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
    x = x.astype(np.float32) / _PIXEL_MAX[family]
    return Split(x=x, y=np.asarray(y, dtype=np.int64))


def standardize(train_x, *others):
    """Per-channel standardization with the training set's mean and std.

    Returns:
        The standardized train inputs followed by each array of `others`.
    """
    axes = tuple(range(train_x.ndim - 1))
    mean = train_x.mean(axis=axes, keepdims=True)
    std = train_x.std(axis=axes, keepdims=True) + 1e-7
    return tuple(((x - mean) / std).astype(np.float32) for x in (train_x, *others))


def binary_labels(labels):
    """The `*2` task: 1 for classes 5–9, 0 for classes 0–4 (as CIFAR2)."""
    return (np.asarray(labels) >= 5).astype(np.float32)


def eigenvectors_descending(kernel, num=None):
    """Eigenpairs of a symmetric kernel, eigenvalues in descending order.

    Computed in float64 with `numpy.linalg.eigh`.

    Args:
        kernel: (N, N) symmetric array.
        num: how many leading eigenpairs to return; None for all.

    Returns:
        (eigenvalues (num,), eigenvectors (N, num)); column j−1 is v_j.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    kernel = 0.5 * (kernel + kernel.T)
    values, vectors = np.linalg.eigh(kernel)
    values, vectors = values[::-1], vectors[:, ::-1]
    if num is not None:
        values, vectors = values[:num], vectors[:, :num]
    return values, vectors


def eigenfunction_labels(eigenvectors, k):
    """Labels of the k-th eigenfunction task: (sign(v_k) + 1) / 2.

    Args:
        eigenvectors: (N, M) eigenvectors, column j−1 being v_j (descending
            eigenvalues), as from `eigenvectors_descending`.
        k: the eigenvector index, counted from 1.

    Returns:
        (N,) float32 labels in {0, 1} (exact zeros count as 1).
    """
    if not 1 <= k <= eigenvectors.shape[1]:
        raise ValueError(
            f"Expected 1 <= k <= {eigenvectors.shape[1]} (the stored "
            f"eigenvectors). Received: k={k}"
        )
    return (eigenvectors[:, k - 1] >= 0).astype(np.float32)


@dataclasses.dataclass
class Dataset:
    """A dataset in memory: standardized inputs and class labels."""

    name: str
    train: Split
    test: Split

    @property
    def input_shape(self):
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self):
        """The number of classes: the largest label of either split, plus one."""
        return int(max(self.train.y.max(), self.test.y.max())) + 1


def load_dataset(name, *, num_train=None, num_test=None, data_dir=None):
    """Loads and standardizes a dataset (first `num_train`/`num_test` examples).

    Args:
        name: "digits", "mnist1d", "mnist" or "cifar10".
        num_train: number of training examples (None: all).
        num_test: number of test examples (None: all).
        data_dir: tfds data directory.

    Returns:
        A `Dataset`.
    """
    _check_dataset(name)
    train = load_split(name, f"train[:{num_train}]" if num_train else "train", data_dir=data_dir)
    test = load_split(name, f"test[:{num_test}]" if num_test else "test", data_dir=data_dir)
    # Slice again: `tfds.testing.mock_data` ignores split slicing.
    train = Split(train.x[:num_train], train.y[:num_train])
    test = Split(test.x[:num_test], test.y[:num_test])
    train_x, test_x = standardize(train.x, test.x)
    return Dataset(name=name, train=Split(train_x, train.y), test=Split(test_x, test.y))


def epoch_order(num_examples, seed, epoch):
    """The order of the training examples in `epoch` (counted from 0) of a run with `seed`.

    A function of (seed, epoch) only, not of how many epochs this process
    has already iterated: a fit resumed at epoch e sees exactly the batches
    an uninterrupted fit sees there. Computed by TensorFlow's stateless
    shuffle with the seed pair (seed, epoch).

    Returns:
        An int64 tensor, a permutation of 0..num_examples−1.
    """
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64),
        seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def training_dataset(x, y, *, batch_size, seed, first_epoch=0, num_epochs=None,
                     drop_remainder=False):
    """Shuffled batches of (x, y), epoch after epoch; the order is a function of (seed, epoch).

    Epoch e yields the examples in the order `epoch_order(len(x), seed, e)`
    in batches of `batch_size` (the last one smaller unless
    `drop_remainder`), so a fit that resumes at epoch e (`first_epoch=e`)
    sees the same batches as one that never stopped. The epochs follow each
    other in ONE dataset: iterate it with `model.fit(steps_per_epoch=
    steps_per_epoch(len(x), batch_size))`, which keeps one iterator across
    epochs.

    Args:
        x, y: arrays with the same first dimension.
        batch_size: examples per batch.
        seed: the run's data-order seed.
        first_epoch: the epoch the dataset starts at.
        num_epochs: how many epochs it yields (None: forever).
        drop_remainder: drop each epoch's last, smaller batch.

    Returns:
        A `tf.data.Dataset` of (x batch, y batch).
    """
    num_examples = len(x)
    x, y = tf.constant(x), tf.constant(y)

    def one_epoch(epoch):
        order = tf.data.Dataset.from_tensor_slices(epoch_order(num_examples, seed, epoch))
        return order.batch(batch_size, drop_remainder=drop_remainder).map(
            lambda rows: (tf.gather(x, rows), tf.gather(y, rows)))

    if num_epochs is None:
        epochs = tf.data.Dataset.counter(first_epoch, dtype=tf.int64)
    else:
        epochs = tf.data.Dataset.range(first_epoch, first_epoch + num_epochs)
    return epochs.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(num_examples, batch_size, drop_remainder=False):
    """Batches per epoch of `training_dataset`."""
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)
