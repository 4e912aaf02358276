"""Callbacks that record what the plots and TensorBoard show besides Keras's metrics.

- `LearningRateLogger` adds the optimizer's learning rate to the epoch logs, so
  `CSVLogger` writes it to history.csv. Keras's `TensorBoard` callback already writes
  it as `epoch_learning_rate`.
- `MixedImageSummary` writes, once per epoch, an image summary of mixed training inputs
  drawn with the training augmentation and mixing function.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from mixco_tf.preview import PreviewSampler

# Nearest-neighbour upscaling of the summary images: 16-pixel views are too small to
# see at TensorBoard's native size.
MIN_DISPLAY_SIDE = 64


class LearningRateLogger(keras.callbacks.Callback):
    """Adds `learning_rate` to the logs at the end of each epoch.

    The value is the optimizer's current learning rate, which with a schedule is the
    rate of the next step. Place it before `CSVLogger` in the callback list, because
    callbacks receive the same logs dict in list order.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class MixedImageSummary(keras.callbacks.Callback):
    """Writes an image summary `mixed_inputs` of mixed training pairs at each epoch end.

    Each summary image is one pair: query view i, query view j and the mixed image
    `lam * i + (1 - lam) * j`, side by side. The description lists each image's `lam`.
    The views are new each epoch and the images are fixed, see `PreviewSampler`.

    Args:
        log_dir: folder of the summary event files, e.g. `MODEL_DIR/logs/mixed_inputs`.
        sampler: a `mixco_tf.preview.PreviewSampler`.
        seed: base seed of `lam`; epoch e uses `seed + e`.
    """

    def __init__(self, log_dir, sampler: PreviewSampler, seed=0):
        super().__init__()
        self.log_dir = log_dir
        self.sampler = sampler
        self.seed = seed
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        batch = self.sampler.sample(mix_seed=self.seed + epoch)
        triplets = pair_strips(batch)
        description = ", ".join(f"pair {i}: lam = {lam:.3f}" for i, lam in enumerate(batch.lam))
        with self._writer.as_default():
            tf.summary.image(
                "mixed_inputs",
                triplets,
                step=epoch,
                max_outputs=len(triplets),
                description="Query view i | query view j | mixed image, " + description,
            )
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def pair_strips(batch):
    """Places query view i, query view j and their mixed image side by side.

    Args:
        batch: a `mixco_tf.preview.PreviewBatch` with views of side `s`.

    Returns:
        float32 `[num_pairs, side, 3 * side, 3]` in [0, 1], where `side` is `s` times
        the smallest integer factor that makes it at least `MIN_DISPLAY_SIDE`.
    """
    num_pairs = batch.num_pairs
    strips = np.concatenate(
        [batch.view_q[:num_pairs], batch.view_q[num_pairs:], batch.mixed], axis=2
    )
    side = strips.shape[1]
    factor = max(1, -(-MIN_DISPLAY_SIDE // side))
    return strips.repeat(factor, axis=1).repeat(factor, axis=2)


def mixed_image_log_dir(model_dir):
    """Returns the TensorBoard folder of the mixed-input images of a run."""
    return os.path.join(model_dir, "logs", "mixed_inputs")
