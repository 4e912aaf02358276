"""Helpers that MixCo on MoCo-v2 and on SimCLR share: in-graph mixing and view unpacking."""

import keras
import tensorflow as tf


def mix_halves(images, seed=None, lam=None):
    """Mixes the first half of a batch with the second half, with weights from U(0, 1).

    The models call this with their seed generator (`MixCo` with its per-replica `lam`).
    The augmentation preview and the TensorBoard image summary call it with their own
    seed, so they show the same mixing without drawing from the model's random state.

    Args:
        images: float `[batch, height, width, 3]`, batch even.
        seed: a `keras.random.SeedGenerator`, an integer for a fixed draw, or None.
        lam: float `[batch / 2]` mixing weights to use instead of drawing them.

    Returns:
        `(mixed, lam)`: mixed images `[batch / 2, height, width, 3]` with
        `mixed[i] = lam[i] * images[i] + (1 - lam[i]) * images[i + batch / 2]`, and
        float32 `lam` `[batch / 2]`.
    """
    half = tf.shape(images)[0] // 2
    if lam is None:
        lam = keras.random.uniform([half], seed=seed)
    first, second = images[:half], images[half:]
    weights = tf.cast(tf.reshape(lam, [-1, 1, 1, 1]), images.dtype)
    mixed = weights * first + (1.0 - weights) * second
    return mixed, lam


def unpack_views(data, model_name):
    """Returns `(view_1, view_2)` from a dataset element `(view_1, view_2)` or Keras's `((v1, v2),)`.

    Raises:
        ValueError: naming `model_name` when the element is not a pair of views.
    """
    if isinstance(data, (tuple, list)) and len(data) == 1:
        data = data[0]
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(
            f"{model_name}.fit expects a dataset of (view_q, view_k) pairs, two augmented views of "
            f"the same images; got an element of type {type(data).__name__}. Use "
            "mixco_tf.augment.two_view_dataset to build one."
        )
    return data[0], data[1]
