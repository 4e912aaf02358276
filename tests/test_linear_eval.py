"""Tests of the linear evaluation CLI, run as a subprocess on a small exported backbone."""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest

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
