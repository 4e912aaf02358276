"""MoCo-v2 two-view augmentation as a seeded, stateless tf.data pipeline.

Each view of an image goes through the MoCo-v2 transforms in torchvision's order:

1. random resized crop (area fraction `crop_scale`, aspect ratio `crop_ratio`),
2. color jitter (brightness, contrast, saturation, hue) with probability
   `color_jitter_prob`,
3. grayscale with probability `grayscale_prob`,
4. Gaussian blur with sigma drawn from `blur_sigma`, with probability `blur_prob`,
5. horizontal flip with probability `flip_prob`,
6. per-channel normalization with the dataset's mean and std (`two_view_dataset` only).

A probability of 0, or a jitter strength of 0, removes that transform from the graph, and
`crop_scale=(1, 1)` keeps the whole image.

Every random draw is stateless: it depends only on the seed passed in, so a pipeline
built twice with the same seed yields the same views in the same order.

Where the TensorFlow ops differ from torchvision's transforms, which the MoCo-v2 code uses:

- Crop: `tf.image.stateless_sample_distorted_bounding_box` draws the aspect ratio
  uniformly (torchvision: log-uniformly) and then the crop height uniformly, so the area
  is not uniform in `crop_scale` (torchvision: uniform). It works on whole pixels and
  keeps the area inside `crop_scale` exactly. After 100 failed attempts it returns the
  whole image, where torchvision falls back to a center crop after 10.
- Jitter order: brightness, contrast, saturation, hue, always in that order. torchvision
  applies them in a random order per image.
- Contrast: `tf.image.adjust_contrast` blends each channel with that channel's mean.
  torchvision blends with the mean of the grayscale image.
- Saturation: `tf.image.adjust_saturation` scales S in HSV space. torchvision blends
  with the grayscale image.
- Blur: the kernel side is about 10% of the output side (odd, at least 3), as in SimCLR.
  MoCo-v2 blurs with PIL's `ImageFilter.GaussianBlur(radius=sigma)`, which sizes its own
  kernel from sigma. With the 3-pixel kernel of 32x32 views, sigmas near 2 give nearly
  a 3x3 box filter, a weaker blur than MoCo-v2's at the same sigma.
"""

import dataclasses
import logging
import math
import numbers
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from mixco_tf.dataclass_repr import multiline_repr
from mixco_tf.preprocess import normalize, resize_and_normalize

logger = logging.getLogger(__name__)

# Shuffle buffer used when the input's size is unknown and the caller gave none.
DEFAULT_SHUFFLE_BUFFER = 10_000

# Each random draw of `augment_image` has its own row of the split seed, so disabling one
# transform does not change the draws of the others.
_SEED_CROP = 0
_SEED_JITTER_GATE = 1
_SEED_BRIGHTNESS = 2
_SEED_CONTRAST = 3
_SEED_SATURATION = 4
_SEED_HUE = 5
_SEED_GRAYSCALE_GATE = 6
_SEED_BLUR_GATE = 7
_SEED_BLUR_SIGMA = 8
_SEED_FLIP_GATE = 9
_NUM_SEEDS = 10


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strengths and probabilities of the MoCo-v2 augmentation. Defaults are MoCo-v2's.

    Attributes:
        crop_scale: `(min, max)` area of the random crop as a fraction of the image,
            `0 < min <= max <= 1`.
        crop_ratio: `(min, max)` aspect ratio (width / height) of the random crop,
            `0 < min <= max`.
        brightness: the brightness factor is drawn from `[max(0, 1 - b), 1 + b]`.
        contrast: the contrast factor is drawn from `[max(0, 1 - c), 1 + c]`.
        saturation: the saturation factor is drawn from `[max(0, 1 - s), 1 + s]`.
        hue: the hue shift is drawn from `[-h, h]`, in turns of the hue circle,
            `0 <= h <= 0.5`.
        color_jitter_prob: probability of applying the color jitter.
        grayscale_prob: probability of converting the view to grayscale.
        blur_prob: probability of blurring the view.
        blur_sigma: `(min, max)` standard deviation of the Gaussian blur in pixels of the
            output view, `0 < min <= max`.
        flip_prob: probability of a horizontal flip.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5

    __repr__ = multiline_repr

    def __post_init__(self):
        # YAML and JSON give lists, and a frozen dataclass should hold tuples.
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first field that is out of its valid range."""
        _check_range_pair("crop_scale", self.crop_scale, max_value=1.0)
        _check_range_pair("crop_ratio", self.crop_ratio)
        for name in ("brightness", "contrast", "saturation"):
            _check_number(name, getattr(self, name), 0.0, math.inf, "[0, inf)")
        _check_number("hue", self.hue, 0.0, 0.5, "[0, 0.5]")
        for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "flip_prob"):
            _check_number(name, getattr(self, name), 0.0, 1.0, "[0, 1]")
        _check_range_pair("blur_sigma", self.blur_sigma)

    @property
    def color_jitter_enabled(self) -> bool:
        """True when color jitter has a nonzero probability and a nonzero strength."""
        strengths = (self.brightness, self.contrast, self.saturation, self.hue)
        return self.color_jitter_prob > 0 and any(s > 0 for s in strengths)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_number(name: str, value, low: float, high: float, interval: str) -> None:
    if not _is_real(value) or not low <= value <= high:
        raise ValueError(
            f"AugmentConfig.{name} must be a number in {interval}, got {value!r}. "
            "Set it inside that range. A value of 0 disables the transform."
        )


def _check_range_pair(name: str, value, max_value: Optional[float] = None) -> None:
    upper = "" if max_value is None else f" <= {max_value:g}"
    valid = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_real(v) for v in value)
        and 0 < value[0] <= value[1]
        and (max_value is None or value[1] <= max_value)
    )
    if not valid:
        default = AugmentConfig.__dataclass_fields__[name].default
        raise ValueError(
            f"AugmentConfig.{name} must be a pair (min, max) with 0 < min <= max{upper}, "
            f"got {value!r}. The MoCo-v2 value is {default!r}."
        )


def _check_image_size(image_size) -> None:
    # Reflect padding for the blur needs at least 2 pixels per side.
    if not _is_int(image_size) or image_size < 2:
        raise ValueError(f"image_size must be an integer >= 2, got {image_size!r}.")


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"mean and std need 3 values (R, G, B), got mean={mean!r} and std={std!r}."
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive in every channel, got std={std!r}.")


def _check_batch_size(batch_size) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def blur_kernel_size(image_size: int) -> int:
    """Returns the Gaussian blur kernel side: about 10% of `image_size`, odd, at least 3."""
    return max(3, 2 * (int(0.1 * image_size) // 2) + 1)


def _apply_with_probability(
    transform: Callable[[tf.Tensor], tf.Tensor],
    image: tf.Tensor,
    probability: float,
    seed: tf.Tensor,
) -> tf.Tensor:
    if probability <= 0:
        return image
    if probability >= 1:
        return transform(image)
    draw = tf.random.stateless_uniform([], seed=seed)
    return tf.cond(draw < probability, lambda: transform(image), lambda: image)


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high)


def _jitter_factor(seed: tf.Tensor, strength: float) -> tf.Tensor:
    """Draws a torchvision jitter factor from `[max(0, 1 - strength), 1 + strength]`."""
    return _uniform(seed, max(0.0, 1.0 - strength), 1.0 + strength)


def _random_resized_crop(
    image: tf.Tensor, seed: tf.Tensor, image_size: int, config: AugmentConfig
) -> tf.Tensor:
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=whole_image,
        seed=seed,
        # The whole-image box always overlaps the crop, so only area_range and
        # aspect_ratio_range constrain it.
        min_object_covered=0.0,
        aspect_ratio_range=config.crop_ratio,
        area_range=config.crop_scale,
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, size)
    # Antialiasing matches PIL's bilinear resize, which torchvision uses on PIL images.
    return tf.image.resize(crop, (image_size, image_size), method="bilinear", antialias=True)


def _color_jitter(image: tf.Tensor, seeds: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    if config.brightness > 0:
        # tf.image.adjust_brightness adds a delta, torchvision multiplies by a factor.
        factor = _jitter_factor(seeds[_SEED_BRIGHTNESS], config.brightness)
        image = tf.clip_by_value(image * factor, 0.0, 1.0)
    if config.contrast > 0:
        factor = _jitter_factor(seeds[_SEED_CONTRAST], config.contrast)
        image = tf.clip_by_value(tf.image.adjust_contrast(image, factor), 0.0, 1.0)
    if config.saturation > 0:
        factor = _jitter_factor(seeds[_SEED_SATURATION], config.saturation)
        image = tf.clip_by_value(tf.image.adjust_saturation(image, factor), 0.0, 1.0)
    if config.hue > 0:
        delta = _uniform(seeds[_SEED_HUE], -config.hue, config.hue)
        image = tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)
    return image


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _gaussian_blur(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    kernel_size = blur_kernel_size(image.shape[0])
    radius = kernel_size // 2
    sigma = _uniform(seed, config.blur_sigma[0], config.blur_sigma[1])
    # keras.ops.image.gaussian_blur pads with zeros, which darkens the border. Reflect
    # padding first, as torchvision's GaussianBlur does, keeps border brightness.
    padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    blurred = keras.ops.image.gaussian_blur(
        padded,
        kernel_size=(kernel_size, kernel_size),
        sigma=(sigma, sigma),
        data_format="channels_last",
    )
    return blurred[radius:-radius, radius:-radius, :]


def augment_image(image, seed, image_size: int, config: AugmentConfig) -> tf.Tensor:
    """Draws one MoCo-v2 view of an image, without normalization.

    The same `image`, `seed` and `config` always give the same view.

    Args:
        image: uint8 tensor `[height, width, 3]` read as 0-255, or float in [0, 1].
            Any height and width.
        seed: int32 or int64 tensor `[2]`, the stateless seed of this view.
        image_size: side of the square output, in pixels.
        config: the augmentation strengths and probabilities.

    Returns:
        float32 tensor `[image_size, image_size, 3]` in [0, 1].

    Raises:
        ValueError: if `image_size` or a field of `config` is invalid.
    """
    _check_image_size(image_size)
    config.validate()
    image = tf.convert_to_tensor(image)
    if image.dtype.is_integer:
        image = tf.cast(image, tf.float32) / 255.0
    else:
        image = tf.cast(image, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, num=_NUM_SEEDS)

    image = _random_resized_crop(image, seeds[_SEED_CROP], image_size, config)
    image = tf.clip_by_value(image, 0.0, 1.0)
    image.set_shape([image_size, image_size, 3])

    if config.color_jitter_enabled:
        image = _apply_with_probability(
            lambda x: _color_jitter(x, seeds, config),
            image,
            config.color_jitter_prob,
            seeds[_SEED_JITTER_GATE],
        )
    image = _apply_with_probability(
        _grayscale, image, config.grayscale_prob, seeds[_SEED_GRAYSCALE_GATE]
    )
    image = _apply_with_probability(
        lambda x: _gaussian_blur(x, seeds[_SEED_BLUR_SIGMA], config),
        image,
        config.blur_prob,
        seeds[_SEED_BLUR_GATE],
    )
    image = _apply_with_probability(
        tf.image.flip_left_right, image, config.flip_prob, seeds[_SEED_FLIP_GATE]
    )
    image.set_shape([image_size, image_size, 3])
    return image


def _images_only(images_dataset: tf.data.Dataset) -> tf.data.Dataset:
    if isinstance(images_dataset.element_spec, tuple):
        return images_dataset.map(lambda image, *rest: image)
    return images_dataset


def two_view_dataset(
    images_dataset: tf.data.Dataset,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    config: AugmentConfig,
    seed: int,
    shuffle: bool = True,
    shuffle_buffer: Optional[int] = None,
    cache: bool = True,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Builds the pretraining pipeline: two independent augmented views of each image.

    Steps: cache the decoded images in memory, shuffle (a new order each epoch), draw two
    views per image, normalize, batch, prefetch. Every epoch draws new views, and
    building the pipeline again with the same `seed` replays the same epochs.

    NOTE: A run resumed from a checkpoint rebuilds the pipeline, so with the same `seed`
    it repeats the shuffle orders and views of the first epochs. Pass a seed that
    depends on the starting epoch to continue with new ones.

    Args:
        images_dataset: dataset of uint8 images `[height, width, 3]`, or of
            `(image, label, ...)` tuples whose labels are dropped.
        image_size: side of the square views, in pixels.
        mean: per-channel mean in [0, 1] units, 3 floats.
        std: per-channel standard deviation in [0, 1] units, 3 floats.
        batch_size: images per batch.
        config: the augmentation strengths and probabilities.
        seed: integer seed of the shuffle order and of the views.
        shuffle: whether to shuffle the images each epoch.
        shuffle_buffer: shuffle buffer size. None uses the whole dataset when its size
            is known, else `DEFAULT_SHUFFLE_BUFFER`.
        cache: whether to cache the images in memory after the first epoch.
        drop_remainder: whether to drop the last partial batch, which keeps the batch
            dimension static.

    Returns:
        Dataset of `(view_q, view_k)`, each float32 `[batch_size, image_size,
        image_size, 3]`, normalized. The batch dimension is None when `drop_remainder`
        is False.

    Raises:
        ValueError: if an argument is invalid, or if `drop_remainder` would drop every
            image because the dataset is smaller than `batch_size`.
    """
    _check_image_size(image_size)
    _check_mean_std(mean, std)
    config.validate()
    _check_batch_size(batch_size)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if shuffle_buffer is not None and (not _is_int(shuffle_buffer) or shuffle_buffer < 1):
        raise ValueError(
            f"shuffle_buffer must be a positive integer or None, got {shuffle_buffer!r}."
        )

    images = _images_only(images_dataset)
    num_images = int(images.cardinality())
    if drop_remainder and 0 <= num_images < batch_size:
        raise ValueError(
            f"The dataset has {num_images} images, fewer than batch_size={batch_size}, so "
            "dropping the last partial batch leaves no batches. Lower batch_size or pass "
            "drop_remainder=False."
        )
    if cache:
        images = images.cache()

    # Independent streams for the shuffle order and the views, derived from one seed.
    shuffle_seed, view_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    if shuffle:
        if shuffle_buffer is None and num_images > 0:
            shuffle_buffer = num_images
        elif shuffle_buffer is None:
            shuffle_buffer = DEFAULT_SHUFFLE_BUFFER
            logger.info(
                "Dataset size is unknown, so the shuffle buffer contains %d images.", shuffle_buffer
            )
        images = images.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)

    # Pairs of random int64 values serve as per-image seeds, new ones each epoch.
    element_seeds = tf.data.Dataset.random(seed=view_seed, rerandomize_each_iteration=True).batch(2)

    def make_views(image, element_seed):
        seed_q, seed_k = tf.unstack(tf.random.experimental.stateless_split(element_seed, num=2))
        view_q = normalize(augment_image(image, seed_q, image_size, config), mean, std)
        view_k = normalize(augment_image(image, seed_k, image_size, config), mean, std)
        return view_q, view_k

    views = tf.data.Dataset.zip((images, element_seeds))
    views = views.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    views = views.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    # Under a multi-worker strategy each worker keeps every N-th batch. AUTO would pick
    # FILE sharding for TFRecord-backed TFDS splits, which fails with fewer files than workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return views.prefetch(tf.data.AUTOTUNE).with_options(options)


def eval_dataset(
    images_dataset: tf.data.Dataset,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
) -> tf.data.Dataset:
    """Builds an evaluation pipeline: resize and normalize, no augmentation, no shuffle.

    Args:
        images_dataset: dataset of `(image, label)` with uint8 images
            `[height, width, 3]` of any size, or of images only.
        image_size: side of the square output images, in pixels.
        mean: per-channel mean in [0, 1] units, 3 floats.
        std: per-channel standard deviation in [0, 1] units, 3 floats.
        batch_size: images per batch. The last batch keeps the remainder.

    Returns:
        Dataset of `(images, labels)`: float32 `[batch, image_size, image_size, 3]`
        normalized, and the labels unchanged `[batch]`. When the input has no labels,
        the dataset yields the images alone.
    """
    _check_image_size(image_size)
    _check_mean_std(mean, std)
    _check_batch_size(batch_size)

    def preprocess(image):
        # Resizing each image before batching allows inputs of mixed sizes.
        image = resize_and_normalize(image[tf.newaxis], image_size, mean, std)[0]
        image.set_shape([image_size, image_size, 3])
        return image

    if isinstance(images_dataset.element_spec, tuple):
        dataset = images_dataset.map(
            lambda image, label: (preprocess(image), label), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        dataset = images_dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
