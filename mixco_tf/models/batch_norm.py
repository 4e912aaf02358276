"""Split BatchNorm: the single-device stand-in for MoCo's Shuffle-BN.

A key encoder whose BatchNorm normalizes over the whole batch can "cheat": the batch statistics
leak which samples share a mini-batch, and the query/key pair finds its match through
them instead of through content. MoCo shuffles the keys across GPUs so each GPU's
statistics come from a different subset of the batch. On one device, normalizing each of
`num_splits` groups with its own statistics after a shuffle has the same effect.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="mixco_tf")
class SplitBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that computes training statistics per group of the batch.

    In training mode the batch is split into `num_splits` contiguous groups and each
    group is normalized with its own mean and variance. The moving statistics follow the
    mean of the group statistics. Inference mode is plain BatchNormalization, so the
    weights are interchangeable with `keras.layers.BatchNormalization`.

    Unlike the base class, training mode uses batch statistics even when the layer is
    frozen (`trainable=False`): a momentum key encoder is frozen for the optimizer but
    must still normalize with batch statistics, as MoCo's key encoder does.

    With `synchronized=True` (and `num_splits=1`) the statistics are those of the
    global batch: sums over every replica's batch, all-reduced in replica context.

    Args:
        num_splits: number of groups. The batch size must be divisible by it.
        **kwargs: passed to `keras.layers.BatchNormalization`. Only channels-last
            (`axis=-1`) is supported.

    Call arguments:
        inputs: float tensor `[batch, ..., channels]`.
        training: whether to normalize with batch statistics.
    """

    def __init__(self, num_splits=1, **kwargs):
        super().__init__(**kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be a positive integer, got {num_splits}.")
        if self.axis not in (-1,):
            raise ValueError(f"SplitBatchNormalization supports axis=-1 only, got axis={self.axis}.")
        if self.synchronized and num_splits != 1:
            raise ValueError(
                f"SplitBatchNormalization with synchronized=True normalizes over the global "
                f"batch, so num_splits must be 1; got num_splits={num_splits}."
            )
        self.num_splits = num_splits

    def call(self, inputs, training=None, mask=None):
        if not training:
            return super().call(inputs, training=False, mask=mask)

        batch_size = inputs.shape[0]
        if batch_size is not None and batch_size % self.num_splits:
            raise ValueError(
                f"{self.name}: batch size {batch_size} is not divisible by "
                f"num_splits={self.num_splits}. Choose a batch size that is a multiple of it."
            )

        x = tf.cast(inputs, tf.float32)
        shape = tf.shape(x)
        grouped = tf.reshape(x, tf.concat([[self.num_splits, -1], shape[1:]], axis=0))
        reduction_axes = list(range(1, len(inputs.shape)))
        if self.synchronized:
            mean, variance = keras.ops.moments(grouped, axes=reduction_axes, keepdims=True, synchronized=True)
        else:
            mean, variance = tf.nn.moments(grouped, axes=reduction_axes, keepdims=True)
        outputs = tf.nn.batch_normalization(
            grouped,
            mean,
            variance,
            offset=tf.cast(self.beta, tf.float32) if self.center else None,
            scale=tf.cast(self.gamma, tf.float32) if self.scale else None,
            variance_epsilon=self.epsilon,
        )

        # Moving statistics: the mean over groups of each group's statistics.
        channel_axes = list(range(len(inputs.shape)))
        group_mean = tf.reduce_mean(mean, axis=channel_axes)
        group_variance = tf.reduce_mean(variance, axis=channel_axes)
        self.moving_mean.assign(self.moving_mean * self.momentum + group_mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + group_variance * (1.0 - self.momentum)
        )
        return tf.cast(tf.reshape(outputs, shape), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "num_splits": self.num_splits}
