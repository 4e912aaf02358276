"""Backup, restore and the callbacks that stop a run, on a real tiny MixCo."""

import json
import os
import signal

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import checkpointing
from mixco_tf.models import MixCo

BATCH = 8


def _tiny_model():
    model = MixCo(width_multiplier=0.0625, projection_dim=16, queue_size=24, key_bn_splits=2, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    model.optimizer.build(model.trainable_variables)
    return model


def _views(num_batches, nan_batch=None):
    """Returns a dataset of `(view_q, view_k)` batches; `nan_batch` has NaN images."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(num_batches * BATCH, 16, 16, 3)).astype("float32")
    if nan_batch is not None:
        images[nan_batch * BATCH : (nan_batch + 1) * BATCH] = np.nan
    return tf.data.Dataset.from_tensor_slices((images, images[::-1].copy())).batch(BATCH, drop_remainder=True)


def _file_bytes(path):
    with open(path, "rb") as stream:
        return stream.read()


def test_restore_returns_every_state(tmp_path):
    trained = _tiny_model()
    trained.fit(_views(3), epochs=1, verbose=0)
    state = checkpointing.save_training_state(trained, str(tmp_path), epoch=1)

    restored = _tiny_model()
    checkpointing.restore_training_state(restored, str(tmp_path), checkpointing.read_training_state(str(tmp_path)))

    assert state["epoch"] == 1
    assert int(restored.optimizer.iterations.numpy()) == 3
    assert int(restored.queue_pointer.numpy()) == (3 * BATCH) % 24
    np.testing.assert_array_equal(restored.queue.numpy(), trained.queue.numpy())
    np.testing.assert_array_equal(restored.seed_generator.state.numpy(), trained.seed_generator.state.numpy())
    for expected, actual in zip(trained.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(actual.numpy(), expected.numpy(), err_msg=expected.path)
    for expected, actual in zip(trained.key_backbone.weights, restored.key_backbone.weights):
        np.testing.assert_array_equal(actual.numpy(), expected.numpy(), err_msg=expected.path)


def test_backup_keeps_only_latest_epoch(tmp_path):
    model = _tiny_model()
    checkpointing.save_training_state(model, str(tmp_path), epoch=1)
    checkpointing.save_training_state(model, str(tmp_path), epoch=2)

    files = sorted(os.listdir(tmp_path / "backup"))

    assert files == ["epoch-0002.weights.h5", "training_state.json"]
    assert (tmp_path / "checkpoints" / "mixco.weights.h5").is_file()
    assert not list(tmp_path.rglob("partial-*"))


def test_restore_requires_built_optimizer(tmp_path):
    checkpointing.save_training_state(_tiny_model(), str(tmp_path), epoch=1)
    model = MixCo(width_multiplier=0.0625, projection_dim=16, queue_size=24, key_bn_splits=2, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.05))

    with pytest.raises(ValueError, match=r"model.optimizer.build"):
        checkpointing.restore_training_state(model, str(tmp_path), checkpointing.read_training_state(str(tmp_path)))


def test_restore_into_other_shape_names_backup(tmp_path):
    checkpointing.save_training_state(_tiny_model(), str(tmp_path), epoch=1)
    model = MixCo(width_multiplier=0.0625, projection_dim=32, queue_size=24, key_bn_splits=2, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.optimizer.build(model.trainable_variables)

    with pytest.raises(checkpointing.CheckpointError, match=r"epoch-0001\.weights\.h5 does not match"):
        checkpointing.restore_training_state(model, str(tmp_path), checkpointing.read_training_state(str(tmp_path)))


def test_corrupt_state_file_is_named(tmp_path):
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_state.json").write_text('{"epoch": 1, "weights_')

    with pytest.raises(checkpointing.CheckpointError, match=r"training_state\.json is not valid JSON"):
        checkpointing.read_training_state(str(tmp_path))


def test_missing_backup_weights_are_named(tmp_path):
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_state.json").write_text(json.dumps({"epoch": 1, "weights_file": "epoch-0001.weights.h5"}))

    with pytest.raises(checkpointing.CheckpointError, match=r"epoch-0001\.weights\.h5, which is missing"):
        checkpointing.read_training_state(str(tmp_path))


def test_truncate_history_drops_unsaved_epochs(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss\n0,9.1\n1,8.7\n2,8.5\n")

    checkpointing.truncate_history(str(tmp_path), 2)

    assert (tmp_path / "history.csv").read_text() == "epoch,loss\n0,9.1\n1,8.7\n"


def _epoch_summary_steps(log_dir):
    """Returns the sorted steps of every `epoch_loss` summary under `log_dir`."""
    from tensorflow.core.util import event_pb2

    steps = []
    for path in tf.io.gfile.glob(os.path.join(log_dir, "*", "*tfevents*")):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            if any(value.tag == "epoch_loss" for value in event.summary.value):
                steps.append(event.step)
    return sorted(steps)


def test_tensorboard_truncation_on_resume(tmp_path):
    """A run whose epoch 3 summary was written but not backed up resumes without a second point."""
    log_dir = str(tmp_path / "logs")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")
    model.fit(x, y, epochs=3, verbose=0, callbacks=[keras.callbacks.TensorBoard(log_dir)])
    assert _epoch_summary_steps(log_dir) == [0, 1, 2]

    checkpointing.truncate_tensorboard_events(log_dir, 2)
    assert _epoch_summary_steps(log_dir) == [0, 1]

    model.fit(x, y, initial_epoch=2, epochs=4, verbose=0, callbacks=[keras.callbacks.TensorBoard(log_dir)])
    assert _epoch_summary_steps(log_dir) == [0, 1, 2, 3]


def test_clear_run_keeps_other_files(tmp_path):
    checkpointing.save_training_state(_tiny_model(), str(tmp_path), epoch=1)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")

    checkpointing.clear_run(str(tmp_path))

    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_nan_batch_keeps_last_checkpoint(tmp_path):
    """A NaN in epoch 2 stops fit before any epoch-end save: epoch 1's files stay as written."""
    model_dir = str(tmp_path)
    model = _tiny_model()

    def callbacks():
        return [
            checkpointing.NonFiniteLossGuard(likely_causes="bad input data."),
            checkpointing.EpochCheckpoint(model_dir),
        ]

    model.fit(_views(3), epochs=1, callbacks=callbacks(), verbose=0)
    backup_path = tmp_path / "backup" / "epoch-0001.weights.h5"
    checkpoint_path = tmp_path / "checkpoints" / "mixco.weights.h5"
    backup_before = _file_bytes(backup_path)
    checkpoint_before = _file_bytes(checkpoint_path)
    queue_after_epoch_1 = model.queue.numpy()

    with pytest.raises(checkpointing.NonFiniteLossError) as raised:
        model.fit(_views(3, nan_batch=1), initial_epoch=1, epochs=2, callbacks=callbacks(), verbose=0)

    message = str(raised.value)
    assert "optimizer step 5 (epoch 2, batch 2)" in message
    assert "loss=nan" in message
    assert "moco_loss=nan" in message
    assert "mix_loss=nan" in message
    assert "bad input data" in message
    assert not np.isfinite(model.queue.numpy()).all()
    assert checkpointing.read_training_state(model_dir)["epoch"] == 1
    assert sorted(os.listdir(tmp_path / "backup")) == ["epoch-0001.weights.h5", "training_state.json"]
    assert _file_bytes(backup_path) == backup_before
    assert _file_bytes(checkpoint_path) == checkpoint_before
    with h5py.File(backup_path, "r") as weights:
        np.testing.assert_array_equal(weights["vars/0"][()], queue_after_epoch_1)
        assert weights["optimizer/vars/0"][()] == 3
        weights.visititems(_assert_finite)


def _assert_finite(name, item):
    if isinstance(item, h5py.Dataset) and item.dtype.kind == "f":
        assert np.isfinite(item[()]).all(), name


def test_epoch_checkpoint_skips_non_finite_epoch(tmp_path):
    callback = checkpointing.EpochCheckpoint(str(tmp_path))
    callback.set_model(_tiny_model())

    callback.on_epoch_end(0, {"loss": float("nan"), "moco_loss": 1.0, "mix_loss": 1.0})

    assert not (tmp_path / "backup").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_interrupt_guard_stops_at_batch_end():
    guard = checkpointing.InterruptGuard()
    previous = signal.getsignal(signal.SIGINT)

    with guard:
        os.kill(os.getpid(), signal.SIGINT)
        guard.on_epoch_begin(2)
        with pytest.raises(checkpointing.TrainingInterrupted, match=r"SIGINT in epoch 3, batch 5") as raised:
            guard.on_train_batch_end(4)

    assert raised.value.signal_number == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is previous


def test_interrupt_guard_second_signal_raises_at_once():
    guard = checkpointing.InterruptGuard()

    with guard:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_restore_detects_skipped_optimizer(tmp_path):
    """Keras only warns when optimizer variables do not match; restore raises instead."""
    trained = _tiny_model()
    trained.fit(_views(3), epochs=1, verbose=0)
    checkpointing.save_training_state(trained, str(tmp_path), epoch=1)
    model = MixCo(width_multiplier=0.0625, projection_dim=16, queue_size=24, key_bn_splits=2, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.05))  # no momentum, so no slot variables
    model.optimizer.build(model.trainable_variables)

    with pytest.raises(checkpointing.CheckpointError, match=r"optimizer_iterations=0, but the backup recorded 3"):
        checkpointing.restore_training_state(model, str(tmp_path), checkpointing.read_training_state(str(tmp_path)))
