"""The MixCo authors' linear evaluation: a Dense layer trained on a frozen backbone.

Settings of the MoCo-v2 linear protocol that the MixCo code reuses:

- one `Dense(num_classes)` on the pooled features, kernel N(0, 0.01), bias 0;
- SGD, learning rate 3.0, momentum 0.9, no weight decay, batch 256, 100 epochs, the
  learning rate multiplied by 0.1 after 60% and 80% of the epochs (epochs 60 and 80);
- training images: random resized crop (scale 0.08 to 1, torchvision's default) and a
  horizontal flip with probability 0.5, drawn anew each epoch;
- test images: resize to `image_size / 0.875` and center-crop `image_size` (the
  256 -> 224 ratio of ImageNet evaluation).

Unlike the cached protocol of `mixco_tf.evaluation.linear_probe`, every step runs the
backbone, because every epoch draws new crops. The backbone runs in inference mode and
is not trainable, so its weights, BatchNorm statistics included, stay as they were;
`paper_linear_eval` checks this after training.
"""

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf

from mixco_tf import augment
from mixco_tf.preprocess import normalize

logger = logging.getLogger(__name__)

LEARNING_RATE = 3.0
MOMENTUM = 0.9
BATCH_SIZE = 256
EPOCHS = 100
# Fractions of training after which the learning rate drops 10x (epochs 60 and 80 of 100).
DECAY_FRACTIONS = (0.6, 0.8)
CROP_SCALE = (0.08, 1.0)
CENTER_CROP_FRACTION = 0.875


def train_dataset(images, *, image_size, mean, std, batch_size=BATCH_SIZE, seed=0):
    """Builds the training pipeline: random resized crop, flip, normalize, batch.

    Args:
        images: dataset of `(uint8 image [height, width, 3], label)`.
        image_size: side of the backbone's input images, in pixels.
        mean: per-channel mean in [0, 1] units, 3 floats.
        std: per-channel standard deviation in [0, 1] units, 3 floats.
        batch_size: images per batch.
        seed: seed of the shuffle order and the crops.

    Returns:
        Dataset of `(float32 [batch, image_size, image_size, 3], int64 [batch])`, one
        epoch per iteration, reshuffled and re-cropped each epoch.
    """
    config = augment.AugmentConfig(
        crop_scale=CROP_SCALE, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.5
    )
    shuffle_seed, crop_seed = (int(value) for value in np.random.SeedSequence(seed).generate_state(2))
    images = images.cache()
    num_images = int(images.cardinality())
    images = images.shuffle(max(num_images, 1024), seed=shuffle_seed, reshuffle_each_iteration=True)
    element_seeds = tf.data.Dataset.random(seed=crop_seed, rerandomize_each_iteration=True).batch(2)

    def crop(example, element_seed):
        image, label = example
        view = augment.augment_image(image, element_seed, image_size, config)
        return normalize(view, mean, std), label

    dataset = tf.data.Dataset.zip((images, element_seeds)).map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def test_dataset(images, *, image_size, mean, std, batch_size=BATCH_SIZE):
    """Builds the test pipeline: resize to `image_size / 0.875`, center-crop, normalize.

    Returns:
        Dataset of `(float32 [batch, image_size, image_size, 3], int64 [batch])`.
    """
    resized = int(round(image_size / CENTER_CROP_FRACTION))
    offset = (resized - image_size) // 2

    def center_crop(image, label):
        image = tf.cast(image, tf.float32) / 255.0
        image = tf.image.resize(image, (resized, resized), method="bilinear", antialias=True)
        image = image[offset : offset + image_size, offset : offset + image_size]
        image.set_shape([image_size, image_size, 3])
        return normalize(image, mean, std), label

    return images.map(center_crop, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def build_classifier(feature_layer, image_size, num_classes, seed=0):
    """Puts a trainable Dense layer on a frozen feature extractor.

    Args:
        feature_layer: Keras layer or model mapping normalized float32
            `[batch, image_size, image_size, 3]` to `[batch, dim]`, or to a dict whose
            `"features"` entry is that tensor (a `keras.layers.TFSMLayer` on the
            `serving_normalized` endpoint). Its `trainable` flag is set to False.
        image_size: side of the input images, in pixels.
        num_classes: classes of the Dense layer.
        seed: seed of the Dense kernel's initializer.

    Returns:
        A functional `keras.Model` whose only trainable weights are the Dense kernel
        `[dim, num_classes]` and bias `[num_classes]`.
    """
    feature_layer.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="images")
    features = feature_layer(inputs, training=False)
    if isinstance(features, dict):
        features = features["features"]
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
        bias_initializer="zeros",
        name="linear_head",
    )(features)
    return keras.Model(inputs, logits, name="paper_linear_classifier")


def paper_linear_eval(
    feature_layer,
    splits,
    *,
    image_size,
    mean,
    std,
    epochs=EPOCHS,
    learning_rate=LEARNING_RATE,
    batch_size=BATCH_SIZE,
    seed=0,
):
    """Trains and tests the authors' linear classifier on a frozen backbone.

    Args:
        feature_layer: see `build_classifier`.
        splits: a `mixco_tf.data.DatasetSplits`; its train split trains the Dense layer,
            its test split measures it.
        image_size: side of the backbone's input images, in pixels.
        mean: per-channel mean the backbone was trained with, in [0, 1] units.
        std: per-channel standard deviation the backbone was trained with.
        epochs: training epochs; the learning rate drops after 60% and 80% of them.
        learning_rate: initial SGD learning rate.
        batch_size: images per step.
        seed: seed of the Dense initializer, the shuffle order and the crops.

    Returns:
        Dict with `top1` and `top5` (fractions in [0, 1]), `epochs`, `seconds`,
        `trainable_weights` (the names of the trained variables) and
        `backbone_unchanged` (True: checked by comparing every backbone weight before
        and after training).

    Raises:
        ValueError: if `epochs < 1`.
        RuntimeError: if a backbone weight changed during training.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    keras.utils.set_random_seed(seed)
    classifier = build_classifier(feature_layer, image_size, splits.num_classes, seed=seed)
    backbone_before = [np.array(keras.ops.convert_to_numpy(weight)) for weight in feature_layer.weights]

    steps_per_epoch = math.ceil(splits.num_train / batch_size)
    boundaries = [int(round(fraction * epochs)) * steps_per_epoch for fraction in DECAY_FRACTIONS]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [learning_rate, learning_rate * 0.1, learning_rate * 0.01]
    )
    classifier.compile(
        keras.optimizers.SGD(schedule, momentum=MOMENTUM),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, splits.num_classes), name="top5"),
        ],
    )
    train = train_dataset(splits.train, image_size=image_size, mean=mean, std=std, batch_size=batch_size, seed=seed)
    test = test_dataset(splits.test, image_size=image_size, mean=mean, std=std, batch_size=batch_size)

    started = time.time()
    classifier.fit(train, epochs=epochs, verbose=0)
    metrics = classifier.evaluate(test, verbose=0, return_dict=True)
    seconds = time.time() - started

    for before, weight in zip(backbone_before, feature_layer.weights):
        if not np.array_equal(before, keras.ops.convert_to_numpy(weight)):
            raise RuntimeError(f"The backbone weight {weight.path} changed during linear evaluation.")
    result = {
        "top1": float(metrics["top1"]),
        "top5": float(metrics["top5"]),
        "epochs": int(epochs),
        "seconds": round(seconds, 1),
        "trainable_weights": [weight.path for weight in classifier.trainable_weights],
        "backbone_unchanged": True,
    }
    logger.info(
        "Paper linear protocol, %d epochs: top-1 %.4f, top-5 %.4f (%.1f s)",
        epochs, result["top1"], result["top5"], seconds,
    )
    return result
