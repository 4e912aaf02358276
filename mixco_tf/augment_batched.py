"""MoCo-v2 views drawn on the accelerator: batched, with per-sample random parameters.

`mixco_tf.augment` draws each view in tf.data, one image at a time, on the host CPU.
This module draws the views of a whole batch inside the compiled train step, so a GPU
or TPU does the work. Every transform takes a vector of per-sample parameters:

1. random resized crop: one box per sample, bilinear resampling,
2. color jitter with probability `color_jitter_prob`: brightness factor, contrast,
   saturation, hue,
3. grayscale with probability `grayscale_prob`,
4. Gaussian blur with probability `blur_prob`, one sigma per sample, reflect padding,
5. horizontal flip with probability `flip_prob`.

`draw_parameters` draws the parameters from a stateless seed and `apply_parameters`
applies them. Tests can therefore fix them, and with several replicas every replica
draws the parameters of the global batch and applies its own slice (`draw_two_views`).
The transforms, strengths and probabilities are those of
`augment.augment_image` (`AugmentConfig`), with these differences:

- Crop sampler: torchvision's. The area fraction is uniform in `crop_scale` and the
  aspect ratio is log-uniform in `crop_ratio`. Boxes are continuous, not whole pixels.
  Each sample gets `CROP_ATTEMPTS` tries, and a sample whose tries all give a box
  larger than the image keeps the whole image (torchvision: a center crop).
  `augment.augment_image` uses TensorFlow's sampler, whose aspect ratio is uniform.
- Crop resampling: antialiased bilinear, as `augment_image`'s resize of the crop, but
  pixels just outside a box contribute to its border pixels (see `resized_crops`).
- Saturation and hue share one RGB -> HSV -> RGB round trip, with no clipping of the
  RGB values between them (both keep values in [0, 1]).

As in `augment.augment_image`, contrast blends each channel with that channel's mean,
as `tf.image.adjust_contrast` does, and the jitter order is fixed.
"""

import dataclasses
import math
from typing import Sequence

import keras
import tensorflow as tf

from mixco_tf import distribute
from mixco_tf.augment import AugmentConfig, blur_kernel_size
from mixco_tf.preprocess import normalize

# Boxes drawn per sample before the crop falls back to the whole image. torchvision
# also tries 10 times.
CROP_ATTEMPTS = 10

# Each parameter has its own row of the split seed, so disabling one transform does
# not change the draws of the others.
_SEED_CROP_AREA = 0
_SEED_CROP_RATIO = 1
_SEED_CROP_OFFSET = 2
_SEED_JITTER_GATE = 3
_SEED_BRIGHTNESS = 4
_SEED_CONTRAST = 5
_SEED_SATURATION = 6
_SEED_HUE = 7
_SEED_GRAYSCALE_GATE = 8
_SEED_BLUR_GATE = 9
_SEED_BLUR_SIGMA = 10
_SEED_FLIP_GATE = 11
_NUM_SEEDS = 12

# ITU-R 601 luma weights, the ones `tf.image.rgb_to_grayscale` uses.
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def draw_parameters(seed, num_samples: int, source_shape, config: AugmentConfig) -> dict:
    """Draws the random parameters of `num_samples` views, independent per sample.

    Args:
        seed: int32 or int64 tensor `[2]`, the stateless seed.
        num_samples: number of views, a Python int or a scalar int32 tensor.
        source_shape: `(height, width)` of the images the views are cropped from.
        config: the augmentation strengths and probabilities.

    Returns:
        dict of float32 or bool tensors, each `[num_samples]`, or `[num_samples, 4]`
        for "crop_box":
            crop_box: `(y_min, x_min, y_max, x_max)` in fractions of the source,
            jitter: bool, whether the color jitter applies,
            brightness, contrast, saturation: jitter factors,
            hue: hue shift in turns of the hue circle,
            grayscale, blur, flip: bool gates,
            blur_sigma: blur standard deviation in pixels of the output view.
    """
    config.validate()
    seeds = tf.random.experimental.stateless_split(seed, num=_NUM_SEEDS)
    parameters = {"crop_box": _draw_crop_boxes(seeds, num_samples, source_shape, config)}

    def uniform(row, low=0.0, high=1.0):
        return tf.random.stateless_uniform([num_samples], seed=seeds[row], minval=low, maxval=high)

    def factor(row, strength):
        return uniform(row, max(0.0, 1.0 - strength), 1.0 + strength)

    parameters["jitter"] = uniform(_SEED_JITTER_GATE) < config.color_jitter_prob
    parameters["brightness"] = factor(_SEED_BRIGHTNESS, config.brightness)
    parameters["contrast"] = factor(_SEED_CONTRAST, config.contrast)
    parameters["saturation"] = factor(_SEED_SATURATION, config.saturation)
    parameters["hue"] = uniform(_SEED_HUE, -config.hue, config.hue)
    parameters["grayscale"] = uniform(_SEED_GRAYSCALE_GATE) < config.grayscale_prob
    parameters["blur"] = uniform(_SEED_BLUR_GATE) < config.blur_prob
    parameters["blur_sigma"] = uniform(_SEED_BLUR_SIGMA, *config.blur_sigma)
    parameters["flip"] = uniform(_SEED_FLIP_GATE) < config.flip_prob
    return parameters


def _draw_crop_boxes(seeds, num_samples, source_shape, config):
    """Draws torchvision's RandomResizedCrop boxes, `[num_samples, 4]` in fractions."""
    height, width = (float(side) for side in source_shape)
    shape = [num_samples, CROP_ATTEMPTS]
    area = tf.random.stateless_uniform(shape, seeds[_SEED_CROP_AREA], *config.crop_scale)
    log_ratio = tf.random.stateless_uniform(
        shape, seeds[_SEED_CROP_RATIO], math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    )
    ratio = tf.exp(log_ratio)  # width / height in pixels
    # A box of `area * height * width` pixels with aspect ratio `ratio`, in fractions.
    box_width = tf.sqrt(area * ratio * height / width)
    box_height = tf.sqrt(area / ratio * width / height)

    fits = (box_width <= 1.0) & (box_height <= 1.0)
    # Each sample takes its first attempt that fits, or the whole image if none fits.
    any_fits = tf.reduce_any(fits, axis=1)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    box_width = tf.where(any_fits, tf.gather(box_width, first, batch_dims=1), 1.0)
    box_height = tf.where(any_fits, tf.gather(box_height, first, batch_dims=1), 1.0)

    offsets = tf.random.stateless_uniform([num_samples, 2], seeds[_SEED_CROP_OFFSET])
    y_min = offsets[:, 0] * (1.0 - box_height)
    x_min = offsets[:, 1] * (1.0 - box_width)
    return tf.stack([y_min, x_min, y_min + box_height, x_min + box_width], axis=1)


def _to_float_images(images):
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"On-device augmentation expects a batch of RGB images [batch, height, width, 3], "
            f"got shape {images.shape}. Batch the images, and convert grayscale ones to RGB."
        )
    if images.dtype.is_integer:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def resized_crops(images, boxes, image_size: int):
    """Crops one box per image and resizes it to `image_size`: antialiased bilinear.

    Each output pixel is a weighted mean of source pixels with the triangle (bilinear)
    filter, widened by the downscale factor when the box is larger than the output, as
    `tf.image.resize(..., "bilinear", antialias=True)` and PIL compute it. Output pixel
    `i` of a box from `y0` to `y1` (fractions of the height `H`) is centered at
    `y0 * H + (i + 0.5) * (y1 - y0) * H / image_size` in pixel units, where source
    pixel `j` is centered at `j + 0.5`. Columns likewise. Unlike resizing a cut-out crop,
    this gives weight to pixels just outside the box too. At the image border the
    filter is truncated and renormalized.

    The resampling is two batched matrix products, which XLA compiles (TPUs,
    `jit_compile`). TensorFlow 2.21 has no XLA kernel for `tf.image.crop_and_resize`
    or for the antialiased `tf.image.resize`.

    Args:
        images: float32 `[batch, height, width, 3]`.
        boxes: float32 `[batch, 4]`, `(y_min, x_min, y_max, x_max)` in fractions of the
            source, inside `[0, 1]`.
        image_size: side of the square output, in pixels.

    Returns:
        float32 `[batch, image_size, image_size, 3]`.
    """
    height, width = images.shape[1], images.shape[2]
    row_weights = resampling_weights(boxes[:, 0], boxes[:, 2], height, image_size)
    column_weights = resampling_weights(boxes[:, 1], boxes[:, 3], width, image_size)
    rows = tf.einsum("bih,bhwc->biwc", row_weights, images)  # [batch, size, width, 3]
    return tf.einsum("bjw,biwc->bijc", column_weights, rows)  # [batch, size, size, 3]


def resampling_weights(start, end, side: int, size: int):
    """Returns the `[batch, size, side]` weights of `resized_crops` along one axis.

    Args:
        start: float32 `[batch]`, where each box begins, as a fraction of `side`.
        end: float32 `[batch]`, where each box ends, as a fraction of `side`.
        side: source pixels along the axis.
        size: output pixels along the axis.
    """
    scale = (end - start) * side / size  # source pixels per output pixel, [batch]
    kernel_width = tf.maximum(scale, 1.0)
    output_centers = start[:, None] * side + (tf.range(size, dtype=tf.float32) + 0.5) * scale[:, None]
    source_centers = tf.range(side, dtype=tf.float32) + 0.5
    distance = (source_centers[None, None, :] - output_centers[:, :, None]) / kernel_width[:, None, None]
    weights = tf.maximum(0.0, 1.0 - tf.abs(distance))
    # Never zero: some source center lies within half a pixel of every output center.
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def _per_sample(values):
    """Reshapes `[batch]` parameters to `[batch, 1, 1, 1]` to broadcast over images."""
    return tf.reshape(values, [-1, 1, 1, 1])


def color_jitter(images, brightness, contrast, saturation, hue, config: AugmentConfig):
    """Applies brightness, contrast, saturation and hue, in that order, with per-sample values.

    Transforms whose strength in `config` is 0 are left out of the graph. The result is
    clipped to [0, 1] after each transform, as in `augment.augment_image`.

    Args:
        images: float32 `[batch, height, width, 3]` in [0, 1].
        brightness: `[batch]` factors: `x * brightness`.
        contrast: `[batch]` factors: `mean + (x - mean) * contrast`, with each channel's
            mean over the image, as `tf.image.adjust_contrast` computes it.
        saturation: `[batch]` factors multiplying S in HSV space, S clipped to [0, 1].
        hue: `[batch]` shifts of H in HSV space, in turns of the hue circle.
        config: the augmentation strengths.

    Returns:
        float32 `[batch, height, width, 3]` in [0, 1].
    """
    if config.brightness > 0:
        images = tf.clip_by_value(images * _per_sample(brightness), 0.0, 1.0)
    if config.contrast > 0:
        mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = tf.clip_by_value(mean + (images - mean) * _per_sample(contrast), 0.0, 1.0)
    if config.saturation > 0 or config.hue > 0:
        hsv = tf.image.rgb_to_hsv(images)
        hue_channel, saturation_channel, value_channel = tf.unstack(hsv, axis=-1)
        if config.saturation > 0:
            saturation_channel = tf.clip_by_value(
                saturation_channel * _per_sample(saturation)[..., 0], 0.0, 1.0
            )
        if config.hue > 0:
            hue_channel = tf.math.floormod(hue_channel + _per_sample(hue)[..., 0], 1.0)
        hsv = tf.stack([hue_channel, saturation_channel, value_channel], axis=-1)
        images = tf.clip_by_value(tf.image.hsv_to_rgb(hsv), 0.0, 1.0)
    return images


def grayscale(images):
    """Converts `[batch, height, width, 3]` RGB to gray, repeated over the 3 channels."""
    gray = tf.reduce_sum(images * tf.constant(_GRAY_WEIGHTS, images.dtype), axis=-1, keepdims=True)
    return tf.tile(gray, [1, 1, 1, 3])


def gaussian_blur(images, sigma):
    """Blurs each image with its own sigma: separable Gaussian, reflect padding.

    The kernel side is `augment.blur_kernel_size(width)` and the kernel is that of
    `keras.ops.image.gaussian_blur`, so each image equals `augment._gaussian_blur` of it
    with the same sigma.

    Args:
        images: float32 `[batch, height, width, 3]`, height and width at least
            `blur_kernel_size(width) // 2 + 1`.
        sigma: float32 `[batch]` standard deviations in pixels.

    Returns:
        float32 `[batch, height, width, 3]`.
    """
    height, width = images.shape[1], images.shape[2]
    kernel_size = blur_kernel_size(width)
    radius = kernel_size // 2
    taps = tf.range(kernel_size, dtype=tf.float32) - radius
    kernels = tf.exp(-0.5 * tf.square(taps[None, :] / sigma[:, None]))
    kernels = kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)  # [batch, kernel_size]

    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    # Images and channels become the channels of one image, so one depthwise
    # convolution applies every image's own kernel.
    batch = tf.shape(images)[0]
    stacked = tf.transpose(padded, [1, 2, 0, 3])
    stacked = tf.reshape(stacked, [1, height + 2 * radius, width + 2 * radius, batch * 3])
    channel_kernels = tf.reshape(tf.repeat(kernels, 3, axis=0), [batch * 3, kernel_size])
    channel_kernels = tf.transpose(channel_kernels)  # [kernel_size, batch * 3]
    vertical = tf.reshape(channel_kernels, [kernel_size, 1, batch * 3, 1])
    horizontal = tf.reshape(channel_kernels, [1, kernel_size, batch * 3, 1])
    blurred = tf.nn.depthwise_conv2d(stacked, vertical, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, horizontal, [1, 1, 1, 1], "VALID")
    blurred = tf.reshape(blurred, [height, width, batch, 3])
    return tf.transpose(blurred, [2, 0, 1, 3])


def apply_parameters(images, parameters: dict, image_size: int, config: AugmentConfig):
    """Applies per-sample parameters (the keys of `draw_parameters`) to a batch of images.

    Each gated transform runs on the whole batch, and `tf.where` keeps its result for
    the samples whose gate is on, so its cost does not depend on its probability.

    Args:
        images: uint8 `[batch, height, width, 3]` read as 0-255, or float in [0, 1].
        parameters: per-sample parameters `[batch]` (`crop_box`: `[batch, 4]`).
        image_size: side of the square output, in pixels.
        config: the augmentation strengths; a transform with probability or strength 0
            is left out of the graph.

    Returns:
        float32 `[batch, image_size, image_size, 3]` in [0, 1], not normalized.
    """
    images = _to_float_images(images)
    views = tf.clip_by_value(resized_crops(images, parameters["crop_box"], image_size), 0.0, 1.0)

    def where(gate, transformed, original):
        return tf.where(_per_sample(gate), transformed, original)

    if config.color_jitter_enabled:
        jittered = color_jitter(
            views,
            parameters["brightness"],
            parameters["contrast"],
            parameters["saturation"],
            parameters["hue"],
            config,
        )
        views = where(parameters["jitter"], jittered, views)
    if config.grayscale_prob > 0:
        views = where(parameters["grayscale"], grayscale(views), views)
    if config.blur_prob > 0:
        views = where(parameters["blur"], gaussian_blur(views, parameters["blur_sigma"]), views)
    if config.flip_prob > 0:
        views = where(parameters["flip"], tf.reverse(views, axis=[2]), views)
    return views


def augment_batch(images, seed, image_size: int, config: AugmentConfig):
    """Draws one MoCo-v2 view of each image of a batch, with per-sample random parameters.

    The same `images`, `seed` and `config` always give the same views.

    Args:
        images: uint8 `[batch, height, width, 3]` read as 0-255, or float in [0, 1].
            Height and width must be static.
        seed: int32 or int64 tensor `[2]`, the stateless seed of the batch.
        image_size: side of the square output, in pixels.
        config: the augmentation strengths and probabilities.

    Returns:
        float32 `[batch, image_size, image_size, 3]` in [0, 1], not normalized.

    Raises:
        ValueError: for images that are not `[batch, height, width, 3]` or have an
            unknown height or width, or an invalid `image_size` or `config`.
    """
    images = _to_float_images(images)
    _check_static_source(images, image_size)
    parameters = draw_parameters(seed, tf.shape(images)[0], images.shape[1:3], config)
    return apply_parameters(images, parameters, image_size, config)


def _check_static_source(images, image_size):
    if images.shape[1] is None or images.shape[2] is None:
        raise ValueError(
            f"On-device augmentation needs a static image height and width, got shape "
            f"{images.shape}. Resize the images to one square size in the input pipeline."
        )
    if not isinstance(image_size, int) or image_size < 2:
        raise ValueError(f"image_size must be an integer >= 2, got {image_size!r}.")


def draw_two_views(
    images,
    seed_generator: keras.random.SeedGenerator,
    *,
    image_size: int,
    config: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
):
    """Draws the two normalized views of a train step from a batch of images.

    Runs per replica. All replicas hold the same generator state, so each draws the
    parameters of the global batch and keeps its own slice: the views differ across
    replicas, and the global batch's views do not depend on the number of replicas.

    Args:
        images: this replica's images, uint8 `[batch, height, width, 3]` or float in
            [0, 1], with a static shape.
        seed_generator: the model's generator; one seed is drawn from it per call.
        image_size: side of the square views, in pixels.
        config: the augmentation strengths and probabilities.
        mean: per-channel mean in [0, 1] units, 3 floats.
        std: per-channel standard deviation in [0, 1] units, 3 floats.

    Returns:
        `(view_q, view_k)`, each float32 `[batch, image_size, image_size, 3]`, normalized.
    """
    images = _to_float_images(images)
    _check_static_source(images, image_size)
    batch_size = images.shape[0]
    if batch_size is None:
        raise ValueError(
            "On-device augmentation needs a static batch size: batch the dataset with "
            "drop_remainder=True."
        )
    replica_id, num_replicas = distribute.replica_position()
    seed = keras.random.randint([2], 0, 2**31 - 1, seed=seed_generator, dtype="int32")
    seed_q, seed_k = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))

    views = []
    for view_seed in (seed_q, seed_k):
        parameters = draw_parameters(view_seed, num_replicas * batch_size, images.shape[1:3], config)
        if num_replicas > 1:
            parameters = {
                name: distribute.local_slice(values, replica_id, batch_size)
                for name, values in parameters.items()
            }
        view = apply_parameters(images, parameters, image_size, config)
        views.append(normalize(view, mean, std))
    return views[0], views[1]


def image_batches(
    images_dataset: tf.data.Dataset,
    *,
    source_size: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    cache: bool = True,
) -> tf.data.Dataset:
    """Builds the input pipeline of on-device augmentation: batches of plain images.

    Steps: cache the images in memory, shuffle (a new order each epoch), resize each to
    a `source_size` square when it has another size, batch with `drop_remainder=True`,
    prefetch.

    NOTE: resizing to a square changes the aspect ratio of non-square images, which the
    crops of `augment.two_view_dataset` keep. The fixed-size data sets (digits, CIFAR,
    Tiny ImageNet) are square already.

    Args:
        images_dataset: dataset of uint8 images `[height, width, 3]`, or of
            `(image, label, ...)` tuples whose labels are dropped.
        source_size: side of the square images in the batches, in pixels.
        batch_size: images per batch.
        seed: integer seed of the shuffle order.
        shuffle: whether to shuffle the images each epoch.
        cache: whether to cache the images in memory after the first epoch.

    Returns:
        Dataset of uint8 `[batch_size, source_size, source_size, 3]`.
    """
    if isinstance(images_dataset.element_spec, tuple):
        images_dataset = images_dataset.map(lambda image, *rest: image)
    num_images = int(images_dataset.cardinality())
    if 0 <= num_images < batch_size:
        raise ValueError(
            f"The dataset has {num_images} images, fewer than batch_size={batch_size}, so "
            "no full batch remains. Lower batch_size."
        )
    spec_shape = images_dataset.element_spec.shape
    if tuple(spec_shape[:2]) != (source_size, source_size):

        def to_square(image):
            resized = tf.image.resize(image, (source_size, source_size), method="bilinear", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

        images_dataset = images_dataset.map(to_square, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        images_dataset = images_dataset.cache()
    if shuffle:
        buffer_size = num_images if num_images > 0 else 10_000
        images_dataset = images_dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    batches = images_dataset.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    # As in augment.two_view_dataset: each worker of a multi-worker strategy keeps every
    # N-th batch, because FILE sharding fails with fewer files than workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)



@dataclasses.dataclass(frozen=True)
class OnDeviceAugmentation:
    """The settings with which a model's train step draws its two views itself.

    Attributes:
        config: the augmentation strengths and probabilities.
        image_size: side of the square views, in pixels.
        mean: per-channel mean of the data in [0, 1] units, 3 floats.
        std: per-channel standard deviation of the data in [0, 1] units, 3 floats.
    """

    config: AugmentConfig
    image_size: int
    mean: tuple
    std: tuple

    @classmethod
    def from_arguments(cls, augmentation, image_size, mean, std, model_name):
        """Returns the settings of a model's constructor arguments, or None without `augmentation`.

        Args:
            augmentation: None, an `AugmentConfig`, or its fields as a dict (the form
                `get_config` stores).
            image_size: side of the square views, in pixels.
            mean: per-channel mean, 3 floats.
            std: per-channel standard deviation, 3 positive floats.
            model_name: the model's class name, for error messages.

        Raises:
            ValueError: naming the invalid argument.
        """
        if augmentation is None:
            return None
        if isinstance(augmentation, dict):
            augmentation = AugmentConfig(**augmentation)
        if not isinstance(augmentation, AugmentConfig):
            raise ValueError(
                f"{model_name}(augmentation=...) must be None, a mixco_tf.AugmentConfig or "
                f"a dict of its fields, got {type(augmentation).__name__}."
            )
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 2:
            raise ValueError(
                f"{model_name}(augmentation=...) needs image_size, the side of the views in "
                f"pixels, as an integer >= 2; got image_size={image_size!r}."
            )
        for name, values in (("mean", mean), ("std", std)):
            if values is None or len(values) != 3:
                raise ValueError(
                    f"{model_name}(augmentation=...) needs {name} as 3 floats (R, G, B) in "
                    f"[0, 1] units, the data's per-channel {name}; got {name}={values!r}."
                )
        if any(value <= 0 for value in std):
            raise ValueError(f"{model_name}: std must be positive in every channel, got std={std!r}.")
        return cls(augmentation, image_size, tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def get_config(self) -> dict:
        """Returns the constructor arguments that rebuild these settings (JSON-friendly)."""
        return {
            "augmentation": dataclasses.asdict(self.config),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def draw_views(self, data, seed_generator, model_name):
        """Draws `(view_q, view_k)` of a train step's batch; see `draw_two_views`.

        Args:
            data: what `fit` passes to `train_step`: images `[batch, height, width, 3]`
                (uint8 or float in [0, 1]), `(images,)`, or `(images, labels)`.
            seed_generator: the model's `keras.random.SeedGenerator`.
            model_name: the model's class name, for error messages.
        """
        images = unpack_images(data, model_name)
        return draw_two_views(
            images,
            seed_generator,
            image_size=self.image_size,
            config=self.config,
            mean=self.mean,
            std=self.std,
        )


def unpack_images(data, model_name):
    """Returns the images of a batch `images`, `(images,)` or `(images, labels)`.

    Raises:
        ValueError: naming `model_name` for a pair of image batches (views drawn by the
            input pipeline) or an element of another form.
    """
    if isinstance(data, (tuple, list)):
        if len(data) == 2 and getattr(data[1], "shape", None) is not None and data[1].shape.rank == 4:
            raise ValueError(
                f"{model_name} was built with augmentation=..., so it draws the two views "
                "itself, but the dataset yields pairs of image batches. Pass a dataset of "
                "plain images (augment_batched.image_batches), or build the model without "
                "augmentation."
            )
        if len(data) not in (1, 2):
            raise ValueError(
                f"{model_name}.fit with augmentation expects batches of images or "
                f"(images, labels); got a tuple of {len(data)} elements."
            )
        data = data[0]
    return data
