"""Contrastive losses of MoCo-v2, SimCLR and MixCo as pure functions on tensors.

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


def nt_xent(z1, z2, temperature):
    """Computes SimCLR's NT-Xent loss over the 2N projections of two views.

    Every one of the 2N projections is an anchor. Its positive is the projection of the
    other view of the same image, and its negatives are the other 2N - 2 projections of
    both views. The anchor itself is excluded from its softmax.

    Args:
        z1: projections of the first view, float `[batch, dim]`, L2-normalized.
        z2: projections of the second view, float `[batch, dim]`, L2-normalized; row i
            is the positive of `z1[i]`.
        temperature: softmax temperature (0.5 in SimCLR + MixCo).

    Returns:
        float32 scalar, the mean cross-entropy over the 2N anchors.
    """
    return nt_xent_from_logits(nt_xent_logits(z1, z2, temperature))


def nt_xent_from_logits(logits):
    """Computes NT-Xent from `nt_xent_logits` `[2N, 2N]`, for callers that also need the logits.

    Returns:
        float32 scalar, the mean over the 2N anchors.
    """
    targets = nt_xent_targets(tf.shape(logits)[0] // 2)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_mean(tf.gather(log_probs, targets, axis=1, batch_dims=1))


def nt_xent_logits(z1, z2, temperature):
    """Computes the `[2N, 2N]` similarity logits of `concat[z1, z2]`, self-similarity masked.

    The diagonal is set to -1e9 instead of -inf, so that `log_softmax` and its gradient
    stay finite while the anchor's own column gets zero probability.
    """
    z = tf.concat([_as_float32(z1), _as_float32(z2)], axis=0)
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    is_self = tf.eye(tf.shape(z)[0], dtype=tf.bool)
    return tf.where(is_self, tf.constant(-1e9, tf.float32), logits)


def nt_xent_targets(batch_size):
    """Returns the column of each anchor's positive in `nt_xent_logits`: int32 `[2N]`.

    Row i < N (first view) has its positive at column i + N, and row N + i at column i.
    """
    indices = tf.range(batch_size, dtype=tf.int32)
    return tf.concat([indices + batch_size, indices], axis=0)


def simclr_mix_contrast(z_mix1, z_mix2, z1, z2, lam1, lam2, temperature):
    """Computes MixCo's term on SimCLR: each view's mixed images against the other view.

    `z_mix1` are the projections of `lam1 * x1[:N/2] + (1 - lam1) * x1[N/2:]`, mixed from
    the first view, and are contrasted with the second view's projections `z2`; `z_mix2`
    likewise with `z1`. Each term is `mix_contrast` without a queue, and each view
    contributes half of the total, as in the authors' code.

    Args:
        z_mix1, z_mix2: projections of the mixed images of each view, float
            `[batch / 2, dim]`, L2-normalized.
        z1, z2: projections of the unmixed views, float `[batch, dim]`, L2-normalized.
        lam1, lam2: the mixing weights of each view, float `[batch / 2]` in [0, 1].
        temperature: softmax temperature T_mix (0.5 in SimCLR + MixCo).

    Returns:
        float32 scalar: `(mix_contrast(z_mix1, z2) + mix_contrast(z_mix2, z1)) / 2`.
    """
    first = mix_contrast(z_mix1, z2, None, lam1, temperature)
    second = mix_contrast(z_mix2, z1, None, lam2, temperature)
    return (first + second) / 2.0


def nan_unless_finite_gradients(loss, gradients):
    """Returns `loss`, or NaN when any gradient is NaN or infinite.

    A NaN input can leave the loss finite: oneDNN's fused MatMul + ReLU maps NaN to 0,
    so NaN features from the backbone reach the projection head as zeros. The
    gradients still carry the NaN, and the NaN guard watches the loss.

    Args:
        loss: float scalar.
        gradients: list of float tensors (None entries are skipped).
    """
    norm = tf.linalg.global_norm([g for g in gradients if g is not None])
    return tf.where(tf.math.is_finite(norm), loss, tf.constant(float("nan"), loss.dtype))
