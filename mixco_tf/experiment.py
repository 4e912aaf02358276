"""One pretraining run from a validated Config: data, model, fit, export, evaluation.

`mixco_tf.train` parses flags into a `Config` and calls `run_experiment`; notebooks and
scripts can call it directly.
"""

import dataclasses
import json
import logging
import os
import sys
import time

import keras
import tensorflow as tf
import yaml

from mixco_tf import augment, evaluation, export
from mixco_tf.data import load_dataset
from mixco_tf.models import MixCo, build_backbone

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


def build_model(config):
    """Builds the MixCo model of a config (MoCo-v2 is MixCo with mix_weight = 0)."""
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
        name="mixco",
    )


def build_optimizer(config, steps_per_epoch):
    """SGD with momentum and a per-step schedule: linear warm-up, then cosine decay to 0."""
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
    return keras.optimizers.SGD(learning_rate=schedule, momentum=config.sgd_momentum)


def run_experiment(config, evaluate=True):
    """Pretrains, exports and evaluates; writes MODEL_DIR/results.json and returns it.

    Args:
        config: a validated `mixco_tf.config.Config`.
        evaluate: whether to run the linear, 5-shot and kNN protocols on the exported
            backbone and on a randomly initialised copy.

    Returns:
        The results dict written to `results.json`.
    """
    started = time.time()
    model_dir = config.resolved_model_dir()
    os.makedirs(model_dir, exist_ok=True)
    config = _with_model_dir(config, model_dir)
    with open(os.path.join(model_dir, "config.yaml"), "w", encoding="utf-8") as stream:
        yaml.safe_dump(config.to_dict(), stream, sort_keys=False)
    logger.info("Run directory: %s", os.path.abspath(model_dir))

    keras.utils.set_random_seed(config.seed)
    splits = load_dataset(config.dataset, config.data_dir)
    steps_per_epoch = splits.num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {splits.num_train} training "
            f"images of {config.dataset}. Lower batch_size."
        )
    train_views = augment.two_view_dataset(
        splits.train,
        image_size=config.image_size,
        mean=splits.mean,
        std=splits.std,
        batch_size=config.batch_size,
        config=augment_config(config),
        seed=config.seed,
    )
    logger.info(
        "Pretraining %s on %s: %d images, %d steps per epoch, %d epochs.",
        config.method,
        config.dataset,
        splits.num_train,
        steps_per_epoch,
        config.epochs,
    )

    model = build_model(config)
    model.compile(
        optimizer=build_optimizer(config, steps_per_epoch),
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(model_dir, "backup")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(model_dir, "checkpoints", "mixco.weights.h5"), save_weights_only=True
        ),
        keras.callbacks.CSVLogger(os.path.join(model_dir, "history.csv")),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), write_graph=False),
    ]
    os.makedirs(os.path.join(model_dir, "checkpoints"), exist_ok=True)
    pretrain_started = time.time()
    # A progress bar on a terminal, one line per epoch in a log file.
    verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(train_views, epochs=config.epochs, callbacks=callbacks, verbose=verbose, shuffle=False)
    pretrain_seconds = time.time() - pretrain_started

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
        "epochs_completed": len(history.epoch),
        "final_metrics": {name: float(values[-1]) for name, values in history.history.items()},
        "export_dir": export_dir,
        "pretrain_seconds": round(pretrain_seconds, 1),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    if evaluate:
        # The pretrained backbone is evaluated through its export, the artifact users get.
        results["evaluation"] = evaluation.evaluate_saved_model(
            export_dir, splits, batch_size=config.eval_batch_size, seed=config.seed
        )
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
    return results


def print_summary(results):
    """Prints the evaluation table of a run to stdout."""
    lines = [f"Run finished: {results['epochs_completed']} epochs in {results['pretrain_seconds']} s of pretraining."]
    if "evaluation" in results:
        lines.append(f"{'protocol':<20} {'pretrained':>11} {'random init':>12}")
        for key in ("linear_top1", "linear_5shot_top1", "knn_top1"):
            pretrained = results["evaluation"][key]
            random_init = results["random_init_evaluation"][key]
            lines.append(f"{key:<20} {pretrained:>11.4f} {random_init:>12.4f}")
    lines.append(f"Backbone SavedModel: {results['export_dir']}")
    print("\n".join(lines))


def _with_model_dir(config, model_dir):
    return dataclasses.replace(config, model_dir=model_dir)


def _write_json_atomically(path, payload):
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2)
    os.replace(temporary, path)
