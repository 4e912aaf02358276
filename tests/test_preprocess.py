"""Normalization and its inverse for display."""

import numpy as np
import tensorflow as tf

from mixco_tf.preprocess import denormalize, normalize

MEAN = (0.2, 0.4, 0.6)
STD = (0.5, 0.25, 0.1)


def test_denormalize_inverts_normalize():
    images = np.random.default_rng(0).uniform(size=(2, 5, 5, 3)).astype("float32")

    restored = denormalize(normalize(tf.constant(images), MEAN, STD), MEAN, STD).numpy()

    np.testing.assert_allclose(restored, images, atol=1e-6)


def test_denormalize_matches_numpy_and_clips():
    normalized = np.random.default_rng(1).normal(scale=3.0, size=(4, 3, 3, 3)).astype("float32")
    expected = np.clip(normalized * np.array(STD) + np.array(MEAN), 0.0, 1.0)

    result = denormalize(normalized, MEAN, STD).numpy()

    np.testing.assert_allclose(result, expected, atol=1e-6)
    assert result.min() == 0.0
    assert result.max() == 1.0
