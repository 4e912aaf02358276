"""InfoNCE and the MixCo loss against independent NumPy computations."""

import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import losses


def _normalized(rng, rows, dim):
    values = rng.normal(size=(rows, dim))
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def numpy_info_nce(q, k, queue, temperature):
    """Cross-entropy of row i over [q_i . k_i, q_i . queue_j for all j] with class 0."""
    losses_per_row = []
    for i in range(len(q)):
        if queue is None:
            candidates = k
            target = i
        else:
            candidates = np.concatenate([k[i : i + 1], queue])
            target = 0
        logits = candidates @ q[i] / temperature
        logits = logits - logits.max()
        losses_per_row.append(-(logits[target] - np.log(np.exp(logits).sum())))
    return np.mean(losses_per_row)


def numpy_mix_contrast(q_mix, k, queue, lam, temperature):
    """Soft cross-entropy with lam at key i and 1 - lam at key i + B/2, zero on the queue."""
    half = len(q_mix)
    keys = k if queue is None else np.concatenate([k, queue])
    total = 0.0
    for i in range(half):
        logits = keys @ q_mix[i] / temperature
        log_probs = _log_softmax(logits[None])[0]
        total += -(lam[i] * log_probs[i] + (1 - lam[i]) * log_probs[i + half])
    return total / half


@pytest.mark.parametrize(
    "batch, queue_size, temperature",
    [(2, 0, 0.2), (8, 0, 0.2), (8, 5, 0.2), (6, 16, 0.07), (2, 3, 1.0)],
)
def test_info_nce_matches_numpy(batch, queue_size, temperature):
    rng = np.random.default_rng(batch * 100 + queue_size)
    q, k = _normalized(rng, batch, 16), _normalized(rng, batch, 16)
    queue = _normalized(rng, queue_size, 16) if queue_size else None

    loss = losses.info_nce(
        tf.constant(q, tf.float32),
        tf.constant(k, tf.float32),
        None if queue is None else tf.constant(queue, tf.float32),
        temperature,
    )

    assert loss.dtype == tf.float32
    assert loss.shape == ()
    np.testing.assert_allclose(loss.numpy(), numpy_info_nce(q, k, queue, temperature), rtol=1e-5, atol=1e-6)


def test_info_nce_perfect_match_is_small():
    rng = np.random.default_rng(0)
    q = _normalized(rng, 4, 8)
    queue = -np.repeat(q[:1], 10, axis=0)  # negatives point away from the first query

    loss_aligned = losses.info_nce(q, q, queue, 0.05).numpy()
    loss_random = losses.info_nce(q, _normalized(rng, 4, 8), queue, 0.05).numpy()

    assert loss_aligned < loss_random


@pytest.mark.parametrize(
    "batch, queue_size, lam_kind",
    [(2, 0, "random"), (2, 3, "random"), (8, 0, "zeros"), (8, 0, "ones"), (8, 7, "random"), (10, 12, "ones")],
)
def test_mix_contrast_matches_numpy(batch, queue_size, lam_kind):
    rng = np.random.default_rng(batch + queue_size)
    half = batch // 2
    q_mix, k = _normalized(rng, half, 16), _normalized(rng, batch, 16)
    queue = _normalized(rng, queue_size, 16) if queue_size else None
    lam = {"random": rng.uniform(size=half), "zeros": np.zeros(half), "ones": np.ones(half)}[lam_kind]

    loss = losses.mix_contrast(
        tf.constant(q_mix, tf.float32),
        tf.constant(k, tf.float32),
        None if queue is None else tf.constant(queue, tf.float32),
        tf.constant(lam, tf.float32),
        0.05,
    )

    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), numpy_mix_contrast(q_mix, k, queue, lam, 0.05), rtol=1e-5, atol=1e-5)


def test_mix_targets_layout():
    lam = np.array([0.3, 0.9, 0.0])

    targets = losses.mix_targets(tf.constant(lam, tf.float32), num_keys=6, queue_size=4).numpy()

    expected = np.zeros((3, 10))
    for i, weight in enumerate(lam):
        expected[i, i] = weight
        expected[i, i + 3] = 1 - weight
    np.testing.assert_allclose(targets, expected, atol=1e-7)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)


def test_mix_contrast_lam_one():
    """With lam = 1 every mixed image is its first source, so the loss is plain InfoNCE
    of those queries against all B keys (no queue) with the positive at column i."""
    rng = np.random.default_rng(3)
    k = _normalized(rng, 6, 8)
    q_mix = _normalized(rng, 3, 8)

    mixed = losses.mix_contrast(q_mix, k, None, np.ones(3, np.float32), 0.5).numpy()

    logits = q_mix @ k.T / 0.5
    expected = -np.mean(_log_softmax(logits)[np.arange(3), np.arange(3)])
    np.testing.assert_allclose(mixed, expected, rtol=1e-5)


def test_losses_are_float32_for_float16_inputs():
    """Low-precision embeddings at T_mix = 0.05 must not overflow: logits up to 20."""
    rng = np.random.default_rng(4)
    q = _normalized(rng, 4, 8)
    k = q.copy()
    queue = _normalized(rng, 6, 8)

    info = losses.info_nce(tf.constant(q, tf.float16), tf.constant(k, tf.float16), tf.constant(queue, tf.float16), 0.05)
    mix = losses.mix_contrast(
        tf.constant(q[:2], tf.float16), tf.constant(k, tf.float16), tf.constant(queue, tf.float16), np.full(2, 0.5), 0.05
    )

    assert info.dtype == tf.float32
    assert mix.dtype == tf.float32
    np.testing.assert_allclose(info.numpy(), numpy_info_nce(q, k, queue, 0.05), rtol=2e-2, atol=2e-3)
    assert np.isfinite(mix.numpy())


def test_moco_logits_positive_first_column():
    rng = np.random.default_rng(5)
    q, k, queue = _normalized(rng, 3, 4), _normalized(rng, 3, 4), _normalized(rng, 5, 4)

    logits = losses.moco_logits(q, k, queue, 0.2).numpy()

    assert logits.shape == (3, 6)
    np.testing.assert_allclose(logits[:, 0], np.sum(q * k, axis=1) / 0.2, rtol=1e-5)
    np.testing.assert_allclose(logits[:, 1:], q @ queue.T / 0.2, rtol=1e-5, atol=1e-6)


def numpy_nt_xent(z1, z2, temperature):
    """Each of the 2N projections against the 2N - 1 others; the other view's row is the class."""
    z = np.concatenate([z1, z2])
    n = len(z1)
    losses_per_anchor = []
    for anchor in range(2 * n):
        positive = (anchor + n) % (2 * n)
        others = [j for j in range(2 * n) if j != anchor]
        logits = np.array([z[anchor] @ z[j] for j in others]) / temperature
        log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        losses_per_anchor.append(-log_probs[others.index(positive)])
    return np.mean(losses_per_anchor)


def numpy_simclr_mix(z_mix1, z_mix2, z1, z2, lam1, lam2, temperature):
    """The authors' form: targets cat(diag(lam), diag(1 - lam)), softmax over the other view, / 2 per view."""
    total = 0.0
    for z_mix, z_other, lam in ((z_mix1, z2, lam1), (z_mix2, z1, lam2)):
        targets = np.concatenate([np.diag(lam), np.diag(1 - lam)], axis=1)
        logits = z_mix @ z_other.T / temperature
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        total += (-targets * np.log(probs)).sum(axis=1).mean() / 2
    return total


@pytest.mark.parametrize("batch, temperature", [(2, 0.5), (3, 0.5), (8, 0.5), (8, 0.1), (16, 1.0)])
def test_nt_xent_matches_numpy(batch, temperature):
    rng = np.random.default_rng(batch)
    z1, z2 = _normalized(rng, batch, 16), _normalized(rng, batch, 16)

    loss = losses.nt_xent(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32), temperature)

    assert loss.dtype == tf.float32
    assert loss.shape == ()
    np.testing.assert_allclose(loss.numpy(), numpy_nt_xent(z1, z2, temperature), rtol=1e-5, atol=1e-6)


def test_nt_xent_has_two_n_minus_two_negatives():
    """Identical views: every anchor's positive has similarity 1, and with orthogonal
    images each of the 2N - 2 negatives has similarity 0, so the loss is
    log(e^(1/T) + 2N - 2) - 1/T."""
    batch, temperature = 4, 0.5
    z = np.eye(batch, 8)

    loss = losses.nt_xent(z, z, temperature).numpy()

    expected = np.log(np.exp(1 / temperature) + 2 * batch - 2) - 1 / temperature
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_nt_xent_single_pair_is_zero():
    """With N = 1 each anchor's only candidate is its positive: 0 negatives, loss 0."""
    rng = np.random.default_rng(6)
    z1, z2 = _normalized(rng, 1, 8), _normalized(rng, 1, 8)

    np.testing.assert_allclose(losses.nt_xent(z1, z2, 0.5).numpy(), 0.0, atol=1e-6)


def test_nt_xent_gradient_is_finite():
    rng = np.random.default_rng(7)
    z1 = tf.Variable(_normalized(rng, 4, 8), dtype=tf.float32)
    z2 = tf.constant(_normalized(rng, 4, 8), tf.float32)

    with tf.GradientTape() as tape:
        loss = losses.nt_xent(z1, z2, 0.5)
    gradient = tape.gradient(loss, z1).numpy()

    assert np.all(np.isfinite(gradient))
    assert np.abs(gradient).max() > 0


def test_nt_xent_targets_pair_the_views():
    np.testing.assert_array_equal(losses.nt_xent_targets(3).numpy(), [3, 4, 5, 0, 1, 2])


@pytest.mark.parametrize("batch, lam_kind", [(2, "random"), (2, "ones"), (8, "random"), (8, "zeros"), (12, "random")])
def test_simclr_mix_contrast_matches_numpy(batch, lam_kind):
    rng = np.random.default_rng(batch + 50)
    half = batch // 2
    z1, z2 = _normalized(rng, batch, 16), _normalized(rng, batch, 16)
    z_mix1, z_mix2 = _normalized(rng, half, 16), _normalized(rng, half, 16)
    draw = {"random": lambda: rng.uniform(size=half), "zeros": lambda: np.zeros(half), "ones": lambda: np.ones(half)}
    lam1, lam2 = draw[lam_kind](), draw[lam_kind]()

    loss = losses.simclr_mix_contrast(
        *(tf.constant(array, tf.float32) for array in (z_mix1, z_mix2, z1, z2, lam1, lam2)), 0.5
    )

    assert loss.dtype == tf.float32
    expected = numpy_simclr_mix(z_mix1, z_mix2, z1, z2, lam1, lam2, 0.5)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_simclr_mix_contrast_contrasts_with_other_view():
    """Swapping which view the mixed projections are contrasted with changes the loss."""
    rng = np.random.default_rng(8)
    z1, z2 = _normalized(rng, 4, 8), _normalized(rng, 4, 8)
    z_mix1, z_mix2 = z2[:2], z1[:2]  # each mixed row equals its first source in the other view
    lam = np.ones(2, np.float32)

    matched = losses.simclr_mix_contrast(z_mix1, z_mix2, z1, z2, lam, lam, 0.5).numpy()
    swapped = losses.simclr_mix_contrast(z_mix1, z_mix2, z2, z1, lam, lam, 0.5).numpy()

    assert matched < swapped
