"""Tests of the linear evaluation CLI, run as a subprocess on a small exported backbone."""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import export, linear_eval
from mixco_tf.data import load_dataset

IMAGE_SIZE = 16


def run_cli(*flags, cwd):
    return subprocess.run(
        [sys.executable, "-m", "mixco_tf.linear_eval", *flags],
        cwd=cwd,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory):
    splits = load_dataset("digits")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    export_dir = tmp_path_factory.mktemp("linear_eval") / "backbone"
    return export.export_backbone(
        backbone, str(export_dir), image_size=IMAGE_SIZE, mean=splits.mean, std=splits.std
    )


def test_cli_writes_results(saved_model_dir, tmp_path):
    output = tmp_path / "results" / "eval.json"
    completed = run_cli(
        f"--saved_model={saved_model_dir}",
        "--dataset=digits",
        "--protocols=linear,knn",
        f"--output={output}",
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    with open(output, encoding="utf-8") as stream:
        results = json.load(stream)
    assert results["saved_model"] == os.path.abspath(saved_model_dir)
    assert results["dataset"] == "digits"
    assert (results["num_train"], results["num_test"]) == (1437, 360)
    assert 0.0 <= results["linear_top1"] <= results["linear_top5"] <= 1.0
    assert 0.0 <= results["knn_top1"] <= 1.0
    assert "linear_5shot_top1" not in results
    # The final stdout line is the same JSON.
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == results


def test_cli_missing_saved_model_fails_fast(tmp_path):
    missing = tmp_path / "no_such_export" / "1"
    started = time.time()
    completed = run_cli(f"--saved_model={missing}", cwd=tmp_path)
    assert completed.returncode != 0
    assert str(missing) in completed.stderr
    assert time.time() - started < 60


def test_cli_base_folder_instead_of_version(saved_model_dir, tmp_path):
    base = os.path.dirname(saved_model_dir)
    completed = run_cli(f"--saved_model={base}", cwd=tmp_path)
    assert completed.returncode != 0
    assert "no saved_model.pb" in completed.stderr
    assert os.path.join(base, "1") in completed.stderr


def test_cli_unknown_protocol_fails(saved_model_dir, tmp_path):
    completed = run_cli(f"--saved_model={saved_model_dir}", "--protocols=linear,10shot", cwd=tmp_path)
    assert completed.returncode != 0
    assert "10shot" in completed.stderr


def test_default_output_path():
    path = linear_eval.default_output_path(os.path.join("exports", "backbone", "3"), "digits")
    assert path == os.path.abspath(os.path.join("exports", "backbone", "linear_eval_digits_v3.json"))


def test_saved_model_check_hints(tmp_path):
    from mixco_tf import linear_eval

    checkpoint = tmp_path / "mixco.weights.h5"
    checkpoint.write_bytes(b"")
    assert "is a file" in linear_eval.check_saved_model_dir(str(checkpoint))

    run_export = tmp_path / "run" / "export" / "backbone" / "1"
    run_export.mkdir(parents=True)
    (run_export / "saved_model.pb").write_bytes(b"")
    message = linear_eval.check_saved_model_dir(str(tmp_path / "run"))
    assert f"--saved_model={run_export}" in message


@pytest.fixture(scope="module")
def digits_splits():
    return load_dataset("digits")


def test_cli_protocol_flag_and_alias(saved_model_dir, tmp_path):
    output = tmp_path / "eval.json"
    completed = run_cli(
        f"--saved_model={saved_model_dir}", "--protocol=knn", "--knn_k=50", f"--output={output}", cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["protocols"] == ["knn"]
    assert (results["knn_k"], results["knn_temperature"]) == (50, 0.1)
    assert "linear_top1" not in results


def test_cached_protocol_matches_sklearn(saved_model_dir, digits_splits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mixco_tf import evaluation

    results = linear_eval.evaluate(digits_splits, saved_model=saved_model_dir, protocols=["cached"])

    layer = evaluation.load_serving_layer(saved_model_dir)
    train_features, train_labels = evaluation.extract_features(layer, digits_splits.train.batch(256))
    test_features, test_labels = evaluation.extract_features(layer, digits_splits.test.batch(256))
    scaler = StandardScaler().fit(train_features)
    reference = LogisticRegression(max_iter=5000).fit(scaler.transform(train_features), train_labels)
    sklearn_top1 = reference.score(scaler.transform(test_features), test_labels)
    assert abs(results["linear_top1"] - sklearn_top1) <= 0.02, (results["linear_top1"], sklearn_top1)


def test_paper_protocol_trains_only_head(saved_model_dir, digits_splits):
    from mixco_tf import paper_linear

    layer = keras.layers.TFSMLayer(saved_model_dir, call_endpoint="serving_normalized", trainable=False)
    classifier = paper_linear.build_classifier(layer, IMAGE_SIZE, digits_splits.num_classes)
    assert [weight.path for weight in classifier.trainable_weights] == ["linear_head/kernel", "linear_head/bias"]
    assert len(layer.weights) >= 4  # conv kernel and bias, BatchNorm scale, offset, mean, variance
    before = [weight.numpy().copy() for weight in layer.weights]

    results = linear_eval.evaluate(
        digits_splits, saved_model=saved_model_dir, protocols=["paper"], paper_epochs=2
    )
    assert results["paper"]["backbone_unchanged"] is True
    assert results["paper"]["trainable_weights"] == ["linear_head/kernel", "linear_head/bias"]
    assert 0.1 < results["paper_top1"] <= results["paper_top5"] <= 1.0

    # An independent check on a fresh layer: one epoch of the paper recipe leaves every
    # backbone variable, BatchNorm statistics included, bit-identical.
    classifier.compile(keras.optimizers.SGD(3.0, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = paper_linear.train_dataset(
        digits_splits.train, image_size=IMAGE_SIZE, mean=digits_splits.mean, std=digits_splits.std
    )
    head_before = classifier.get_layer("linear_head").kernel.numpy().copy()
    classifier.fit(train.take(2), epochs=1, verbose=0)
    for old, weight in zip(before, layer.weights):
        np.testing.assert_array_equal(old, weight.numpy())
    assert not np.array_equal(head_before, classifier.get_layer("linear_head").kernel.numpy())


def test_paper_test_pipeline_center_crops(digits_splits):
    from mixco_tf import paper_linear
    from mixco_tf.preprocess import normalize

    images, labels = digits_splits.test_arrays()
    batch, batch_labels = next(iter(paper_linear.test_dataset(
        digits_splits.test, image_size=16, mean=digits_splits.mean, std=digits_splits.std, batch_size=4
    )))
    # 16 / 0.875 rounds to 18; the center 16x16 of the 18x18 resize starts at pixel 1.
    resized = tf.image.resize(images[:4].astype(np.float32) / 255.0, (18, 18), antialias=True)[:, 1:17, 1:17]
    np.testing.assert_allclose(batch.numpy(), normalize(resized, digits_splits.mean, digits_splits.std).numpy(), atol=1e-6)
    np.testing.assert_array_equal(batch_labels.numpy(), labels[:4])


def test_tuner_never_sees_test_split(saved_model_dir, digits_splits):
    import dataclasses

    import tensorflow as tf

    images, labels = digits_splits.test_arrays()
    rng = np.random.default_rng(0)
    scrambled_test = tf.data.Dataset.from_tensor_slices(
        (rng.integers(0, 256, size=images.shape, dtype=np.uint8), rng.permutation(labels))
    )
    scrambled = dataclasses.replace(digits_splits, test=scrambled_test, test_numpy=None)
    settings = dict(saved_model=saved_model_dir, protocols=["cached"], tune=True, tune_trials=2, tune_epochs=5)

    original = linear_eval.evaluate(digits_splits, **settings)
    changed = linear_eval.evaluate(scrambled, **settings)

    # Replacing every test image and label changes the final test numbers but not one
    # number of the search, so the search read no test data.
    assert original["tuning"] == changed["tuning"]
    assert original["linear_top1"] != changed["linear_top1"]
    tuning = original["tuning"]
    assert tuning["num_fit"] + tuning["num_validation"] == digits_splits.num_train
    assert len(tuning["trials"]) == 2
    assert tuning["validation_top1"] == max(trial["validation_top1"] for trial in tuning["trials"])


def test_probe_tuner_resumes_and_rejects_new_space(saved_model_dir, digits_splits, tmp_path):
    from mixco_tf import evaluation, tuning

    layer = evaluation.load_serving_layer(saved_model_dir)
    features, labels = evaluation.extract_features(layer, digits_splits.train.batch(256))
    directory = str(tmp_path / "tuner")
    first = tuning.tune_linear_probe(features, labels, 10, max_trials=2, epochs=3, directory=directory)
    again = tuning.tune_linear_probe(features, labels, 10, max_trials=2, epochs=3, directory=directory)
    assert again["trials"] == first["trials"]
    more = tuning.tune_linear_probe(features, labels, 10, max_trials=3, epochs=3, directory=directory)
    assert more["trials"][:2] == first["trials"]
    assert len(more["trials"]) == 3
    with pytest.raises(tuning.SearchSpaceMismatch, match="epochs: 3 -> 4"):
        tuning.tune_linear_probe(features, labels, 10, max_trials=2, epochs=4, directory=directory)


def test_validation_split_is_stratified_partition():
    from mixco_tf import tuning

    labels = np.repeat(np.arange(5), 20)
    fit, validation = tuning.split_train_validation(labels, 0.25, seed=3)
    assert sorted(np.concatenate([fit, validation]).tolist()) == list(range(100))
    assert np.bincount(labels[validation]).tolist() == [5] * 5
    with pytest.raises(ValueError, match="validation_fraction"):
        tuning.split_train_validation(labels, 1.0)


TRANSFER_DATASET = "digits_inverted_small"


def register_transfer_dataset():
    """Registers a digits variant that differs from digits in every respect a transfer touches.

    Classes 0-4 only, 12x12 native images, inverted gray levels, so a different
    number of classes, image size, mean and std than the pretraining data set.
    """
    from mixco_tf.data import DatasetSplits, available_datasets, register_dataset
    from mixco_tf.data.digits import load_digits_arrays

    if TRANSFER_DATASET in available_datasets():
        return

    def variant(images, labels):
        keep = labels < 5
        small = tf.image.resize(images[keep].astype(np.float32), (12, 12), antialias=True).numpy()
        return (255 - np.clip(np.round(small), 0, 255)).astype(np.uint8), labels[keep]

    @register_dataset(TRANSFER_DATASET)
    def load(data_dir=None, skip_bad_files=False):
        train_images, train_labels, test_images, test_labels = load_digits_arrays()
        train = variant(train_images, train_labels)
        test = variant(test_images, test_labels)
        pixels = train[0].astype(np.float64) / 255.0
        return DatasetSplits(
            name=TRANSFER_DATASET,
            train=tf.data.Dataset.from_tensor_slices(train),
            test=tf.data.Dataset.from_tensor_slices(test),
            num_train=len(train[1]),
            num_test=len(test[1]),
            num_classes=5,
            image_size=12,
            mean=tuple(pixels.mean(axis=(0, 1, 2))),
            std=tuple(pixels.std(axis=(0, 1, 2))),
            class_names=tuple("01234"),
        )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mixco_tf import config as config_lib
    from mixco_tf import experiment

    model_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    config = config_lib.Config(
        model_dir=str(model_dir), epochs=1, batch_size=64, queue_size=128, key_bn_splits=4,
        width_multiplier=0.0625, image_size=12, warmup_epochs=0,
    ).validate()
    experiment.run_experiment(config, evaluate=False)
    return str(model_dir)


@pytest.mark.slow
def test_cli_evaluates_run_directory(tiny_run, tmp_path):
    completed = run_cli(f"--model_dir={tiny_run}", "--protocol=cached,knn", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(open(os.path.join(tiny_run, "linear_eval_digits.json")).read())
    assert results["model_dir"] == os.path.abspath(tiny_run)
    assert results["image_size"] == 12
    assert 0.1 < results["linear_top1"] <= results["linear_top5"] <= 1.0


@pytest.mark.slow
def test_transfer_to_other_dataset(tiny_run):
    register_transfer_dataset()
    target = load_dataset(TRANSFER_DATASET)
    export_dir = os.path.join(tiny_run, "export", "backbone", "1")

    from_run = linear_eval.evaluate(target, model_dir=tiny_run, protocols=["cached", "knn", "paper"], paper_epochs=1)
    from_export = linear_eval.evaluate(target, saved_model=export_dir, protocols=["cached", "knn"])

    # The backbone keeps its own input size and normalization on the new data set.
    assert from_run["image_size"] == from_export["image_size"] == 12
    assert from_run["paper"]["backbone_unchanged"] is True
    for results in (from_run, from_export):
        assert 0.2 < results["linear_top1"] <= 1.0
        assert results["linear_top5"] == 1.0  # 5 classes: top-5 always contains the label
    # Both sources compute the same features (resize_and_normalize inside or outside the graph).
    assert abs(from_run["knn_top1"] - from_export["knn_top1"]) <= 2 / target.num_test
