"""Image normalization shared by training, evaluation and the exported graph.

Every consumer of a backbone (the two-view training pipeline, feature extraction for
evaluation, the SavedModel's serving signature) turns uint8 images into the backbone's
float input with the functions below, so the three can never drift apart.
"""

import tensorflow as tf


def normalize(images, mean, std):
    """Scales images to [0, 1] and standardizes each channel.

    Args:
        images: uint8 or float tensor `[..., height, width, 3]`. Integer images are read
            as 0-255; float images must already be in [0, 1].
        mean: per-channel mean in [0, 1] units, 3 floats.
        std: per-channel standard deviation in [0, 1] units, 3 floats.

    Returns:
        float32 tensor of the same shape.
    """
    if images.dtype.is_integer:
        images = tf.cast(images, tf.float32) / 255.0
    else:
        images = tf.cast(images, tf.float32)
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (images - mean) / std


def resize_and_normalize(images, image_size, mean, std):
    """Resizes uint8 images of any size to `image_size` and normalizes them.

    Bilinear resizing with antialiasing, so downscaling a large photo does not alias.

    Args:
        images: uint8 tensor `[batch, height, width, 3]`, any height and width.
        image_size: side of the square output, in pixels.
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.

    Returns:
        float32 tensor `[batch, image_size, image_size, 3]`.
    """
    images = tf.cast(images, tf.float32) / 255.0
    images = tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)
    images = tf.clip_by_value(images, 0.0, 1.0)
    return normalize(images, mean, std)


def denormalize(images, mean, std):
    """Inverts `normalize` for display: float images in [0, 1], clipped.

    Mixing commutes with this map, because the per-channel affine map preserves convex
    combinations: `denormalize(lam * a + (1 - lam) * b)` equals
    `lam * denormalize(a) + (1 - lam) * denormalize(b)` before clipping.

    Args:
        images: float tensor or array `[..., height, width, 3]`, normalized.
        mean: per-channel mean in [0, 1] units, 3 floats.
        std: per-channel standard deviation in [0, 1] units, 3 floats.

    Returns:
        float32 tensor of the same shape, in [0, 1].
    """
    images = tf.cast(images, tf.float32)
    images = images * tf.constant(std, tf.float32) + tf.constant(mean, tf.float32)
    return tf.clip_by_value(images, 0.0, 1.0)
