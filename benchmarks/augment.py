"""Training throughput with the views drawn in tf.data or in the train step.

    python -m benchmarks.augment [--settings=digits,tiny_imagenet_64] [--steps=8] [--repeats=3]

For each setting, two MixCo models train on the same images through the train function
that `fit` compiled, each fed by its real input pipeline:

- tf.data: `augment.two_view_dataset` draws both views per image on the host CPU;
- on device: `augment_batched.image_batches` yields plain images, and the model
  (`augment_on_device=True`) draws both views inside its train step.

The timed calls of the two alternate `--repeats` times, and the medians are reported,
so a change of load hits both sides of the ratio. The pipelines' caches are filled and
the steps traced before timing. The augmentation alone is timed too: iterating the
cached tf.data pipeline, and the compiled on-device draw of both views for one batch.

Settings:

- `digits`: the default config (`configs/digits.yaml`: ResNet-18, cifar stem, width
  0.125, 16 px views, batch 128) on the bundled digits.
- `tiny_imagenet_64`: ResNet-18, imagenet stem, width `--width_64`, 64 px views, queue
  4096, on a miniature Tiny ImageNet (`--num_images` 64x64 JPEGs in the real archive
  format, read by the real loader).

Rates are images per second; each image yields two views.
"""

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time

from benchmarks import flags

SETTINGS = ("digits", "tiny_imagenet_64")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.augment", description=__doc__.split("\n")[0])
    parser.add_argument("--settings", type=flags.list_of(str), default=list(SETTINGS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="Timed train steps per repeat.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating timed runs per pipeline.")
    parser.add_argument("--width_64", type=float, default=0.25, help="Width multiplier of the 64 px setting.")
    parser.add_argument("--num_images", type=int, default=500, help="Images of the miniature Tiny ImageNet.")
    return parser


def _setting(name, args, folder):
    """Returns `(config, splits)` of a setting."""
    from mixco_tf.config import Config
    from mixco_tf.data import load_dataset, miniature

    if name == "digits":
        return dataclasses.replace(Config(), batch_size=args.batch_size), load_dataset("digits")
    if name != "tiny_imagenet_64":
        raise ValueError(f"Unknown setting {name!r}; expected one of {list(SETTINGS)}.")
    data_dir = os.path.join(folder, "tiny")
    miniature.write_tiny_imagenet_zip(
        os.path.join(data_dir, "tiny-imagenet-200.zip"),
        num_classes=5,
        train_per_class=max(1, args.num_images // 5),
        val_per_class=2,
    )
    config = dataclasses.replace(
        Config(),
        dataset="tiny_imagenet",
        stem="imagenet",
        image_size=64,
        width_multiplier=args.width_64,
        queue_size=4096,
        batch_size=args.batch_size,
        flip_prob=0.5,
        blur_prob=0.5,
        crop_min_scale=0.2,
    )
    return config, load_dataset("tiny_imagenet", data_dir)


def _pipeline(config, splits, on_device):
    from mixco_tf import augment, augment_batched, experiment

    if on_device:
        dataset = augment_batched.image_batches(
            splits.train, source_size=splits.image_size, batch_size=config.batch_size, seed=config.seed
        )
    else:
        dataset = augment.two_view_dataset(
            splits.train,
            image_size=config.image_size,
            mean=splits.mean,
            std=splits.std,
            batch_size=config.batch_size,
            config=experiment.augment_config(config),
            seed=config.seed,
        )
    return dataset.repeat()


def _trainer(config, splits, on_device):
    """Returns a function that runs `steps` train steps fed by the pipeline, after warm-up."""
    from mixco_tf import experiment

    config = dataclasses.replace(config, augment_on_device=on_device)
    steps_per_epoch = splits.num_train // config.batch_size
    model = experiment.build_model(config, splits.mean, splits.std)
    model.compile(optimizer=experiment.build_optimizer(config, steps_per_epoch=1000))
    dataset = _pipeline(config, splits, on_device)
    model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)
    iterator = iter(dataset)
    # One epoch untimed: it fills the pipeline's cache.
    for _ in range(steps_per_epoch):
        logs = model.train_function(iterator)
    float(logs["loss"])

    def train(steps):
        for _ in range(steps):
            logs = model.train_function(iterator)
        float(logs["loss"])  # waits for the last step

    return train


def _time_training(config, splits, steps, repeats):
    trainers = {mode: _trainer(config, splits, mode == "on_device") for mode in ("tf_data", "on_device")}
    seconds = {mode: [] for mode in trainers}
    for _ in range(repeats):
        for mode, train in trainers.items():
            started = time.perf_counter()
            train(steps)
            seconds[mode].append(time.perf_counter() - started)
    return {mode: steps * config.batch_size / statistics.median(values) for mode, values in seconds.items()}


def _time_augmentation_alone(config, splits, batches):
    """Returns the images/s of the cached tf.data views and of the compiled on-device views."""
    import keras
    import tensorflow as tf

    from mixco_tf import augment_batched, experiment

    views = iter(_pipeline(config, splits, on_device=False))
    for _ in range(splits.num_train // config.batch_size):
        next(views)
    started = time.perf_counter()
    for _ in range(batches):
        next(views)
    tf_data_rate = batches * config.batch_size / (time.perf_counter() - started)

    images = next(iter(_pipeline(config, splits, on_device=True)))
    generator = keras.random.SeedGenerator(0)
    draw = tf.function(
        lambda batch: augment_batched.draw_two_views(
            batch,
            generator,
            image_size=config.image_size,
            config=experiment.augment_config(config),
            mean=splits.mean,
            std=splits.std,
        )
    )
    float(tf.reduce_sum(draw(images)[0]))
    started = time.perf_counter()
    for _ in range(batches):
        view_q, _ = draw(images)
    float(tf.reduce_sum(view_q))
    on_device_rate = batches * config.batch_size / (time.perf_counter() - started)
    return tf_data_rate, on_device_rate


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in args.settings:
        if name not in SETTINGS:
            parser.error(f"invalid setting {name!r} in --settings: use one of {', '.join(SETTINGS)}")
    if args.batch_size < 8 or args.batch_size % 8:
        parser.error(f"invalid --batch_size={args.batch_size}: use a multiple of 8 (the key encoder's 8 BatchNorm groups)")
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"invalid --{name}={getattr(args, name)}: use 1 or more")
    if args.num_images < args.batch_size:
        parser.error(f"invalid --num_images={args.num_images}: use at least --batch_size={args.batch_size}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.settings:
            config, splits = _setting(name, args, folder)
            training = _time_training(config, splits, args.steps, args.repeats)
            alone = _time_augmentation_alone(config, splits, batches=max(4, args.steps))
            rows.append((name, config, training, alone))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}")
    print(
        "| setting | width | view size | batch | training, tf.data views (images/s) "
        "| training, on-device views (images/s) | ratio (on device / tf.data) "
        "| views alone, tf.data (images/s) | views alone, on device (images/s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, config, training, (tf_data_alone, on_device_alone) in rows:
        print(
            f"| {name} | {config.width_multiplier:g} | {config.image_size} | {config.batch_size} "
            f"| {training['tf_data']:.1f} | {training['on_device']:.1f} "
            f"| {training['on_device'] / training['tf_data']:.2f} "
            f"| {tf_data_alone:.0f} | {on_device_alone:.0f} |"
        )


if __name__ == "__main__":
    main()
