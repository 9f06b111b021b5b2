"""Datasets and tasks of the experiments: tfds pipelines and the `digits` builder.

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
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

DIGITS_NUM_TRAIN = 1437
DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0

# Largest pixel value of each dataset's stored images (to scale into [0, 1]).
_PIXEL_MAX = {"digits": 16.0, "mnist": 255.0, "cifar10": 255.0}
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


@dataclasses.dataclass
class Split:
    """Arrays of one split: inputs scaled to [0, 1] float32 and int labels."""

    x: np.ndarray
    y: np.ndarray


def _check_dataset(name):
    if name not in KNOWN_DATASETS:
        raise ValueError(
            f"Unknown dataset. Known datasets: {', '.join(KNOWN_DATASETS)}. "
            f"Received: dataset={name!r}"
        )


def load_split(name, split, *, data_dir=None):
    """Loads a tfds split into memory as arrays, in a reproducible order.

    Args:
        name: "digits", "mnist" or "cifar10".
        split: a tfds split string, slices allowed (e.g. "train[:1000]").
        data_dir: tfds data directory; default `default_data_dir()`.

    Returns:
        A `Split` with x (N, H, W, C) float32 in [0, 1] and y (N,) int64.
    """
    _check_dataset(name)
    data_dir = data_dir or default_data_dir()
    if name == "digits":
        # Sort by the stored position so the order does not depend on tfds'
        # shuffle-on-write; slice afterwards so "train[:n]" means the first n
        # of the documented permutation.
        base, _, rest = split.partition("[")
        data = tfds.as_numpy(tfds.load(
            "digits", split=base, data_dir=data_dir, batch_size=-1, shuffle_files=False
        ))
        order = np.argsort(data["index"])
        x, y = data["image"][order], data["label"][order]
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
    x = x.astype(np.float32) / _PIXEL_MAX[name]
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


def load_dataset(name, *, num_train=None, num_test=None, data_dir=None):
    """Loads and standardizes a dataset (first `num_train`/`num_test` examples).

    Args:
        name: "digits", "mnist" or "cifar10".
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
