"""Tests of mixco_tf.callbacks.KNNMonitor and its wiring into pretraining."""

import csv
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import augment, callbacks, config as config_lib, experiment
from mixco_tf.data import load_dataset

IMAGE_SIZE = 16


def numpy_knn_top1(train, train_labels, test, test_labels, num_classes, k, temperature):
    """Independent weighted k-NN: full float64 similarity matrix and a sort per row."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    similarities = test.astype(np.float64) @ train.astype(np.float64).T
    correct = 0
    for row, label in zip(similarities, test_labels):
        neighbours = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, train_labels[neighbours], np.exp(row[neighbours] / temperature))
        correct += int(votes.argmax() == label)
    return correct / len(test_labels)


def features_of(backbone, images, splits):
    dataset = augment.eval_dataset(
        tf.data.Dataset.from_tensor_slices(images),
        image_size=IMAGE_SIZE, mean=splits.mean, std=splits.std, batch_size=256,
    )
    return np.concatenate([backbone(batch, training=False).numpy() for batch in dataset])


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits")


def test_knn_monitor_logs_every_n_epochs(splits, tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    classifier = keras.Sequential([backbone, keras.layers.Dense(splits.num_classes)])
    classifier.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = augment.eval_dataset(splits.train, image_size=IMAGE_SIZE, mean=splits.mean, std=splits.std, batch_size=128)

    monitor = callbacks.KNNMonitor(backbone, splits, image_size=IMAGE_SIZE, every=2)
    csv_path = tmp_path / "history.csv"
    history = classifier.fit(
        train.take(2), epochs=3, verbose=0, callbacks=[monitor, keras.callbacks.CSVLogger(str(csv_path))]
    )

    measured = history.history["knn_top1"]
    assert math.isnan(measured[0])
    assert 0.0 < measured[1] <= 1.0
    with open(csv_path) as stream:
        rows = list(csv.DictReader(stream))
    assert [row["knn_top1"] for row in rows][0] == "nan"
    assert float(rows[1]["knn_top1"]) == pytest.approx(measured[1])

    # The last epoch is always measured, with the final weights.
    train_images, train_labels = splits.train_arrays()
    test_images, test_labels = splits.test_arrays()
    expected = numpy_knn_top1(
        features_of(backbone, train_images, splits), train_labels,
        features_of(backbone, test_images, splits), test_labels,
        splits.num_classes, k=200, temperature=0.1,
    )
    assert measured[2] == pytest.approx(expected, abs=1.5 / len(test_labels))


def test_knn_monitor_rejects_bad_every(splits):
    backbone = keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.GlobalAveragePooling2D()])
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be a positive integer"):
            callbacks.KNNMonitor(backbone, splits, image_size=IMAGE_SIZE, every=every)


@pytest.mark.parametrize("value", [-1, -5])
def test_config_rejects_negative_knn_every(value):
    with pytest.raises(ValueError, match="knn_every"):
        config_lib.Config(knn_every=value).validate()


@pytest.mark.slow
def test_pretraining_history_records_knn(tmp_path):
    config = config_lib.Config(
        model_dir=str(tmp_path / "run"), epochs=2, batch_size=32, queue_size=64, key_bn_splits=4,
        width_multiplier=0.0625, warmup_epochs=0, knn_every=1,
    ).validate()
    results = experiment.run_experiment(config, evaluate=False)
    with open(tmp_path / "run" / "history.csv") as stream:
        rows = list(csv.DictReader(stream))
    values = [float(row["knn_top1"]) for row in rows]
    assert len(values) == 2
    assert all(0.1 < value <= 1.0 for value in values)
    assert results["final_metrics"]["knn_top1"] == pytest.approx(values[-1])
