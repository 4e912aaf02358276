"""Input-pipeline throughput per data set, next to what the train step consumes.

    python -m benchmarks.pipeline [--num_images=500] [--batch_size=128] [--epochs=3] [--train_steps=10]

The data sets are `digits` and miniature copies of Tiny ImageNet, CIFAR-10 and an image
folder, written in their real formats to a temporary folder and read by the real
loaders. For each, it times the two-view training pipeline
(`mixco_tf.augment.two_view_dataset`): the first epoch (reading, decoding and caching)
and the later, cached epochs. It then times the
MixCo train step of the default config (`configs/digits.yaml`) at the same image
sizes on this machine, so the two rates can be compared: the pipeline keeps up when its
cached rate is above the train step's.

Rates are images per second; each image yields two augmented views.
"""

import os
import platform
import tempfile
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 500, "Training images of each miniature data set.")
flags.DEFINE_integer("batch_size", 128, "Batch size of the pipelines and the train step.")
flags.DEFINE_integer("epochs", 3, "Pipeline epochs to time; the first one fills the cache.")
flags.DEFINE_integer("train_steps", 10, "Timed train steps per image size, after 2 warm-up steps.")
flags.register_validator(
    "batch_size", lambda value: value >= 8 and value % 8 == 0,
    "must be a multiple of 8 (the key encoder's 8 BatchNorm groups)",
)
flags.register_validator("epochs", lambda value: value >= 2, "must be 2 or more: the first epoch fills the cache")
flags.register_validator("train_steps", lambda value: value >= 1, "must be 1 or more")
flags.register_multi_flags_validator(
    ["num_images", "batch_size"],
    lambda values: values["num_images"] >= values["batch_size"],
    "--num_images must be at least --batch_size, so every data set fills one batch",
)


def _write_miniatures(folder, num_images):
    from mixco_tf.data import miniature

    per_class = max(1, num_images // 5)
    miniature.write_tiny_imagenet_zip(
        os.path.join(folder, "tiny", "tiny-imagenet-200.zip"),
        num_classes=5, train_per_class=per_class, val_per_class=2, odd_kinds=miniature.ODD_KINDS,
    )
    miniature.write_cifar_archive(os.path.join(folder, "cifar10"), "cifar10", train_per_file=num_images // 5)
    miniature.write_image_folder(os.path.join(folder, "images"), num_classes=5, per_class=per_class, size=96)


def _load(name, folder):
    from mixco_tf.data import cifar, load_dataset

    if name == "cifar10":
        # The miniature archive is not the real one, so its checksum cannot match TFDS's.
        return cifar.load_cifar("cifar10", os.path.join(folder, "cifar10"), verify_checksums=False)
    data_dir = {"digits": None, "tiny_imagenet": os.path.join(folder, "tiny"), "folder": os.path.join(folder, "images")}[name]
    return load_dataset(name, data_dir)


def time_pipeline(splits, image_size, batch_size, epochs):
    """Returns the images/s of the first epoch and of the later (cached) epochs."""
    from mixco_tf import augment, experiment
    from mixco_tf.config import Config

    views = augment.two_view_dataset(
        splits.train, image_size=image_size, mean=splits.mean, std=splits.std, batch_size=batch_size,
        config=experiment.augment_config(Config()), seed=0, cache=splits.fits_in_memory,
    )
    rates = []
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for view_q, _ in views:
            images += int(view_q.shape[0])
        rates.append(images / (time.perf_counter() - started))
    return rates[0], sum(rates[1:]) / max(1, len(rates) - 1)


# The train step each view size is compared with: the default config (`configs/digits.yaml`,
# ResNet-18 cifar stem at width 0.125) at 16 and 32 px, and at 64 px the configuration of
# benchmarks/step.py (ResNet-18, imagenet stem, full width, queue 16,384).
STEP_CONFIGS = {
    16: {},
    32: {},
    64: {"stem": "imagenet", "width_multiplier": 1.0, "queue_size": 16384},
}
# (data set, view size) rows; the 64 px sources are Tiny ImageNet's and the folder's 96 px JPEGs.
ROWS = (
    ("digits", 16),
    ("tiny_imagenet", 32),
    ("cifar10", 32),
    ("folder", 32),
    ("tiny_imagenet", 64),
    ("folder", 64),
)


def time_train_step(image_size, batch_size, steps):
    """Returns the images/s that the MixCo train step of `STEP_CONFIGS[image_size]` consumes.

    Calls the train function that `fit` compiled, as benchmarks/step.py does: `fit`
    itself costs about 2 s per call, as much as several small steps.
    """
    import dataclasses

    import tensorflow as tf

    from mixco_tf import experiment
    from mixco_tf.config import Config

    config = dataclasses.replace(
        Config(), image_size=image_size, batch_size=batch_size, **STEP_CONFIGS[image_size]
    )
    model = experiment.build_model(config)
    model.compile(optimizer=experiment.build_optimizer(config, steps_per_epoch=steps + 2))
    batch = tf.random.normal([batch_size, image_size, image_size, 3])
    data = tf.data.Dataset.from_tensors((batch, batch)).repeat()
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
    iterator = iter(data)
    started = time.perf_counter()
    for _ in range(steps):
        logs = model.train_function(iterator)
    float(logs["loss"])  # waits for the last step
    return steps * batch_size / (time.perf_counter() - started)


def main(argv):
    del argv
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        _write_miniatures(folder, FLAGS.num_images)
        for name, image_size in ROWS:
            splits = _load(name, folder)
            first, cached = time_pipeline(splits, image_size, FLAGS.batch_size, FLAGS.epochs)
            rows.append((name, splits.num_train, image_size, first, cached))
            logging.info("%s at %d px: first epoch %.0f images/s, cached %.0f images/s", name, image_size, first, cached)
    step_rates = {size: time_train_step(size, FLAGS.batch_size, FLAGS.train_steps) for size in STEP_CONFIGS}

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}")
    print(f"date: {time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}")
    print(
        "| data set | train images | view size | pipeline, first epoch (images/s) "
        "| pipeline, cached (images/s) | train step consumes (images/s) | headroom (cached / step) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, num_train, image_size, first, cached in rows:
        step_rate = step_rates[image_size]
        print(
            f"| {name} | {num_train} | {image_size} | {first:.0f} | {cached:.0f} | {step_rate:.0f} "
            f"| {cached / step_rate:.1f} |"
        )


if __name__ == "__main__":
    app.run(main)
