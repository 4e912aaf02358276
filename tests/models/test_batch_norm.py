"""SplitBatchNormalization against per-group NumPy normalization."""

import keras
import numpy as np
import pytest

from mixco_tf.models.batch_norm import SplitBatchNormalization


def numpy_split_batch_norm(x, splits, gamma, beta, epsilon):
    groups = x.reshape(splits, -1, *x.shape[1:])
    axes = tuple(range(1, groups.ndim - 1))
    mean = groups.mean(axis=axes, keepdims=True)
    variance = groups.var(axis=axes, keepdims=True)
    normalized = (groups - mean) / np.sqrt(variance + epsilon) * gamma + beta
    return normalized.reshape(x.shape), mean.reshape(splits, -1), variance.reshape(splits, -1)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_training_output_matches_numpy(splits):
    rng = np.random.default_rng(splits)
    x = rng.normal(2.0, 3.0, size=(8, 5, 5, 6)).astype("float32")
    layer = SplitBatchNormalization(num_splits=splits, momentum=0.9, epsilon=1e-5)
    layer.build(x.shape)
    gamma = rng.normal(size=6).astype("float32")
    beta = rng.normal(size=6).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)

    output = np.asarray(layer(x, training=True))

    expected, group_mean, group_variance = numpy_split_batch_norm(x, splits, gamma, beta, 1e-5)
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * group_mean.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), 0.9 + 0.1 * group_variance.mean(axis=0), rtol=1e-4, atol=1e-5
    )


def test_one_split_equals_keras_batch_norm():
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 3)).astype("float32")
    split = SplitBatchNormalization(num_splits=1)
    plain = keras.layers.BatchNormalization()

    np.testing.assert_allclose(np.asarray(split(x, training=True)), np.asarray(plain(x, training=True)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(split(x, training=False)), np.asarray(plain(x, training=False)), atol=1e-5)


def test_frozen_layer_still_uses_batch_statistics():
    """A momentum key encoder is frozen but must normalize with batch statistics."""
    x = np.random.default_rng(1).normal(5.0, 2.0, size=(4, 3, 3, 2)).astype("float32")
    layer = SplitBatchNormalization(num_splits=2)
    layer.build(x.shape)
    layer.trainable = False

    output = np.asarray(layer(x, training=True))

    expected, _, _ = numpy_split_batch_norm(x, 2, np.ones(2), np.zeros(2), 1e-3)
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


def test_indivisible_batch_is_rejected():
    layer = SplitBatchNormalization(num_splits=4)
    with pytest.raises(ValueError, match="not divisible by num_splits=4"):
        layer(np.zeros((6, 2, 2, 3), "float32"), training=True)


def test_config_round_trip():
    layer = SplitBatchNormalization(num_splits=3, momentum=0.8)
    clone = SplitBatchNormalization.from_config(layer.get_config())
    assert clone.num_splits == 3
    assert clone.momentum == 0.8


def test_synchronized_needs_one_split():
    with pytest.raises(ValueError, match="num_splits must be 1; got num_splits=2"):
        SplitBatchNormalization(num_splits=2, synchronized=True)


def test_synchronized_on_one_device_is_batch_statistics():
    """With one replica the all-reduced statistics are the batch's own."""
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(6, 3, 3, 2)).astype("float32")
    layer = SplitBatchNormalization(num_splits=1, synchronized=True)
    layer.build(x.shape)
    layer.trainable = False

    output = np.asarray(layer(x, training=True))

    expected, _, _ = numpy_split_batch_norm(x, 1, np.ones(2), np.zeros(2), 1e-3)
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)
