"""`python -m mixco_tf.train` end to end, as a real subprocess."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
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


# 1,437 digits training images / 32 = 44 steps per epoch; a queue of 3 batches makes the
# pointer after one epoch (44 * 32 mod 96 = 64) differ from its start.
RESUME_FLAGS = [*TINY_FLAGS[1:], "--queue_size=96", "--evaluate=false"]
STEPS_PER_EPOCH = 44


def _start_train(args, log_path):
    """Starts a training subprocess that logs to `log_path`; returns the Popen."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "w") as log:
        # The child keeps its own copy of the file descriptor.
        return subprocess.Popen(
            [sys.executable, "-m", "mixco_tf.train", *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def _wait_for_backup(process, model_dir, timeout=300):
    """Polls until the backup of a completed epoch exists; returns its training state."""
    state_path = model_dir / "backup" / "training_state.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training exited before completing an epoch"
        if state_path.is_file():
            return json.loads(state_path.read_text())
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no backup in {model_dir} within {timeout} s")


def _history_epochs(model_dir):
    with open(model_dir / "history.csv") as stream:
        return [int(row["epoch"]) for row in csv.DictReader(stream)]


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
    assert results["resumed_from_epoch"] is None
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


@pytest.mark.slow
def test_sigkill_then_rerun_resumes(tmp_path):
    model_dir = tmp_path / "run"
    args = [f"--model_dir={model_dir}", "--epochs=4", *RESUME_FLAGS]
    process = _start_train(args, tmp_path / "first.log")
    _wait_for_backup(process, model_dir)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)

    # The state on disk after the kill is what the rerun must continue from.
    saved = json.loads((model_dir / "backup" / "training_state.json").read_text())
    with h5py.File(model_dir / "backup" / saved["weights_file"], "r") as weights:
        saved_queue = weights["vars/0"][()]
        saved_pointer = int(weights["vars/1"][()])
        saved_iterations = int(weights["optimizer/vars/0"][()])
    assert 1 <= saved["epoch"] < 4, saved
    assert saved_iterations == saved["epoch"] * STEPS_PER_EPOCH
    assert saved_pointer == saved["queue_pointer"] == (saved_iterations * 32) % 96
    assert not (model_dir / "results.json").exists()

    _assert_restore_matches(model_dir, saved, saved_queue)
    result = _run_train(args)

    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"Restored {model_dir / 'backup' / saved['weights_file']} (end of epoch {saved['epoch']}): "
        f"optimizer iterations {saved_iterations}, queue pointer {saved_pointer}." in result.stderr
    )
    assert f"epochs {saved['epoch'] + 1} to 4" in result.stderr
    assert f"Epoch {saved['epoch']}/4" not in result.stdout + result.stderr
    results = json.loads((model_dir / "results.json").read_text())
    assert results["resumed_from_epoch"] == saved["epoch"]
    assert results["epochs_completed"] == 4
    assert _history_epochs(model_dir) == [0, 1, 2, 3]
    final = json.loads((model_dir / "backup" / "training_state.json").read_text())
    assert final["epoch"] == 4
    # Iterations continued from the restored count; from 0 they would end lower.
    assert final["optimizer_iterations"] == 4 * STEPS_PER_EPOCH
    with h5py.File(model_dir / "checkpoints" / "mixco.weights.h5", "r") as weights:
        assert int(weights["optimizer/vars/0"][()]) == 4 * STEPS_PER_EPOCH

    # A finished run is not trained again.
    again = _run_train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished 4 epochs" in again.stderr
    assert "Epoch 1/4" not in again.stdout + again.stderr
    assert json.loads((model_dir / "results.json").read_text()) == results


def _assert_restore_matches(model_dir, saved, saved_queue):
    """Restores the backup into a model built from the run's config, as the rerun does."""
    import keras

    from mixco_tf import checkpointing, experiment
    from mixco_tf import config as config_lib

    config = config_lib.from_dict(config_lib.load_yaml(str(model_dir / "config.yaml")))
    model = experiment.build_model(config)
    model.compile(optimizer=experiment.build_optimizer(config, STEPS_PER_EPOCH))
    model.optimizer.build(model.trainable_variables)
    checkpointing.restore_training_state(model, str(model_dir), checkpointing.read_training_state(str(model_dir)))

    np.testing.assert_array_equal(model.queue.numpy(), saved_queue)
    assert int(model.queue_pointer.numpy()) == saved["queue_pointer"]
    assert int(model.optimizer.iterations.numpy()) == saved["optimizer_iterations"]
    np.testing.assert_array_equal(model.seed_generator.state.numpy(), saved["seed_generator_state"])
    keras.backend.clear_session()


@pytest.mark.slow
def test_sigint_saves_and_exits(tmp_path):
    model_dir = tmp_path / "run"
    process = _start_train([f"--model_dir={model_dir}", "--epochs=4", *RESUME_FLAGS], tmp_path / "train.log")
    _wait_for_backup(process, model_dir)

    process.send_signal(signal.SIGINT)
    returncode = process.wait(timeout=120)

    log = (tmp_path / "train.log").read_text()
    assert returncode == 130, log[-3000:]
    assert "Stopped by SIGINT" in log
    assert f"Rerun the same command with --model_dir={model_dir} to resume" in log
    state = json.loads((model_dir / "backup" / "training_state.json").read_text())
    assert 1 <= state["epoch"] < 4
    assert _history_epochs(model_dir) == list(range(state["epoch"]))
    assert not (model_dir / "results.json").exists()


def test_non_finite_loss_exits_with_step(tmp_path):
    """A temperature below float32's normal range makes the logits infinite at step 1."""
    model_dir = tmp_path / "run"

    result = _run_train([f"--model_dir={model_dir}", *RESUME_FLAGS, "--temperature=1e-40"], timeout=300)

    assert result.returncode == 3, result.stderr[-3000:]
    assert "Non-finite loss at optimizer step 1 (epoch 1, batch 1)" in result.stderr
    assert re.search(r"moco_loss=(nan|inf)", result.stderr)
    assert "temperature=1e-40" in result.stderr
    assert "No epoch completed" in result.stderr
    assert not (model_dir / "backup").exists()
    assert not (model_dir / "checkpoints" / "mixco.weights.h5").exists()


def test_model_dir_of_other_config_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text(yaml.safe_dump({"backbone": "resnet50", "projection_dim": 64}))
    (model_dir / "results.json").write_text(json.dumps({"epochs_completed": 1}))

    result = _run_train([f"--model_dir={model_dir}", *TINY_FLAGS], timeout=120)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "backbone: 'resnet50' -> 'resnet18'" in result.stderr
    assert "projection_dim: 64 -> 128" in result.stderr
    assert "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("method", ["simclr", "simclr_mixco"])
def test_simclr_methods_train_from_cli(tmp_path, method):
    """SimCLR has no key encoder; the epoch-end callbacks must not expect one."""
    model_dir = tmp_path / "run"

    result = _run_train([f"--model_dir={model_dir}", *TINY_FLAGS, f"--method={method}", "--evaluate=false"])

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["epochs_completed"] == results["config"]["epochs"]
    assert results["config"]["method"] == method


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--dataset=mnist"], "dataset='mnist'"),
        (["--batch_size=2000", "--queue_size=2000"], "batch_size=2000"),
        (["--stem=imagenet"], "image_size=16"),
        (["--temperature=0"], "temperature=0.0"),
        (["--moco_momentum=1.5"], "moco_momentum=1.5"),
        (["--key_bn_splits=3"], "key_bn_splits=3"),
        (["--method=simclr", "--strategy=mirrored", "--cpu_devices=2"], "method='simclr' with 2 replicas"),
    ],
)
def test_bad_flag_names_key(tmp_path, flags, named):
    model_dir = tmp_path / "run"

    result = _run_train([f"--model_dir={model_dir}", *TINY_FLAGS, *flags], timeout=120)

    assert result.returncode == 2, result.stderr[-3000:]
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert not (model_dir / "backup").exists()


def test_corrupt_backup_is_named(tmp_path):
    model_dir = tmp_path / "run"
    (model_dir / "backup").mkdir(parents=True)
    (model_dir / "backup" / "training_state.json").write_text('{"epoch": 2, "weig')

    result = _run_train([f"--model_dir={model_dir}", *TINY_FLAGS], timeout=120)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "training_state.json is not valid JSON" in result.stderr
    assert "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr


def test_finished_run_without_backup_is_kept(tmp_path):
    """A results.json with no backup cannot continue; the run must not restart over it."""
    from mixco_tf import config as config_lib

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    finished = config_lib.Config(
        model_dir=str(model_dir),
        epochs=1,
        batch_size=32,
        queue_size=64,
        key_bn_splits=4,
        width_multiplier=0.0625,
        image_size=16,
        warmup_epochs=0,
    )
    (model_dir / "config.yaml").write_text(yaml.safe_dump(finished.to_dict()))
    (model_dir / "results.json").write_text(json.dumps({"epochs_completed": 1}))

    result = _run_train([f"--model_dir={model_dir}", *TINY_FLAGS[1:], "--epochs=2"], timeout=120)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "epochs=2" in result.stderr
    assert "no backup to continue from" in result.stderr
    assert json.loads((model_dir / "results.json").read_text()) == {"epochs_completed": 1}
