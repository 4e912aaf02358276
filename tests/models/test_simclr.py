"""The SimCLR train step: NT-Xent, the MixCo term per view, the beta = 0 path, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf.models import SimCLR

BATCH = 8
IMAGE = 16


def _model(**overrides):
    settings = dict(backbone="resnet18", stem="cifar", width_multiplier=0.0625, projection_dim=8, seed=3)
    settings.update(overrides)
    model = SimCLR(**settings)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _views(steps, seed=0):
    rng = np.random.default_rng(seed)
    view_1 = rng.normal(size=(steps * BATCH, IMAGE, IMAGE, 3)).astype("float32")
    view_2 = rng.normal(size=(steps * BATCH, IMAGE, IMAGE, 3)).astype("float32")
    return view_1, view_2


def _dataset(view_1, view_2):
    return tf.data.Dataset.from_tensor_slices((view_1, view_2)).batch(BATCH, drop_remainder=True)


def _record_encoded_batch_sizes(model, monkeypatch):
    """Wraps `model.encode` to record the batch size of each traced call."""
    batch_sizes = []
    encode = model.encode

    def recording_encode(images, training=True):
        batch_sizes.append(images.shape[0])
        return encode(images, training=training)

    monkeypatch.setattr(model, "encode", recording_encode)
    return batch_sizes


def _numpy_projections(model, images):
    """Projections of a model in training mode (batch statistics), L2-normalized, in NumPy."""
    projections = model.projection_head(model.backbone(images, training=True), training=True).numpy()
    return projections / np.linalg.norm(projections, axis=1, keepdims=True)


def _numpy_nt_xent(z1, z2, temperature):
    z = np.concatenate([z1, z2])
    n = len(z1)
    logits = z @ z.T / temperature
    np.fill_diagonal(logits, -np.inf)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    positives = np.concatenate([np.arange(n) + n, np.arange(n)])
    return -np.mean(log_probs[np.arange(2 * n), positives])


def _numpy_mix(z_mix, z_other, lam, temperature):
    targets = np.concatenate([np.diag(lam), np.diag(1 - lam)], axis=1)
    logits = z_mix @ z_other.T / temperature
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -(targets * log_probs).sum(axis=1).mean()


def test_weights_are_backbone_and_head_only():
    model = _model()
    expected = model.backbone.trainable_weights + model.projection_head.trainable_weights
    assert [w.path for w in model.trainable_weights] == [w.path for w in expected]
    non_trainable = {w.path for w in model.non_trainable_weights}
    moving_statistics = {w.path for w in model.backbone.non_trainable_weights}
    assert moving_statistics <= non_trainable
    assert not hasattr(model, "queue")


def test_zero_mix_weight_runs_no_mixed_forward_pass(monkeypatch):
    model = _model(mix_weight=0.0)
    batch_sizes = _record_encoded_batch_sizes(model, monkeypatch)

    def forbidden_mix(images):
        raise AssertionError("mix() must not run with mix_weight=0")

    monkeypatch.setattr(model, "mix", forbidden_mix)

    history = model.fit(_dataset(*_views(2)), epochs=1, verbose=0)

    assert set(batch_sizes) == {BATCH}
    assert history.history["mix_loss"][-1] == 0.0
    np.testing.assert_allclose(history.history["loss"], history.history["nt_xent_loss"], rtol=1e-6)


def test_mix_forwards_half_batch_per_view(monkeypatch):
    model = _model(mix_weight=1.0)
    batch_sizes = _record_encoded_batch_sizes(model, monkeypatch)

    history = model.fit(_dataset(*_views(1)), epochs=1, verbose=0)

    # Keras may trace the step more than once; each trace encodes 2 views and 2 mixes.
    assert set(batch_sizes) == {BATCH, BATCH // 2}
    assert batch_sizes.count(BATCH) == batch_sizes.count(BATCH // 2)
    assert history.history["mix_loss"][-1] > 0
    expected_total = history.history["nt_xent_loss"][-1] + history.history["mix_loss"][-1]
    np.testing.assert_allclose(history.history["loss"][-1], expected_total, rtol=1e-5)


@pytest.mark.parametrize("mix_weight", [0.0, 0.5, 1.0])
def test_first_step_loss_matches_numpy(monkeypatch, mix_weight):
    """The logged loss of one step equals NT-Xent + beta * (mix_1 + mix_2) / 2 in NumPy,
    computed from a copy of the initial weights and the recorded mixed images."""
    model = _model(mix_weight=mix_weight, temperature=0.5, mix_temperature=0.3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
    reference = _model(mix_weight=mix_weight)
    reference.set_weights(model.get_weights())
    mixes = []
    mix = model.mix

    def recording_mix(images):
        mixed, lam = mix(images)
        mixes.append((mixed.numpy(), lam.numpy()))
        return mixed, lam

    monkeypatch.setattr(model, "mix", recording_mix)
    view_1, view_2 = _views(1, seed=4)

    history = model.fit(_dataset(view_1, view_2), epochs=1, verbose=0)

    z1, z2 = _numpy_projections(reference, view_1), _numpy_projections(reference, view_2)
    expected_nt_xent = _numpy_nt_xent(z1, z2, 0.5)
    expected_mix = 0.0
    if mix_weight:
        (mixed_1, lam_1), (mixed_2, lam_2) = mixes
        half = BATCH // 2
        np.testing.assert_allclose(
            mixed_1, lam_1[:, None, None, None] * view_1[:half] + (1 - lam_1[:, None, None, None]) * view_1[half:],
            rtol=1e-6, atol=1e-6,
        )
        z_mix1, z_mix2 = _numpy_projections(reference, mixed_1), _numpy_projections(reference, mixed_2)
        expected_mix = (_numpy_mix(z_mix1, z2, lam_1, 0.3) + _numpy_mix(z_mix2, z1, lam_2, 0.3)) / 2
    else:
        assert mixes == []
    np.testing.assert_allclose(history.history["nt_xent_loss"][0], expected_nt_xent, rtol=1e-4)
    np.testing.assert_allclose(history.history["mix_loss"][0], expected_mix, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(history.history["loss"][0], expected_nt_xent + mix_weight * expected_mix, rtol=1e-4)


def test_zero_mix_weight_trains_like_simclr_term():
    """beta = 0 and beta = 1 from the same weights log the same NT-Xent at the first step,
    because the mixed images run in their own forward passes."""
    plain, mixed = _model(mix_weight=0.0), _model(mix_weight=1.0)
    mixed.set_weights(plain.get_weights())
    dataset = _dataset(*_views(1))

    plain_history = plain.fit(dataset, epochs=1, verbose=0)
    mixed_history = mixed.fit(dataset, epochs=1, verbose=0)

    np.testing.assert_allclose(plain_history.history["loss"], mixed_history.history["nt_xent_loss"], rtol=1e-6)


def test_training_logs_contrastive_metrics():
    model = _model()
    history = model.fit(_dataset(*_views(2)), epochs=2, verbose=0)
    assert set(history.history) == {"loss", "nt_xent_loss", "mix_loss", "top1"}
    assert all(np.isfinite(history.history["loss"]))
    assert all(0.0 <= value <= 1.0 for value in history.history["top1"])


def test_top1_counts_positive_as_best_match():
    """With identical views the positive has cosine similarity 1, the maximum, so it wins
    for nearly every anchor. Another anchor with an equal float similarity could tie it."""
    model = _model(mix_weight=0.0)
    view, _ = _views(1, seed=5)
    history = model.fit(_dataset(view, view), epochs=1, verbose=0)
    assert history.history["top1"][-1] >= 0.9


@pytest.mark.parametrize("batch, message", [(7, "must be even"), (1, "must be even")])
def test_bad_batch_sizes_are_rejected(batch, message):
    model = _model()
    images = np.zeros((batch, IMAGE, IMAGE, 3), "float32")
    dataset = tf.data.Dataset.from_tensors((images, images))
    with pytest.raises(ValueError, match=message):
        model.fit(dataset, epochs=1, verbose=0)


def test_single_image_element_is_rejected():
    model = _model()
    dataset = tf.data.Dataset.from_tensors(np.zeros((BATCH, IMAGE, IMAGE, 3), "float32"))
    with pytest.raises(ValueError, match=r"SimCLR.fit expects a dataset of \(view_q, view_k\) pairs"):
        model.fit(dataset, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "overrides, key",
    [({"temperature": 0}, "temperature"), ({"mix_temperature": -1.0}, "mix_temperature"), ({"mix_weight": -1}, "mix_weight")],
)
def test_invalid_hyperparameters_are_rejected(overrides, key):
    with pytest.raises(ValueError, match=key):
        _model(**overrides)


def test_config_round_trip():
    model = _model(mix_weight=0.5, temperature=0.2)
    clone = SimCLR.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert clone.mix_weight == 0.5
    assert clone.projection_head.output_shape == (None, 8)


def test_keras_file_round_trip(tmp_path):
    """A `.keras` file restores every weight and the random generator's state."""
    model = _model()
    model.fit(_dataset(*_views(1)), epochs=1, verbose=0)
    path = tmp_path / "simclr.keras"

    model.save(path)
    restored = keras.models.load_model(path)

    assert isinstance(restored, SimCLR)
    assert restored.get_config() == model.get_config()
    assert len(restored.weights) == len(model.weights)
    for original, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy(), err_msg=original.path)
