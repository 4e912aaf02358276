"""Tests of mixco_tf.evaluation: k-NN, linear and few-shot probes, feature extraction."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from mixco_tf import evaluation
from mixco_tf.data import load_dataset


def small_backbone(image_size, dim=16, seed=0):
    """Conv2D + BatchNormalization + ReLU + global pooling: `[b, S, S, 3]` -> `[b, dim]`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(dim, 3, strides=2, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, outputs)


def reference_knn_top1(train_features, train_labels, test_features, test_labels, num_classes, k, temperature):
    """Plain NumPy k-NN: full similarity matrix, full sort, explicit loop over test rows."""
    train = train_features / np.linalg.norm(train_features, axis=1, keepdims=True)
    test = test_features / np.linalg.norm(test_features, axis=1, keepdims=True)
    similarities = test.astype(np.float64) @ train.astype(np.float64).T
    correct = 0
    for row, label in zip(similarities, test_labels):
        neighbours = np.argsort(-row)[:k]
        votes = np.zeros(num_classes)
        for index in neighbours:
            weight = 1.0 if temperature is None else np.exp(row[index] / temperature)
            votes[train_labels[index]] += weight
        correct += int(np.argmax(votes) == label)
    return correct / len(test_labels)


@pytest.fixture(scope="module")
def random_features():
    rng = np.random.default_rng(0)
    num_classes = 6
    centers = rng.normal(size=(num_classes, 24))
    train_labels = rng.integers(0, num_classes, size=400)
    test_labels = rng.integers(0, num_classes, size=157)
    train = (centers[train_labels] + 1.5 * rng.normal(size=(400, 24))).astype(np.float32)
    test = (centers[test_labels] + 1.5 * rng.normal(size=(157, 24))).astype(np.float32)
    return train, train_labels, test, test_labels, num_classes


@pytest.fixture(scope="module")
def digits_pixels():
    digits = load_digits()
    return train_test_split(
        digits.data.astype(np.float32),
        digits.target.astype(np.int64),
        test_size=360,
        random_state=0,
        stratify=digits.target,
    )


@pytest.mark.parametrize("temperature", [0.1, 0.5, None])
@pytest.mark.parametrize("k", [1, 20, 200])
def test_knn_matches_numpy(random_features, k, temperature):
    expected = reference_knn_top1(*random_features, k=k, temperature=temperature)
    actual = evaluation.knn_top1(*random_features, k=k, temperature=temperature)
    assert actual == pytest.approx(expected, abs=1e-9)


def test_knn_chunks_match_single_pass(random_features, monkeypatch):
    single_pass = evaluation.knn_top1(*random_features, k=20, temperature=0.1)
    # 400 training features per row: a budget of 400 * 7 entries gives chunks of 7 rows,
    # so the 157 test rows end in a partial chunk.
    monkeypatch.setattr(evaluation, "_KNN_CHUNK_ENTRIES", 400 * 7)
    assert evaluation.knn_top1(*random_features, k=20, temperature=0.1) == single_pass


def test_knn_small_temperature_stays_finite(random_features):
    # At temperature 1e-4, exp(s / T) overflows float64 unless each row is shifted by its
    # largest similarity. Then only the nearest neighbour carries weight.
    nearest = reference_knn_top1(*random_features, k=1, temperature=None)
    assert evaluation.knn_top1(*random_features, k=20, temperature=1e-4) == pytest.approx(nearest)


def test_knn_k_larger_than_train_raises(random_features):
    with pytest.raises(ValueError, match=r"k must be in \[1, 400\]"):
        evaluation.knn_top1(*random_features, k=401)


def test_knn_invalid_temperature_raises(random_features):
    with pytest.raises(ValueError, match="temperature"):
        evaluation.knn_top1(*random_features, temperature=0.0)


def test_labels_out_of_range_raise(random_features):
    train, train_labels, test, test_labels, _ = random_features
    with pytest.raises(ValueError, match="num_classes"):
        evaluation.knn_top1(train, train_labels, test, test_labels, num_classes=3)


def test_linear_probe_separable_data():
    rng = np.random.default_rng(1)
    centers = 10.0 * np.eye(3, 8)
    train_labels = np.repeat(np.arange(3), 100)
    test_labels = np.repeat(np.arange(3), 30)
    train = (centers[train_labels] + rng.normal(size=(300, 8))).astype(np.float32)
    test = (centers[test_labels] + rng.normal(size=(90, 8))).astype(np.float32)

    result = evaluation.linear_probe(train, train_labels, test, test_labels, 3)

    assert result["top1"] >= 0.99
    # With 3 classes the top 5 predictions cover every class.
    assert result["top5"] == 1.0


def test_linear_probe_matches_sklearn_on_digits(digits_pixels):
    train, test, train_labels, test_labels = digits_pixels
    scaler = StandardScaler().fit(train)
    sklearn_top1 = (
        LogisticRegression(max_iter=2000)
        .fit(scaler.transform(train), train_labels)
        .score(scaler.transform(test), test_labels)
    )

    result = evaluation.linear_probe(train, train_labels, test, test_labels, 10)

    assert abs(result["top1"] - sklearn_top1) <= 0.03, (result, sklearn_top1)
    assert result["top1"] <= result["top5"] <= 1.0


def test_linear_probe_is_deterministic(random_features):
    first = evaluation.linear_probe(*random_features, epochs=5, seed=3)
    second = evaluation.linear_probe(*random_features, epochs=5, seed=3)
    assert first == second


def test_linear_probe_dimension_mismatch_raises(random_features):
    train, train_labels, test, test_labels, num_classes = random_features
    with pytest.raises(ValueError, match="dimension"):
        evaluation.linear_probe(train, train_labels, test[:, :5], test_labels, num_classes)


def test_sample_few_shot_indices_counts():
    labels = np.repeat(np.arange(4), [7, 5, 9, 6])
    indices = evaluation.sample_few_shot_indices(labels, 4, 5, np.random.default_rng(0))
    assert indices.shape == (20,)
    assert len(set(indices.tolist())) == 20
    np.testing.assert_array_equal(np.bincount(labels[indices], minlength=4), [5, 5, 5, 5])


def test_sample_few_shot_indices_determinism():
    labels = np.repeat(np.arange(3), 40)
    first = evaluation.sample_few_shot_indices(labels, 3, 5, np.random.default_rng(7))
    again = evaluation.sample_few_shot_indices(labels, 3, 5, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)

    rng = np.random.default_rng(7)
    draw_0 = evaluation.sample_few_shot_indices(labels, 3, 5, rng)
    draw_1 = evaluation.sample_few_shot_indices(labels, 3, 5, rng)
    np.testing.assert_array_equal(draw_0, first)
    assert not np.array_equal(np.sort(draw_0), np.sort(draw_1))


def test_sample_few_shot_too_few_examples_raises():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 6)
    with pytest.raises(ValueError, match="Class 1 has 3 training examples"):
        evaluation.sample_few_shot_indices(labels, 3, 5, np.random.default_rng(0))


def test_few_shot_linear_trains_on_shots_per_class(random_features, monkeypatch):
    calls = []

    def fake_probe(train_features, train_labels, test_features, test_labels, num_classes, *, seed, **kwargs):
        calls.append((train_features.copy(), train_labels.copy(), seed))
        return {"top1": 0.1 * len(calls), "top5": 1.0}

    monkeypatch.setattr(evaluation, "linear_probe", fake_probe)
    result = evaluation.few_shot_linear(*random_features, shots=4, draws=3, seed=11)

    assert len(calls) == 3
    for features, labels, _ in calls:
        assert features.shape == (4 * 6, 24)
        np.testing.assert_array_equal(np.bincount(labels, minlength=6), [4] * 6)
    assert [seed for _, _, seed in calls] == [11, 12, 13]
    assert not np.array_equal(calls[0][0], calls[1][0])
    assert result == pytest.approx(0.2)


def test_few_shot_linear_real_probe(random_features):
    first = evaluation.few_shot_linear(*random_features, shots=5, draws=2, seed=0, epochs=20)
    second = evaluation.few_shot_linear(*random_features, shots=5, draws=2, seed=0, epochs=20)
    assert 0.0 <= first <= 1.0
    assert first == second


def test_extract_features_keras_model():
    backbone = small_backbone(8, dim=5)
    images = np.random.default_rng(0).normal(size=(11, 8, 8, 3)).astype(np.float32)
    labels = np.arange(11) % 3
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)

    features, extracted_labels = evaluation.extract_features(backbone, dataset)

    assert features.dtype == np.float32
    assert features.shape == (11, 5)
    np.testing.assert_allclose(features, backbone(images, training=False).numpy(), atol=1e-5)
    np.testing.assert_array_equal(extracted_labels, labels)


def test_extract_features_dict_output():
    dataset = tf.data.Dataset.from_tensor_slices((np.ones((6, 2), np.float32), np.arange(6))).batch(4)
    features, _ = evaluation.extract_features(lambda x: {"features": 2 * x}, dataset)
    np.testing.assert_array_equal(features, np.full((6, 2), 2.0, np.float32))

    with pytest.raises(ValueError, match="'features' entry"):
        evaluation.extract_features(lambda x: {"logits": x}, dataset)


def test_evaluate_backbone_on_digits():
    splits = load_dataset("digits")
    backbone = small_backbone(16, dim=32)

    results = evaluation.evaluate_backbone(backbone, splits, image_size=16, batch_size=512)

    assert set(results) == {"linear_top1", "linear_top5", "linear_5shot_top1", "knn_top1"}
    for key, value in results.items():
        assert 0.0 <= value <= 1.0, key
    # Random convolutional features of digits are far better than chance (0.1).
    assert results["linear_top1"] > 0.3
    assert results["knn_top1"] > 0.3


def test_evaluate_features_unknown_protocol_raises(random_features):
    with pytest.raises(ValueError, match="Unknown evaluation protocols"):
        evaluation.evaluate_features(*random_features, protocols=("linear", "10shot"))
