"""Tests of experiments/data.py: the digits builder, tfds pipelines, tasks."""

import random
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from experiments import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_digits_builder_split_matches_documented_permutation(data_dir, monkeypatch):
    # Offline: any attempt to open a network connection fails the test.
    def no_network(*args, **kwargs):
        raise AssertionError("the digits builder tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    train = data.load_split("digits", "train", data_dir=data_dir)
    test = data.load_split("digits", "test", data_dir=data_dir)
    assert train.x.shape == (1437, 8, 8, 1) and test.x.shape == (360, 8, 8, 1)

    # Independent reference: scikit-learn's arrays, permuted by RandomState(0).
    reference = load_digits()
    permutation = np.random.RandomState(0).permutation(1797)
    np.testing.assert_array_equal(train.y, reference.target[permutation[:1437]])
    np.testing.assert_array_equal(test.y, reference.target[permutation[1437:]])
    np.testing.assert_array_equal(train.x[..., 0] * 16, reference.images[permutation[:1437]])
    np.testing.assert_array_equal(test.x[..., 0] * 16, reference.images[permutation[1437:]])


def test_digits_order_and_slices_are_reproducible(data_dir, tmp_path):
    first = data.load_split("digits", "train", data_dir=data_dir)
    # A fresh preparation (tfds shuffles on write) gives the same order.
    again = data.load_split("digits", "train", data_dir=str(tmp_path))
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.y, again.y)
    sliced = data.load_split("digits", "train[10:20]", data_dir=data_dir)
    np.testing.assert_array_equal(sliced.y, first.y[10:20])
    head = data.load_split("digits", "test[:5]", data_dir=data_dir)
    assert head.y.tolist() == load_digits().target[
        np.random.RandomState(0).permutation(1797)[1437:1442]].tolist()


def test_tfds_load_digits_by_name(data_dir):
    info = tfds.builder("digits", data_dir=data_dir).info
    assert info.splits["train"].num_examples == 1437
    assert info.splits["test"].num_examples == 360
    assert info.features["label"].num_classes == 10


def _forbid_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the mnist1d builder tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module")
def mnist1d_reference():
    # Independent reference: the package's own generator, called directly.
    from mnist1d import data as mnist1d_data

    args = mnist1d_data.get_dataset_args()
    args.num_samples = 40000
    return mnist1d_data.make_dataset(args)


def test_tfds_load_mnist1d_small_generation_offline_and_reproducible(tmp_path, monkeypatch):
    # Fast version of the two tests below: generate 4000 examples instead of 40 000.
    _forbid_network(monkeypatch)
    monkeypatch.setattr(data, "MNIST1D_GENERATED_SAMPLES", 4000)
    from mnist1d import data as mnist1d_data

    args = mnist1d_data.get_dataset_args()
    args.num_samples = 4000
    reference = mnist1d_data.make_dataset(args)
    for directory in ("first", "second"):  # two independent builds
        loaded = tfds.as_numpy(tfds.load("mnist1d/4000", split="train",
                                         data_dir=str(tmp_path / directory),
                                         batch_size=-1, shuffle_files=False))
        order = np.argsort(loaded["index"])
        np.testing.assert_array_equal(loaded["x"][order], reference["x"].astype(np.float32))
        np.testing.assert_array_equal(loaded["label"][order], reference["y"])
        data.generate_mnist1d.cache_clear()


@pytest.mark.slow
def test_tfds_load_mnist1d_offline_matches_the_generator(data_dir, monkeypatch,
                                                         mnist1d_reference):
    _forbid_network(monkeypatch)
    loaded = tfds.as_numpy(tfds.load("mnist1d", split="test", data_dir=data_dir,
                                     batch_size=-1, shuffle_files=False))
    assert loaded["x"].shape == (8000, 40)
    order = np.argsort(loaded["index"])
    np.testing.assert_array_equal(loaded["x"][order],
                                  mnist1d_reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(loaded["label"][order], mnist1d_reference["y_test"])
    train = data.load_split("mnist1d", "train", data_dir=data_dir)
    assert train.x.shape == (32000, 1, 40, 1)
    np.testing.assert_array_equal(train.x[:, 0, :, 0],
                                  mnist1d_reference["x"].astype(np.float32))
    np.testing.assert_array_equal(train.y, mnist1d_reference["y"])
    # Roughly balanced classes (the generator draws 4000 per class, then permutes).
    assert np.bincount(train.y, minlength=10).min() > 3000


@pytest.mark.slow
def test_mnist1d_generation_restores_global_random_state(mnist1d_reference):
    # The package's generator reseeds `random` and `numpy.random`; ours restores them.
    random.seed(7)
    np.random.seed(7)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    data.generate_mnist1d.cache_clear()
    generated = data.generate_mnist1d()
    assert random.random() == expected_python and np.random.rand() == expected_numpy
    np.testing.assert_array_equal(generated["y"], mnist1d_reference["y"])


@pytest.mark.slow
def test_mnist1d_smaller_config_is_a_prefix_built_again(data_dir, tmp_path, monkeypatch):
    _forbid_network(monkeypatch)
    full_train = data.load_split("mnist1d", "train", data_dir=data_dir)
    full_test = data.load_split("mnist1d", "test", data_dir=data_dir)
    # A second, independent build (another directory) gives the same examples.
    small_train = data.load_split("mnist1d/4000", "train", data_dir=str(tmp_path))
    small_test = data.load_split("mnist1d/4000", "test", data_dir=str(tmp_path))
    assert len(small_train.y) == 3200 and len(small_test.y) == 800
    np.testing.assert_array_equal(small_train.x, full_train.x[:3200])
    np.testing.assert_array_equal(small_train.y, full_train.y[:3200])
    np.testing.assert_array_equal(small_test.x, full_test.x[:800])
    sliced = data.load_split("mnist1d", "train[100:110]", data_dir=data_dir)
    np.testing.assert_array_equal(sliced.y, full_train.y[100:110])
    with pytest.raises(ValueError, match="num_samples=50000"):
        data.mnist1d_config(50000)

def test_load_dataset_standardizes_with_train_statistics(data_dir):
    dataset = data.load_dataset("digits", num_train=300, num_test=50, data_dir=data_dir)
    raw = data.load_split("digits", "train[:300]", data_dir=data_dir).x
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(dataset.train.x, (raw - mean) / (std + 1e-7), rtol=1e-5, atol=1e-5)
    assert dataset.input_shape == (8, 8, 1) and len(dataset.test.y) == 50


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="cifar10, digits, mnist.*imagenet"):
        data.load_dataset("imagenet")


def test_binary_labels_split_classes_0_4_from_5_9():
    np.testing.assert_array_equal(
        data.binary_labels([0, 4, 5, 9, 3, 7]), [0, 0, 1, 1, 0, 1]
    )


def test_eigenfunction_labels_follow_sign_of_kth_eigenvector():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    eigenvalues = np.array([9.0, 7, 5, 4, 3, 2.5, 2, 1.5, 1, 0.5, 0.25, 0.1])
    order = rng.permutation(12)  # The kernel need not list them in order.
    kernel = (q[:, order] * eigenvalues[order]) @ q[:, order].T
    values, vectors = data.eigenvectors_descending(kernel, num=5)
    np.testing.assert_allclose(values, eigenvalues[:5], rtol=1e-10)
    for k in (1, 3, 5):
        labels = data.eigenfunction_labels(vectors, k)
        expected = (q[:, k - 1] >= 0).astype(np.float32)
        # Eigenvectors are defined up to sign: the task up to swapping labels.
        assert labels.tolist() in (expected.tolist(), (1 - expected).tolist())
    with pytest.raises(ValueError, match="k=6"):
        data.eigenfunction_labels(vectors, 6)


def test_training_dataset_order_is_a_function_of_seed_and_epoch():
    x = np.arange(20, dtype=np.float32)[:, None]
    y = np.arange(20, dtype=np.float32) * 10

    def batches(seed, first_epoch=0, num_epochs=1):
        return [(b[0].numpy()[:, 0], b[1].numpy()) for b in data.training_dataset(
            x, y, batch_size=8, seed=seed, first_epoch=first_epoch, num_epochs=num_epochs)]

    three = batches(3, num_epochs=3)
    assert [len(b[0]) for b in three] == [8, 8, 4] * 3  # Batches never straddle epochs.
    np.testing.assert_array_equal(three[0][1], three[0][0] * 10)  # Pairs stay together.
    orders = [np.concatenate([b[0] for b in three[3 * e:3 * e + 3]]) for e in range(3)]
    for epoch, order in enumerate(orders):
        # Each epoch is a permutation, the one named by (seed, epoch) ...
        assert sorted(order.tolist()) == list(range(20))
        np.testing.assert_array_equal(order, data.epoch_order(20, 3, epoch).numpy())
        # ... also when the dataset starts there (a resumed fit).
        np.testing.assert_array_equal(
            np.concatenate([b[0] for b in batches(3, first_epoch=epoch)]), order)
    assert orders[0].tolist() != orders[1].tolist()
    assert orders[0].tolist() != np.concatenate([b[0] for b in batches(4)]).tolist()
    assert data.steps_per_epoch(20, 8) == 3 and data.steps_per_epoch(20, 8, True) == 2
    assert [len(b[0]) for b in data.training_dataset(
        x, y, batch_size=8, seed=0, num_epochs=2, drop_remainder=True)] == [8, 8, 8, 8]


def test_cifar10_through_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load_dataset("cifar10", num_train=8, num_test=4)
    assert dataset.train.x.shape == (8, 32, 32, 3) and dataset.test.x.shape == (4, 32, 32, 3)
    assert dataset.train.x.dtype == np.float32
    # Standardized per channel with the training statistics.
    np.testing.assert_allclose(dataset.train.x.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    assert set(np.unique(dataset.train.y)) <= set(range(10))


def test_num_classes_counts_the_labels_of_both_splits():
    train = data.Split(np.zeros((3, 2), np.float32), np.array([0, 4, 1]))
    test = data.Split(np.zeros((2, 2), np.float32), np.array([6, 2]))
    assert data.Dataset("toy", train, test).num_classes == 7  # Labels 0..6.
    assert data.Dataset("toy", test, train).num_classes == 7
