"""`python -m mixco_tf.train` end to end, as a real subprocess."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

TINY_FLAGS = [
    "--epochs=1",
    "--batch_size=32",
    "--queue_size=64",
    "--key_bn_splits=4",
    "--width_multiplier=0.0625",
    "--image_size=16",
    "--warmup_epochs=0",
]


def _run_train(args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "mixco_tf.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_tiny_run_writes_results_and_export(tmp_path):
    model_dir = tmp_path / "run"

    result = _run_train([f"--model_dir={model_dir}", *TINY_FLAGS])

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["num_train_examples"] == 1437
    assert results["epochs_completed"] == 1
    assert results["config"]["batch_size"] == 32
    assert os.path.isfile(os.path.join(results["export_dir"], "saved_model.pb"))
    for block in ("evaluation", "random_init_evaluation"):
        for key in ("linear_top1", "linear_5shot_top1", "knn_top1"):
            assert 0.0 <= results[block][key] <= 1.0, (block, key)
    assert (model_dir / "config.yaml").is_file()
    assert (model_dir / "history.csv").is_file()
    assert any((model_dir / "checkpoints").iterdir())
    assert "linear_5shot_top1" in result.stdout

    # The export CLI rebuilds the same backbone from the run directory.
    exported = subprocess.run(
        [sys.executable, "-m", "mixco_tf.export", f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'again'}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "again" / "1" / "saved_model.pb").is_file()
    _assert_same_features(results["export_dir"], str(tmp_path / "again" / "1"))


def _assert_same_features(first_dir, second_dir):
    import numpy as np
    import tensorflow as tf

    images = tf.constant(np.random.default_rng(0).integers(0, 256, size=(3, 20, 20, 3)), tf.uint8)
    first = tf.saved_model.load(first_dir).signatures["serving_default"](images=images)["features"]
    second = tf.saved_model.load(second_dir).signatures["serving_default"](images=images)["features"]
    np.testing.assert_allclose(first.numpy(), second.numpy(), rtol=1e-5, atol=1e-5)


def test_flags_override_yaml(tmp_path):
    """A bad flag value beats a good YAML value, and the error names the flag's key."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"batch_size": 64, "epochs": 1}))

    result = _run_train([f"--config={config_path}", "--batch_size=9"], timeout=120)

    assert result.returncode == 2
    assert "batch_size=9" in result.stderr


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"tempreature": 0.1}))
    started = time.time()

    result = _run_train([f"--config={config_path}"], timeout=120)

    assert result.returncode == 2
    assert "tempreature" in result.stderr
    assert time.time() - started < 60


def test_missing_config_file_is_reported(tmp_path):
    result = _run_train([f"--config={tmp_path / 'nope.yaml'}"], timeout=120)
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_export_cli_rejects_missing_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mixco_tf.export", f"--model_dir={tmp_path / 'none'}", f"--export_dir={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 2
    assert "config.yaml not found" in result.stderr
    assert not (tmp_path / "out").exists()
