"""One pretraining run from a validated Config: data, model, fit, export, evaluation.

`mixco_tf.train` parses flags into a `Config` and calls `run_experiment`; notebooks and
scripts can call it directly.
"""

import csv
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
import yaml

from mixco_tf import augment, augment_batched, checkpointing, custom_loop, distribute, evaluation, export
from mixco_tf import plots, preview, runtime, summaries
from mixco_tf import callbacks as callbacks_lib
from mixco_tf import config as config_lib
from mixco_tf.config import ConfigError
from mixco_tf.data import available_datasets, load_dataset
from mixco_tf.models import MixCo, SimCLR, build_backbone

logger = logging.getLogger(__name__)

EXPORT_NAME = os.path.join("export", "backbone")
EXPORT_VERSION = 1


def augment_config(config):
    """Maps the flat config keys onto `augment.AugmentConfig`."""
    return augment.AugmentConfig(
        crop_scale=(config.crop_min_scale, 1.0),
        brightness=config.brightness,
        contrast=config.contrast,
        saturation=config.saturation,
        hue=config.hue,
        color_jitter_prob=config.color_jitter_prob,
        grayscale_prob=config.grayscale_prob,
        blur_prob=config.blur_prob,
        blur_sigma=(min(0.1, config.blur_max_sigma), config.blur_max_sigma),
        flip_prob=config.flip_prob,
    )


def build_model(config, mean=None, std=None):
    """Builds the model of `config.method`: MoCo-v2 is MixCo with mix_weight = 0, and
    plain SimCLR is `SimCLR` with mix_weight = 0.

    With `config.augment_on_device`, pass the data's per-channel `mean` and `std`: the
    model then draws its views in the train step. Without them it is built for its
    weights only (export, restore), which augmentation does not change.
    """
    on_device = {}
    if config.augment_on_device and mean is not None:
        on_device = {
            "augmentation": augment_config(config),
            "image_size": config.image_size,
            "mean": mean,
            "std": std,
        }
    if config.method not in config_lib.MOCO_METHODS:
        return SimCLR(
            backbone=config.backbone,
            stem=config.stem,
            width_multiplier=config.width_multiplier,
            projection_dim=config.projection_dim,
            temperature=config.temperature,
            mix_temperature=config.mix_temperature,
            mix_weight=0.0 if config.method == "simclr" else config.mix_weight,
            weight_decay=config.weight_decay,
            seed=config.seed,
            name="simclr",
            **on_device,
        )
    return MixCo(
        backbone=config.backbone,
        stem=config.stem,
        width_multiplier=config.width_multiplier,
        projection_dim=config.projection_dim,
        queue_size=config.queue_size,
        moco_momentum=config.moco_momentum,
        temperature=config.temperature,
        mix_temperature=config.mix_temperature,
        mix_weight=0.0 if config.method == "moco" else config.mix_weight,
        weight_decay=config.weight_decay,
        key_bn_splits=config.key_bn_splits,
        seed=config.seed,
        batch_norm=config.batch_norm,
        name="mixco",
        **on_device,
    )


def build_optimizer(config, steps_per_epoch):
    """Builds SGD with momentum on the schedule of `build_learning_rate_schedule`."""
    schedule = build_learning_rate_schedule(config, steps_per_epoch)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=config.sgd_momentum)


def build_learning_rate_schedule(config, steps_per_epoch):
    """Builds the per-step schedule: linear warm-up from 0, then cosine decay to 0."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = min(config.warmup_epochs * steps_per_epoch, total_steps - 1)
    if warmup_steps > 0:
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=total_steps - warmup_steps,
            warmup_target=config.learning_rate,
            warmup_steps=warmup_steps,
        )
    else:
        schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=total_steps)
    return schedule


def run_experiment(config, evaluate=True, overwrite=False, evaluate_random_init=True):
    """Pretrains, exports and evaluates; writes MODEL_DIR/results.json and returns it.

    A `model_dir` that contains the backup of an interrupted run resumes it after the last
    completed epoch, with every weight, the optimizer state and the random-generator
    state restored. A `model_dir` whose run finished all `config.epochs` epochs is not
    trained again: its results.json is returned. With a larger `epochs`, a finished run
    continues from its last epoch, and the cosine schedule is then computed over the new
    total number of steps.

    Args:
        config: a validated `mixco_tf.config.Config`.
        evaluate: whether to run the linear, 5-shot and kNN protocols on the exported
            backbone and on a randomly initialised copy.
        overwrite: delete the outputs of a previous run in `model_dir` first and train
            from scratch.
        evaluate_random_init: with `evaluate`, also evaluate the randomly initialised
            backbone. `mixco_tf.compare` turns it off for runs whose baseline another
            run of the same seed and architecture already measures.

    Returns:
        The results dict written to `results.json`.

    Raises:
        mixco_tf.config.ConfigError: before any training, if the data set is unknown,
            smaller than one batch, or `model_dir` belongs to a run with another config.
        mixco_tf.checkpointing.CheckpointError: if the backup in `model_dir` is
            unreadable or does not fit the model.
        mixco_tf.checkpointing.NonFiniteLossError: at the first NaN or infinite loss;
            the checkpoint of the last completed epoch stays on disk.
        mixco_tf.checkpointing.TrainingInterrupted: after SIGINT or SIGTERM during
            training, with the last completed epoch saved.
    """
    started = time.time()
    model_dir = config.resolved_model_dir()
    config = _with_model_dir(config, model_dir)
    _check_dataset_name(config)
    # First TensorFlow work of the run: logical CPU devices and multi-worker collectives
    # can only be set up before the runtime starts.
    strategy = _create_strategy(config)
    chief = distribute.is_chief(strategy)
    if overwrite and chief:
        checkpointing.clear_run(model_dir)
    # A worker other than the chief trains from scratch under --overwrite, because the
    # chief may be deleting the old backup while it would read it.
    state = None if overwrite and not chief else _read_resumable_state(config, model_dir)
    finished = _finished_results(config, model_dir, state)
    if finished is not None:
        return finished

    keras.utils.set_random_seed(config.seed)
    splits = _load_data(config)
    steps_per_epoch = _check_data_fits_config(config, splits)
    if chief:
        os.makedirs(model_dir, exist_ok=True)
        checkpointing.write_text_atomically(
            os.path.join(model_dir, "config.yaml"), yaml.safe_dump(config.to_dict(), sort_keys=False)
        )
        logger.info("Run directory: %s", os.path.abspath(model_dir))

    with strategy.scope():
        model = _build_compiled_model(config, strategy, steps_per_epoch, splits)
        start_epoch = 0
        if state is not None:
            checkpointing.restore_training_state(model, model_dir, state)
            start_epoch = state["epoch"]
            if chief:
                checkpointing.truncate_history(model_dir, start_epoch)
                checkpointing.truncate_tensorboard_events(os.path.join(model_dir, "logs"), start_epoch)
            logger.info("Resuming after epoch %d of %d.", start_epoch, config.epochs)

    def dataset_fn(input_context=None):
        images, batch_size = splits.train, config.batch_size
        if input_context is not None:
            # Each worker reads its own shard of the images and batches per replica.
            images = images.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
            batch_size = input_context.get_per_replica_batch_size(config.batch_size)
        if config.augment_on_device:
            # Plain images of the data set's native square side; the model draws the views.
            return augment_batched.image_batches(
                images,
                source_size=splits.image_size,
                batch_size=batch_size,
                seed=pipeline_seed(config.seed, start_epoch),
                cache=splits.fits_in_memory,
            )
        return augment.two_view_dataset(
            images,
            image_size=config.image_size,
            mean=splits.mean,
            std=splits.std,
            batch_size=batch_size,
            config=augment_config(config),
            seed=pipeline_seed(config.seed, start_epoch),
            # Large image folders are already cached in a file by their loader.
            cache=splits.fits_in_memory,
        )

    if runtime.onednn_enabled() is False and not tf.config.list_physical_devices("GPU"):
        logger.info(
            "TensorFlow's oneDNN CPU kernels are off on this CPU. %s=1 in the environment "
            "turns them on: 3.9x faster steps on a 2-core AVX2 machine (docs/benchmarks.md).",
            runtime.ONEDNN_VARIABLE,
        )
    logger.info(
        "Pretraining %s on %s: %d images, %d steps per epoch, epochs %d to %d.",
        config.method,
        config.dataset,
        splits.num_train,
        steps_per_epoch,
        start_epoch + 1,
        config.epochs,
    )
    pretrain_started = time.time()
    scratch_dir = None if chief else tempfile.mkdtemp(prefix="mixco-worker-")
    try:
        history = _fit(
            model, strategy, dataset_fn, config, scratch_dir or model_dir, start_epoch, steps_per_epoch, splits
        )
    finally:
        if scratch_dir:
            shutil.rmtree(scratch_dir, ignore_errors=True)
    pretrain_seconds = time.time() - pretrain_started
    if strategy.num_replicas_in_sync > 1:
        logger.info(
            "Final weights of %s: SHA-256 %s.",
            distribute.describe_task(strategy),
            distribute.weights_digest(model.get_weights()),
        )
    if not chief:
        logger.info("Training done; the chief writes the export and results.json.")
        return {"chief": False, "epochs_completed": config.epochs, "pretrain_seconds": round(pretrain_seconds, 1)}

    export_base = os.path.join(model_dir, EXPORT_NAME)
    export_dir = export.export_backbone(
        model.backbone,
        export_base,
        image_size=config.image_size,
        mean=splits.mean,
        std=splits.std,
        version=EXPORT_VERSION,
        overwrite=True,
    )
    logger.info("Exported the backbone to %s", export_dir)

    results = {
        "config": config.to_dict(),
        "dataset": config.dataset,
        "num_train_examples": splits.num_train,
        "num_test_examples": splits.num_test,
        "data": splits.summary(),
        "skipped_files": splits.skipped_files,
        "epochs_completed": start_epoch + (len(history.epoch) if history is not None else 0),
        "resumed_from_epoch": start_epoch if state is not None else None,
        "final_metrics": _final_metrics(history, model_dir),
        "export_dir": export_dir,
        "pretrain_seconds": round(pretrain_seconds, 1),
        "strategy": distribute.strategy_name(strategy),
        "num_replicas": strategy.num_replicas_in_sync,
        "onednn": runtime.onednn_enabled(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    if evaluate and (splits.unlabeled or splits.num_test == 0):
        logger.warning("Skipping the evaluation: %s has no labeled test split.", config.dataset)
    elif evaluate:
        # The pretrained backbone is evaluated through its export, the artifact users get.
        results["evaluation"] = evaluation.evaluate_saved_model(
            export_dir, splits, batch_size=config.eval_batch_size, seed=config.seed
        )
    if evaluate and evaluate_random_init:
        # A fixed seed makes the baseline independent of how much randomness training used.
        keras.utils.set_random_seed(config.seed + 1)
        random_backbone = build_backbone(config.backbone, config.stem, config.width_multiplier)
        results["random_init_evaluation"] = evaluation.evaluate_backbone(
            random_backbone,
            splits,
            image_size=config.image_size,
            batch_size=config.eval_batch_size,
            seed=config.seed,
        )
        for key in ("linear_top1", "linear_5shot_top1", "knn_top1"):
            logger.info(
                "%s: pretrained %.4f, random init %.4f",
                key,
                results["evaluation"][key],
                results["random_init_evaluation"][key],
            )
    results["total_seconds"] = round(time.time() - started, 1)
    _write_json_atomically(os.path.join(model_dir, "results.json"), results)
    logger.info("Wrote %s", os.path.join(model_dir, "results.json"))
    plots.write_run_plots(model_dir, model.backbone, splits, config)
    return results


def pipeline_seed(seed, start_epoch):
    """Returns the data-pipeline seed of a run that starts at `start_epoch`.

    A fresh run uses `seed` itself. A resumed run derives a new seed from both values,
    so that it draws new shuffle orders and views instead of replaying those of epoch 1.
    """
    if start_epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, start_epoch]).generate_state(1)[0])


def _create_strategy(config):
    try:
        return distribute.create_strategy(config.strategy, config.cpu_devices)
    except distribute.StrategyError as error:
        raise ConfigError(str(error)) from error


def _build_compiled_model(config, strategy, steps_per_epoch, splits=None):
    """Builds and compiles the model under `config.precision`; call it in `strategy.scope()`.

    `splits` gives the mean and std of on-device augmentation (`config.augment_on_device`).
    """
    num_replicas = strategy.num_replicas_in_sync
    try:
        key_splits = config.key_bn_splits if config.batch_norm == "shuffle" else 1
        distribute.check_global_batch(config.batch_size, num_replicas, key_splits)
    except ValueError as error:
        raise ConfigError(f"{error} (strategy={config.strategy})") from error

    if config.method not in config_lib.MOCO_METHODS and num_replicas > 1:
        # NT-Xent would take its negatives from one replica's batch only, a different loss
        # from SimCLR's, which gathers the projections of all replicas first.
        raise ConfigError(
            f"Invalid config value method={config.method!r} with {num_replicas} replicas: "
            "SimCLR trains on one device in this version. Pass --strategy=one_device, or "
            "use method=mixco or moco on several devices."
        )
    if config.jit_compile and num_replicas > 1:
        # Keras compiles strategy.run with all replicas into one XLA function, and XLA
        # cannot run one function on variables placed on several devices (TF 2.21).
        raise ConfigError(
            f"Invalid config value jit_compile=True: XLA compiles the train step of one "
            f"replica only, and strategy={config.strategy} runs {num_replicas}. Pass "
            "--jit_compile=false, or train on one device."
        )

    # The layers take the global dtype policy when they are created, so it is set for
    # the model only and restored for the rest of the process.
    mean, std = (splits.mean, splits.std) if splits is not None else (None, None)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.precision)
    try:
        model = build_model(config, mean, std)
    finally:
        keras.config.set_dtype_policy(previous_policy)

    # Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer.
    model.compile(
        optimizer=build_optimizer(config, steps_per_epoch),
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    # Creates the slot variables and the iteration count now, in the same order on a
    # fresh start and on a resume, so that a backup loads into existing variables.
    model.optimizer.build(model.trainable_variables)
    logger.info(
        "Model built for %d replica(s), per-replica batch %d, precision %s.",
        num_replicas,
        config.batch_size // num_replicas,
        config.precision,
    )
    return model


def _fit(model, strategy, dataset_fn, config, model_dir, start_epoch, steps_per_epoch, splits=None):
    """Trains from `start_epoch` with the checkpoint, guard and log callbacks.

    `model.fit` runs every strategy but `MultiWorkerMirroredStrategy`, which
    `custom_loop.fit_with_strategy_run` drives with the same callbacks.

    Returns the `History`, or None when the backup already contains all `config.epochs`.
    """
    if start_epoch >= config.epochs:
        logger.info("All %d epochs are in the backup; skipping to the export.", config.epochs)
        return None
    interrupt_guard = checkpointing.InterruptGuard()
    callbacks = [
        # First, so that a NaN step stops the run before any other callback receives its logs.
        checkpointing.NonFiniteLossGuard(
            likely_causes=_likely_nan_causes(config),
            last_checkpoint=lambda: _describe_last_checkpoint(model_dir),
        ),
        interrupt_guard,
    ]
    if config.knn_every > 0 and splits is not None:
        # Before the loggers, because they record the logs this callback adds to.
        callbacks.append(
            callbacks_lib.KNNMonitor(
                model.backbone,
                splits,
                image_size=config.image_size,
                every=config.knn_every,
                batch_size=config.eval_batch_size,
            )
        )
    callbacks += [
        # Before CSVLogger, so that history.csv gets the learning_rate column.
        summaries.LearningRateLogger(),
        # Appends on resume; truncate_history already removed rows of unsaved epochs.
        keras.callbacks.CSVLogger(
            os.path.join(model_dir, checkpointing.HISTORY_FILE), append=start_epoch > 0
        ),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), write_graph=False),
        summaries.MixedImageSummary(
            summaries.mixed_image_log_dir(model_dir),
            preview.PreviewSampler(
                splits, image_size=config.image_size, augment_config=augment_config(config), seed=config.seed
            ),
            seed=config.seed,
        ),
        # Before the checkpoint, so that every replica holds, and the checkpoint stores,
        # the replicas' mean BatchNorm statistics.
        distribute.make_batch_norm_sync_callback(strategy, _encoders(model)),
        # Last, because its backup marks the epoch as done: an epoch's history row is
        # then always written before the backup that a resumed run starts from.
        checkpointing.EpochCheckpoint(model_dir),
    ]
    # A progress bar on a terminal, one line per epoch in a log file.
    verbose = 1 if sys.stdout.isatty() else 2
    if distribute.is_multi_worker(strategy):
        with interrupt_guard:
            return custom_loop.fit_with_strategy_run(
                model,
                strategy,
                dataset_fn,
                epochs=config.epochs,
                steps_per_epoch=steps_per_epoch,
                per_replica_batch_size=config.batch_size // strategy.num_replicas_in_sync,
                initial_epoch=start_epoch,
                callbacks=callbacks,
                verbose=verbose,
                jit_compile=config.jit_compile,
            )
    with interrupt_guard:
        return model.fit(
            dataset_fn(),
            initial_epoch=start_epoch,
            epochs=config.epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )


def _encoders(model):
    """Returns the model's encoder parts: query backbone and head, and the key encoder if any."""
    names = ("backbone", "projection_head", "key_backbone", "key_projection_head")
    return [getattr(model, name) for name in names if hasattr(model, name)]


def _check_dataset_name(config):
    names = available_datasets()
    if config.dataset not in names:
        raise ConfigError(
            f"Invalid config value dataset={config.dataset!r}: expected one of {list(names)}. "
            "Fix the spelling, or register a loader with mixco_tf.data.register_dataset."
        )


def _load_data(config):
    """Loads the data set; a missing, malformed or undecodable file is a ConfigError naming it."""
    try:
        return load_dataset(config.dataset, config.data_dir, skip_bad_files=config.skip_bad_files)
    except (ValueError, OSError) as error:
        raise ConfigError(f"Cannot load dataset={config.dataset!r} (data_dir={config.data_dir!r}): {error}") from error


def _read_resumable_state(config, model_dir):
    """Returns the backup state of `model_dir`, or None; rejects a run of another config."""
    state = checkpointing.read_training_state(model_dir)
    results_path = os.path.join(model_dir, "results.json")
    if state is None and not os.path.isfile(results_path):
        # A config.yaml without a backup is from a run that stopped before its first
        # epoch ended; there is nothing to resume, so it is replaced.
        return None
    config_path = os.path.join(model_dir, "config.yaml")
    saved = config_lib.load_yaml(config_path) if os.path.isfile(config_path) else {}
    changes = config_lib.changed_keys(saved, config)
    if changes:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
        raise ConfigError(
            f"model_dir={model_dir!r} contains a run made with another config ({listed}). A run "
            f"resumes only with the same values; of its keys only {list(config_lib.RESUMABLE_KEYS)} "
            "may change. Pass a new --model_dir, or --overwrite to delete that run's outputs "
            "and train from scratch."
        )
    if state is not None and config.epochs < state["epoch"]:
        raise ConfigError(
            f"Invalid config value epochs={config.epochs}: the run in {model_dir} already "
            f"completed {state['epoch']} epochs. Pass --epochs={state['epoch']} or more, or a "
            "new --model_dir."
        )
    return state


def _finished_results(config, model_dir, state):
    """Returns the results.json of a run that already trained `config.epochs` epochs, else None."""
    results_path = os.path.join(model_dir, "results.json")
    if not os.path.isfile(results_path):
        return None
    with open(results_path, encoding="utf-8") as stream:
        results = json.load(stream)
    completed = state["epoch"] if state is not None else results.get("epochs_completed", 0)
    if config.epochs > completed and state is None:
        raise ConfigError(
            f"Invalid config value epochs={config.epochs}: the finished run in {model_dir} "
            f"trained {completed} epochs and has no backup to continue from. Pass "
            f"--epochs={completed}, a new --model_dir, or --overwrite to train from scratch."
        )
    if config.epochs > completed:
        return None
    logger.info(
        "The run in %s already finished %d epochs; returning its results.json without "
        "training. Pass a larger --epochs to continue it, a new --model_dir, or --overwrite "
        "to train again from scratch.",
        model_dir,
        completed,
    )
    return results


def _check_data_fits_config(config, splits):
    """Returns the steps per epoch; rejects a batch larger than the data, warns on the queue."""
    steps_per_epoch = splits.num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"Invalid config value batch_size={config.batch_size}: it is larger than the "
            f"{splits.num_train} training images of {config.dataset}. Lower batch_size."
        )
    # Each epoch uses steps_per_epoch * batch_size images. A queue holding more keys
    # than the other images of an epoch contains older keys of the current batch's own
    # images, which then act as negatives of themselves.
    queue_limit = steps_per_epoch * config.batch_size - config.batch_size
    if config.method in config_lib.MOCO_METHODS and config.queue_size > queue_limit:
        logger.warning(
            "queue_size=%d is larger than the training set minus one batch (%d = %d images "
            "used per epoch - batch_size %d), so the queue holds older keys of the same "
            "images as negatives. Set queue_size to at most %d.",
            config.queue_size,
            queue_limit,
            steps_per_epoch * config.batch_size,
            config.batch_size,
            queue_limit,
        )
    return steps_per_epoch


def _likely_nan_causes(config):
    return (
        f"learning_rate={config.learning_rate} too high, temperature={config.temperature} or "
        f"mix_temperature={config.mix_temperature} too small, or input images with NaN or "
        "infinite values."
    )


def _describe_last_checkpoint(model_dir):
    state = checkpointing.read_training_state(model_dir)
    if state is None:
        return "No epoch completed, so there is no checkpoint to resume from."
    return (
        f"The checkpoint of epoch {state['epoch']} in {os.path.join(model_dir, checkpointing.BACKUP_DIR)} "
        "is intact; fix the setting and rerun with the same --model_dir to resume from it."
    )


def _final_metrics(history, model_dir):
    """Returns the last epoch's metrics, from history.csv when this call trained no epoch."""
    if history is not None and history.epoch:
        return {name: float(values[-1]) for name, values in history.history.items()}
    path = os.path.join(model_dir, checkpointing.HISTORY_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        return {}
    return {name: float(value) for name, value in rows[-1].items() if name != "epoch"}


def print_summary(results):
    """Prints the evaluation table of a run to stdout."""
    lines = [f"Run finished: {results['epochs_completed']} epochs in {results['pretrain_seconds']} s of pretraining."]
    if results.get("chief") is False:
        print(lines[0] + " This worker is not the chief, which writes the results.")
        return
    if "evaluation" in results:
        lines.append(f"{'protocol':<20} {'pretrained':>11} {'random init':>12}")
        for key in ("linear_top1", "linear_5shot_top1", "knn_top1"):
            pretrained = results["evaluation"][key]
            # Runs of mixco_tf.compare may leave the shared random-init baseline to another run.
            random_init = results.get("random_init_evaluation", {}).get(key, float("nan"))
            lines.append(f"{key:<20} {pretrained:>11.4f} {random_init:>12.4f}")
    lines.append(f"Backbone SavedModel: {results['export_dir']}")
    print("\n".join(lines))


def _with_model_dir(config, model_dir):
    return dataclasses.replace(config, model_dir=model_dir)


def _write_json_atomically(path, payload):
    checkpointing.write_text_atomically(path, json.dumps(payload, indent=2))
