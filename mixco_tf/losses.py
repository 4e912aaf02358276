"""Contrastive losses of MoCo-v2 and MixCo as pure functions on tensors.

All inputs are L2-normalized embeddings. Every loss casts its inputs to float32 and
works in log-space (`log_softmax`), so it stays accurate under a mixed-precision policy
and at the small mix temperature (0.05), where `exp(logits)` would overflow float16.
"""

import tensorflow as tf


def _as_float32(tensor):
    return None if tensor is None else tf.cast(tensor, tf.float32)


def moco_logits(q, k, queue, temperature):
    """Computes MoCo's logits: the positive key first, then the queue's negatives.

    Args:
        q: queries, float `[batch, dim]`, L2-normalized.
        k: keys of the same images, float `[batch, dim]`, L2-normalized.
        queue: negative keys, float `[queue_size, dim]`, or None for in-batch negatives.
        temperature: softmax temperature T.

    Returns:
        float32 logits. With a queue: `[batch, 1 + queue_size]`, positive in column 0.
        Without: `[batch, batch]`, `q @ k^T`, positive on the diagonal.
    """
    q, k, queue = _as_float32(q), _as_float32(k), _as_float32(queue)
    if queue is None:
        return tf.matmul(q, k, transpose_b=True) / temperature
    positive = tf.reduce_sum(q * k, axis=-1, keepdims=True)
    # transpose_b multiplies by queue^T without materializing the transpose.
    negatives = tf.matmul(q, queue, transpose_b=True)
    return tf.concat([positive, negatives], axis=-1) / temperature


def moco_targets(logits, queue_is_none):
    """Returns the index of the positive in each row of `moco_logits`: int32 `[batch]`."""
    batch_size = tf.shape(logits)[0]
    if queue_is_none:
        return tf.range(batch_size, dtype=tf.int32)
    return tf.zeros([batch_size], dtype=tf.int32)


def info_nce(q, k, queue, temperature):
    """Computes MoCo's InfoNCE loss: cross-entropy with the own key as the class.

    Args:
        q: queries, float `[batch, dim]`, L2-normalized.
        k: keys, float `[batch, dim]`, L2-normalized; row i is the positive of `q[i]`.
        queue: negatives, float `[queue_size, dim]`, L2-normalized, or None. With None,
            the other keys of the batch are the negatives (targets on the diagonal).
        temperature: softmax temperature T (0.2 in MoCo-v2).

    Returns:
        float32 scalar, the mean over the batch.
    """
    return info_nce_from_logits(moco_logits(q, k, queue, temperature), queue is None)


def info_nce_from_logits(logits, queue_is_none):
    """Computes InfoNCE from `moco_logits`, for callers that also need the logits.

    Args:
        logits: float32 output of `moco_logits`.
        queue_is_none: whether the logits were computed without a queue.

    Returns:
        float32 scalar, the mean over the batch.
    """
    targets = moco_targets(logits, queue_is_none)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    positive_log_probs = tf.gather(log_probs, targets, axis=1, batch_dims=1)
    return -tf.reduce_mean(positive_log_probs)


def mix_targets(lam, num_keys, queue_size=0):
    """Builds MixCo's soft targets for mixed queries.

    Row i mixes image i of the first half with image i of the second half, so its key
    targets are `lam[i]` at column i and `1 - lam[i]` at column `i + num_keys / 2`.
    Queue columns get zero.

    Args:
        lam: mixing weights, float `[num_keys / 2]`.
        num_keys: B, the number of keys (columns before the queue).
        queue_size: K, the number of queue columns appended with zero target.

    Returns:
        float32 `[num_keys / 2, num_keys + queue_size]`; each row sums to 1.
    """
    lam = tf.cast(lam, tf.float32)
    half = tf.shape(lam)[0]
    first = tf.one_hot(tf.range(half), num_keys + queue_size, dtype=tf.float32)
    second = tf.one_hot(tf.range(half) + half, num_keys + queue_size, dtype=tf.float32)
    return lam[:, None] * first + (1.0 - lam[:, None]) * second


def mix_contrast(q_mix, k, queue, lam, temperature):
    """Computes MixCo's loss: soft cross-entropy of mixed queries against all keys.

    Args:
        q_mix: queries of mixed images, float `[batch / 2, dim]`, L2-normalized.
            Row i is `lam[i] * x[i] + (1 - lam[i]) * x[i + batch / 2]`.
        k: keys of the unmixed images, float `[batch, dim]`, L2-normalized.
        queue: negatives, float `[queue_size, dim]`, or None for no queue.
        lam: mixing weights, float `[batch / 2]` in [0, 1].
        temperature: softmax temperature T_mix (0.05 in MixCo on MoCo-v2).

    Returns:
        float32 scalar: the mean over rows of `-sum(targets * log_softmax(logits))`.
    """
    q_mix, k, queue = _as_float32(q_mix), _as_float32(k), _as_float32(queue)
    logits = tf.matmul(q_mix, k, transpose_b=True)
    queue_size = 0
    if queue is not None:
        logits = tf.concat([logits, tf.matmul(q_mix, queue, transpose_b=True)], axis=-1)
        queue_size = tf.shape(queue)[0]
    logits = logits / temperature
    targets = mix_targets(lam, tf.shape(k)[0], queue_size)
    return -tf.reduce_mean(tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1))
