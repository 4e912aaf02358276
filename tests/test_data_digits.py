"""Tests for the dataset registry and the bundled `digits` dataset."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mixco_tf.data import DatasetSplits, available_datasets, load_dataset, register_dataset
from mixco_tf.data import digits, registry


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits")


def bilinear_upsample(images, size):
    """NumPy bilinear resize with half-pixel centers, as tf.image.resize computes it.

    Args:
        images: float array `[batch, height, width]` with height == width.
        size: output side.
    """
    in_size = images.shape[1]
    coords = (np.arange(size) + 0.5) * in_size / size - 0.5
    coords = np.clip(coords, 0, in_size - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    weight = coords - low
    row_weight = weight[None, :, None]
    rows = images[:, low, :] * (1 - row_weight) + images[:, high, :] * row_weight
    return rows[:, :, low] * (1 - weight) + rows[:, :, high] * weight


def test_registry_lists_digits():
    assert "digits" in available_datasets()


def test_load_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="Known datasets: .*digits"):
        load_dataset("no_such_dataset")


def test_register_duplicate_name_raises(monkeypatch):
    monkeypatch.setattr(registry, "_LOADERS", dict(registry._LOADERS))

    @register_dataset("test_only_dataset")
    def loader(data_dir):
        return None

    assert "test_only_dataset" in available_datasets()
    with pytest.raises(ValueError, match="test_only_dataset"):
        register_dataset("test_only_dataset")(loader)


def test_splits_are_frozen(splits):
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.num_train = 0


def test_digits_metadata(splits):
    assert splits.name == "digits"
    assert splits.num_train == 1437
    assert splits.num_test == 360
    assert splits.num_train + splits.num_test == 1797
    assert splits.num_classes == 10
    assert splits.image_size == 32
    assert splits.class_names == tuple("0123456789")
    assert isinstance(splits, DatasetSplits)


def test_digits_arrays_shapes_and_dtypes(splits):
    for (images, labels), count in ((splits.train_arrays(), 1437), (splits.test_arrays(), 360)):
        assert images.shape == (count, 32, 32, 3)
        assert images.dtype == np.uint8
        assert labels.shape == (count,)
        assert labels.dtype == np.int64
        assert set(np.unique(labels)) == set(range(10))


def test_digits_element_spec(splits):
    for dataset in (splits.train, splits.test):
        image_spec, label_spec = dataset.element_spec
        assert image_spec.shape == (32, 32, 3)
        assert image_spec.dtype == tf.uint8
        assert label_spec.shape == ()
        assert label_spec.dtype == tf.int64


def test_digits_dataset_matches_arrays(splits):
    images, labels = splits.test_arrays()
    from_dataset = list(splits.test.as_numpy_iterator())
    assert len(from_dataset) == 360
    np.testing.assert_array_equal(np.stack([image for image, _ in from_dataset]), images)
    np.testing.assert_array_equal(np.array([label for _, label in from_dataset]), labels)


def test_digits_value_range(splits):
    images, _ = splits.train_arrays()
    assert images.min() == 0
    assert images.max() == 255


def test_digits_gray_channels_equal(splits):
    images, _ = splits.train_arrays()
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_digits_test_split_stratified(splits):
    all_labels = load_digits().target
    _, test_labels = splits.test_arrays()
    expected = np.bincount(all_labels, minlength=10) * 360 / len(all_labels)
    actual = np.bincount(test_labels, minlength=10)
    assert np.all(np.abs(actual - expected) <= 1), (actual, expected)


def test_digits_arrays_read_only(splits):
    images, _ = splits.train_arrays()
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1


def test_digits_load_deterministic(splits):
    first_images, first_labels = (array.copy() for array in splits.train_arrays())
    digits.load_digits_arrays.cache_clear()
    images, labels = load_dataset("digits").train_arrays()
    np.testing.assert_array_equal(images, first_images)
    np.testing.assert_array_equal(labels, first_labels)


def test_digits_match_numpy_conversion(splits):
    """Rebuilds the split and the 8x8 -> 32x32 conversion in NumPy and compares."""
    source = load_digits()
    train_index, test_index = train_test_split(
        np.arange(1797), test_size=360, stratify=source.target, random_state=0
    )
    small = np.round(source.images * 255 / 16)
    expected = np.clip(np.round(bilinear_upsample(small, 32)), 0, 255)

    for index, (images, labels) in (
        (train_index, splits.train_arrays()),
        (test_index, splits.test_arrays()),
    ):
        np.testing.assert_array_equal(labels, source.target[index])
        # Float32 in TensorFlow and float64 here may round a .5 value apart.
        difference = np.abs(images[..., 0].astype(np.float64) - expected[index])
        assert difference.max() <= 1


def test_digits_scale_16_to_255(splits):
    """The corner output pixel copies the corner input pixel, so the scaling shows exactly."""
    source = load_digits()
    train_index, _ = train_test_split(
        np.arange(1797), test_size=360, stratify=source.target, random_state=0
    )
    images, _ = splits.train_arrays()
    corner_in = source.images[train_index][:, 7, 7]
    corner_out = images[:, 31, 31, 0]
    assert set(np.unique(corner_in)) >= {0.0, 16.0}, "need both extremes to check the scale"
    np.testing.assert_array_equal(corner_out[corner_in == 16], 255)
    np.testing.assert_array_equal(corner_out[corner_in == 0], 0)
    np.testing.assert_array_equal(corner_out, np.round(corner_in * 255 / 16))


def test_digits_mean_std_constants(splits):
    images, _ = splits.train_arrays()
    pixels = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(splits.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-3)
    np.testing.assert_allclose(splits.std, pixels.std(axis=(0, 1, 2)), atol=1e-3)
