"""Training state on disk: atomic writes, resume after a crash, and guards that stop a run.

A run directory keeps two kinds of checkpoint, both written at the end of each epoch:

- `checkpoints/mixco.weights.h5`: the model's weights (`model.save_weights`), which
  `mixco_tf.export` reads;
- `backup/`: the full training state, `epoch-NNNN.weights.h5` (model and optimizer
  variables: query and key encoders, queue, queue pointer, optimizer slots and iteration
  count) and `training_state.json`, which names that weights file and stores the number
  of completed epochs and the state of the model's `keras.random.SeedGenerator`. Keras's
  `save_weights` does not store seed-generator states (Keras 3.15). `MixCo` adds its
  generator's state to its weights files, and the JSON records it as well, so backups
  written before that addition still resume exactly.

Every file is written under a temporary name and renamed into place, and the JSON file
is written last, so a process killed at any moment leaves either the previous epoch's
state or the new one, never a mix. `keras.callbacks.BackupAndRestore` (Keras 3.15)
overwrites its weights file in place and writes its epoch number in a second step, which
a SIGKILL between the two leaves inconsistent. It also deletes its backup when `fit`
returns, even after `TerminateOnNaN`; this module keeps the backup of the last epoch.
"""

import glob
import json
import logging
import math
import os
import shutil
import signal
import threading

import keras
import numpy as np

logger = logging.getLogger(__name__)

BACKUP_DIR = "backup"
STATE_FILE = "training_state.json"
CHECKPOINT_FILE = os.path.join("checkpoints", "mixco.weights.h5")
HISTORY_FILE = "history.csv"
# Everything a training run writes into its model_dir; `clear_run` deletes these only.
RUN_OUTPUTS = (
    "config.yaml",
    BACKUP_DIR,
    "checkpoints",
    HISTORY_FILE,
    "logs",
    "plots",
    "export",
    "results.json",
)
LOSS_KEYS = ("loss", "moco_loss", "nt_xent_loss", "mix_loss")


class CheckpointError(ValueError):
    """Raised when a backup is unreadable or does not fit the model built from the config."""


class NonFiniteLossError(RuntimeError):
    """Raised when a training step produced a NaN or infinite loss."""


class TrainingInterrupted(RuntimeError):
    """Raised at a batch end after SIGINT or SIGTERM; `signal_number` is the signal."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.signal_number = signal_number


# ---------------------------------------------------------------------- atomic files


def write_text_atomically(path, text):
    """Writes `text` to `path` through a temporary file and a rename, then fsyncs it."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def save_weights_atomically(model, path):
    """Saves `model.save_weights` to `path` (ending in `.weights.h5`) through a rename."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # Keras requires the `.weights.h5` suffix, so the temporary name keeps it.
    temporary = os.path.join(directory, "partial-" + os.path.basename(path))
    model.save_weights(temporary, overwrite=True)
    with open(temporary, "rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _copy_atomically(source, destination):
    os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
    temporary = os.path.join(os.path.dirname(destination), "partial-" + os.path.basename(destination))
    shutil.copyfile(source, temporary)
    with open(temporary, "rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(temporary, destination)


# ---------------------------------------------------------------------- training state


def read_training_state(model_dir):
    """Returns the dict of `MODEL_DIR/backup/training_state.json`, or None without one.

    Raises:
        CheckpointError: if the file is not valid JSON or names a missing weights file.
    """
    path = os.path.join(model_dir, BACKUP_DIR, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as stream:
        try:
            state = json.load(stream)
        except json.JSONDecodeError as error:
            raise CheckpointError(
                f"{path} is not valid JSON ({error}). Delete {os.path.dirname(path)} to "
                "restart training from scratch, or pass --overwrite."
            ) from error
    weights_path = os.path.join(model_dir, BACKUP_DIR, state["weights_file"])
    if not os.path.isfile(weights_path):
        raise CheckpointError(
            f"{path} names the weights file {weights_path}, which is missing. Delete "
            f"{os.path.dirname(path)} to restart training from scratch, or pass --overwrite."
        )
    return state


def save_training_state(model, model_dir, epoch):
    """Writes the checkpoint and the backup of `model` after `epoch` completed epochs.

    The optimizer must be built (`model.optimizer.build`) so that its slots and
    iteration count are saved.

    Args:
        model: a compiled `mixco_tf.MixCo` or `mixco_tf.SimCLR`.
        model_dir: the run directory.
        epoch: number of completed epochs, 1 after the first.
    """
    backup_dir = os.path.join(model_dir, BACKUP_DIR)
    weights_file = f"epoch-{epoch:04d}.weights.h5"
    weights_path = os.path.join(backup_dir, weights_file)
    save_weights_atomically(model, weights_path)
    # The checkpoint is a copy of the same file, so the model is serialized once.
    _copy_atomically(weights_path, os.path.join(model_dir, CHECKPOINT_FILE))
    state = {
        "epoch": epoch,
        "weights_file": weights_file,
        "optimizer_iterations": int(model.optimizer.iterations.numpy()),
        "queue_pointer": _queue_pointer(model),
        "seed_generator_state": model.seed_generator.state.numpy().tolist(),
    }
    # The JSON file is the commit point: until it is renamed into place, a restart
    # resumes from the previous epoch's files.
    write_text_atomically(os.path.join(backup_dir, STATE_FILE), json.dumps(state, indent=2))
    for path in glob.glob(os.path.join(backup_dir, "*.weights.h5")):
        if os.path.basename(path) != weights_file:
            os.remove(path)
    return state


def restore_training_state(model, model_dir, state):
    """Loads a backup written by `save_training_state` into a compiled, built `model`.

    Args:
        model: a `mixco_tf.MixCo` or `mixco_tf.SimCLR` of the same config, compiled, with its
            optimizer built.
        model_dir: the run directory.
        state: the dict returned by `read_training_state`.

    Raises:
        ValueError: if the optimizer is not built.
        CheckpointError: if the weights do not fit the model.
    """
    if not model.optimizer.built:
        raise ValueError(
            "Build the optimizer before restoring, e.g. "
            "model.optimizer.build(model.trainable_variables); otherwise its slots and "
            "iteration count have no variables to load into."
        )
    weights_path = os.path.join(model_dir, BACKUP_DIR, state["weights_file"])
    try:
        model.load_weights(weights_path)
    except ValueError as error:
        raise CheckpointError(
            f"The backup {weights_path} does not match the model built from the config "
            f"({error}). Pass a new --model_dir, or --overwrite to delete this run's state."
        ) from error
    model.seed_generator.state.assign(
        np.asarray(state["seed_generator_state"], dtype=model.seed_generator.state.dtype)
    )
    # Keras skips, with only a warning, optimizer variables whose count differs from
    # the file's; comparing with the values stored at save time catches that.
    restored = {
        "optimizer_iterations": int(model.optimizer.iterations.numpy()),
        "queue_pointer": _queue_pointer(model),
    }
    for key, value in restored.items():
        if value != state[key]:
            raise CheckpointError(
                f"Restoring {weights_path} gave {key}={value}, but the backup recorded "
                f"{state[key]}, so it did not load completely. Pass a new --model_dir, or "
                "--overwrite to delete this run's state."
            )
    logger.info(
        "Restored %s (end of epoch %d): optimizer iterations %d, queue pointer %s.",
        weights_path,
        state["epoch"],
        int(model.optimizer.iterations.numpy()),
        _queue_pointer(model),
    )


def _queue_pointer(model):
    """Returns the queue pointer of a MixCo model, or None for a model without a queue (SimCLR)."""
    pointer = getattr(model, "queue_pointer", None)
    return None if pointer is None else int(pointer.numpy())


def truncate_history(model_dir, epochs):
    """Keeps the header and the rows of the first `epochs` epochs of `history.csv`.

    A process killed after writing an epoch's row but before its backup has logged an
    epoch that the resumed run trains again. Dropping that row avoids a duplicate.
    """
    path = os.path.join(model_dir, HISTORY_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    if not lines:
        return
    header, rows = lines[0], lines[1:]
    kept_rows = [row for row in rows if int(row.split(",", 1)[0]) < epochs]
    if len(kept_rows) != len(rows):
        logger.info("Dropped %d rows of epochs not in the backup from %s.", len(rows) - len(kept_rows), path)
    write_text_atomically(path, "\n".join([header, *kept_rows]) + "\n")


def truncate_tensorboard_events(log_dir, epochs):
    """Drops `epoch_*` summaries of epoch `epochs` and later from the event files of `log_dir`.

    Keras's `TensorBoard` callback writes an epoch's summaries (step = epoch index) before
    the backup of that epoch, like `history.csv`, and TensorBoard would show both the
    killed run's point and the resumed run's point for the same step. Every other event
    (file version, graphs, batch-level summaries) is kept. Files are rewritten atomically.
    """
    import tensorflow as tf

    from tensorflow.core.util import event_pb2

    for path in sorted(glob.glob(os.path.join(log_dir, "**", "*tfevents*"), recursive=True)):
        records = [bytes(record.numpy()) for record in tf.data.TFRecordDataset(path)]
        kept = []
        for record in records:
            event = event_pb2.Event.FromString(record)
            is_epoch_summary = event.HasField("summary") and any(
                value.tag.startswith("epoch_") for value in event.summary.value
            )
            if not (is_epoch_summary and event.step >= epochs):
                kept.append(record)
        if len(kept) == len(records):
            continue
        temporary = path + ".tmp"
        with tf.io.TFRecordWriter(temporary) as writer:
            for record in kept:
                writer.write(record)
        os.replace(temporary, path)
        logger.info(
            "Dropped %d summaries of epochs not in the backup from %s.", len(records) - len(kept), path
        )


def clear_run(model_dir):
    """Deletes the outputs of a previous run in `model_dir` (`RUN_OUTPUTS`), nothing else."""
    for name in RUN_OUTPUTS:
        path = os.path.join(model_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            logger.info("Deleted %s", path)
        elif os.path.exists(path):
            os.remove(path)
            logger.info("Deleted %s", path)


# ---------------------------------------------------------------------- callbacks


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes the backup and the checkpoint at each epoch end, unless the loss is not finite.

    Args:
        model_dir: the run directory.
    """

    def __init__(self, model_dir):
        super().__init__()
        self.model_dir = model_dir

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        bad = {key: logs[key] for key in LOSS_KEYS if key in logs and not math.isfinite(logs[key])}
        if bad:
            # NonFiniteLossGuard normally stops the run first; this keeps the last good
            # checkpoint even when the guard is not installed.
            logger.error("Epoch %d ended with non-finite %s; its checkpoint is not written.", epoch + 1, bad)
            return
        save_training_state(self.model, self.model_dir, epoch + 1)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` at the first batch end whose loss is NaN or infinite.

    Raising from `on_train_batch_end` ends `fit` before the epoch-end callbacks, so no
    checkpoint of the broken weights is written. `keras.callbacks.TerminateOnNaN` only
    sets `stop_training`, after which Keras still runs every `on_epoch_end`.

    Args:
        likely_causes: text appended to the error, e.g. the run's learning rate and
            temperatures.
        last_checkpoint: a function returning a description of the last good checkpoint.
    """

    def __init__(self, likely_causes="", last_checkpoint=None):
        super().__init__()
        self.likely_causes = likely_causes
        self.last_checkpoint = last_checkpoint
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if all(math.isfinite(logs[key]) for key in LOSS_KEYS if key in logs):
            return
        components = ", ".join(f"{key}={logs[key]}" for key in LOSS_KEYS if key in logs)
        message = (
            f"Non-finite loss at optimizer step {int(self.model.optimizer.iterations.numpy())} "
            f"(epoch {self._epoch + 1}, batch {batch + 1}): {components} (means over the "
            f"epoch up to this batch). Likely causes: {self.likely_causes}"
        )
        if self.last_checkpoint is not None:
            message += f" {self.last_checkpoint()}"
        raise NonFiniteLossError(message)


class InterruptGuard(keras.callbacks.Callback):
    """Turns SIGINT and SIGTERM during `fit` into a `TrainingInterrupted` at the next batch end.

    Use it as a context manager around `fit` and as one of its callbacks. Stopping at a
    batch end, and not inside a checkpoint write, leaves the backup of the last completed
    epoch on disk. A second signal restores the previous handlers and raises
    `KeyboardInterrupt` at once. Outside the main thread the guard does nothing, because
    Python delivers signals to the main thread only.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        super().__init__()
        self._previous_handlers = {}
        self._received = None
        self._epoch = 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous_handlers[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        self._restore_handlers()
        return False

    def _restore_handlers(self):
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _handle(self, number, frame):
        if self._received is not None:
            self._restore_handlers()
            raise KeyboardInterrupt
        self._received = number
        logger.warning(
            "Received %s: stopping after the current step (send it again to stop at once).",
            signal.Signals(number).name,
        )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._received is None:
            return
        raise TrainingInterrupted(
            f"Stopped by {signal.Signals(self._received).name} in epoch {self._epoch + 1}, "
            f"batch {batch + 1}; the partial epoch is discarded.",
            self._received,
        )
