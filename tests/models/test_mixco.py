"""The MixCo train step: mixing, momentum update, queue and the beta = 0 path."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf.models import MixCo
from mixco_tf.models.mixing import mix_halves

BATCH = 8
IMAGE = 16


def _model(**overrides):
    settings = dict(
        backbone="resnet18",
        stem="cifar",
        width_multiplier=0.0625,
        projection_dim=8,
        queue_size=20,
        moco_momentum=0.9,
        key_bn_splits=2,
        seed=3,
    )
    settings.update(overrides)
    model = MixCo(**settings)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _views(steps, seed=0):
    rng = np.random.default_rng(seed)
    view_q = rng.normal(size=(steps * BATCH, IMAGE, IMAGE, 3)).astype("float32")
    view_k = rng.normal(size=(steps * BATCH, IMAGE, IMAGE, 3)).astype("float32")
    return view_q, view_k


def _dataset(view_q, view_k):
    return tf.data.Dataset.from_tensor_slices((view_q, view_k)).batch(BATCH, drop_remainder=True)


def _key_weights(model):
    return [w.numpy() for w in model.key_backbone.weights + model.key_projection_head.weights]


def _query_weights(model):
    return [w.numpy() for w in model.backbone.weights + model.projection_head.weights]


def test_key_encoder_starts_equal_to_query_encoder():
    model = _model()
    for query, key in zip(_query_weights(model), _key_weights(model)):
        np.testing.assert_array_equal(query, key)


def test_key_encoder_is_not_trainable():
    model = _model()
    trainable = {id(w) for w in model.trainable_weights}
    key_weights = model.key_backbone.weights + model.key_projection_head.weights
    assert not any(id(w) in trainable for w in key_weights)
    assert len(model.trainable_weights) == len(model.backbone.trainable_weights) + len(
        model.projection_head.trainable_weights
    )
    non_trainable = {id(w) for w in model.non_trainable_weights}
    assert id(model.queue) in non_trainable
    assert id(model.queue_pointer) in non_trainable


def test_queue_starts_with_unit_vectors():
    model = _model()
    np.testing.assert_allclose(np.linalg.norm(model.queue.numpy(), axis=1), 1.0, rtol=1e-5)
    assert int(model.queue_pointer.numpy()) == 0


def test_mix_is_convex_combination_of_halves():
    model = _model()
    images = np.random.default_rng(1).normal(size=(BATCH, IMAGE, IMAGE, 3)).astype("float32")

    mixed, lam = model.mix(tf.constant(images))

    lam = lam.numpy()
    assert lam.shape == (BATCH // 2,)
    assert np.all((lam >= 0) & (lam <= 1))
    expected = lam[:, None, None, None] * images[: BATCH // 2] + (1 - lam[:, None, None, None]) * images[BATCH // 2 :]
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_one_step_moves_key_encoder_by_momentum():
    model = _model(moco_momentum=0.9)
    # Give the key encoder different values, so the update is not trivially k = q.
    rng = np.random.default_rng(2)
    for weight in model.key_backbone.weights + model.key_projection_head.weights:
        if weight.trainable or weight.path.endswith(("gamma", "beta", "kernel", "bias")):
            weight.assign(weight.numpy() + rng.normal(scale=0.01, size=weight.shape).astype("float32"))
    pairs = model.key_encoder_pairs
    old_query = [q.numpy() for q, _ in pairs]
    old_key = [k.numpy() for _, k in pairs]

    model.fit(_dataset(*_views(1)), epochs=1, verbose=0)

    for (query, key), q0, k0 in zip(pairs, old_query, old_key):
        np.testing.assert_allclose(key.numpy(), 0.9 * k0 + 0.1 * q0, rtol=1e-5, atol=1e-6)
    moved = [np.abs(q.numpy() - q0).max() for (q, _), q0 in zip(pairs, old_query)]
    assert max(moved) > 0, "the optimizer did not update the query encoder"


def test_momentum_pairs_cover_every_trainable_weight():
    model = _model()
    pairs = model.key_encoder_pairs
    assert len(pairs) == len(model.trainable_weights)
    for query, key in pairs:
        assert query.shape == key.shape
        assert query.path.split("/")[-1] == key.path.split("/")[-1]


def test_queue_is_fifo_ring_buffer():
    """Keys of each step, recomputed with the key encoder, fill the queue in order."""
    steps, queue_size = 4, 20  # 4 * 8 = 32 keys into 20 slots: wraps around
    model = _model(queue_size=queue_size, key_bn_splits=1)
    view_q, view_k = _views(steps)
    ring = model.queue.numpy().copy()
    pointer = 0

    for step in range(steps):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        model.fit(_dataset(view_q[batch], view_k[batch]), epochs=1, verbose=0)
        keys = model.key_projection_head(model.key_backbone(view_k[batch], training=True), training=True)
        keys = keys.numpy() / np.linalg.norm(keys.numpy(), axis=1, keepdims=True)
        for row in keys:
            ring[pointer] = row
            pointer = (pointer + 1) % queue_size

    assert int(model.queue_pointer.numpy()) == pointer == (steps * BATCH) % queue_size
    np.testing.assert_allclose(model.queue.numpy(), ring, rtol=1e-4, atol=1e-5)


def test_enqueue_wraps_around():
    model = _model(queue_size=10)
    model.queue_pointer.assign(7)
    keys = np.arange(4 * 8, dtype="float32").reshape(4, 8)

    model.enqueue(tf.constant(keys))

    queue = model.queue.numpy()
    np.testing.assert_array_equal(queue[[7, 8, 9, 0, 1]][:4], keys)
    assert int(model.queue_pointer.numpy()) == 1


def _record_query_batch_sizes(model, monkeypatch):
    """Wraps `model.encode_queries` to record the batch size of each traced call."""
    query_batch_sizes = []
    encode_queries = model.encode_queries

    def recording_encode_queries(images, training=True):
        query_batch_sizes.append(images.shape[0])
        return encode_queries(images, training=training)

    monkeypatch.setattr(model, "encode_queries", recording_encode_queries)
    return query_batch_sizes


def test_zero_mix_weight_runs_no_mixed_forward_pass(monkeypatch):
    model = _model(mix_weight=0.0)
    query_batch_sizes = _record_query_batch_sizes(model, monkeypatch)
    def forbidden_mix(images):
        raise AssertionError("mix() must not run with mix_weight=0")

    monkeypatch.setattr(model, "mix", forbidden_mix)

    history = model.fit(_dataset(*_views(2)), epochs=1, verbose=0)

    assert set(query_batch_sizes) == {BATCH}
    assert history.history["mix_loss"][-1] == 0.0
    np.testing.assert_allclose(history.history["loss"], history.history["moco_loss"], rtol=1e-6)


def test_mixco_forwards_one_and_a_half_batches(monkeypatch):
    model = _model(mix_weight=1.0)
    query_batch_sizes = _record_query_batch_sizes(model, monkeypatch)
    history = model.fit(_dataset(*_views(1)), epochs=1, verbose=0)

    assert set(query_batch_sizes) == {BATCH + BATCH // 2}
    assert history.history["mix_loss"][-1] > 0
    expected_total = history.history["moco_loss"][-1] + history.history["mix_loss"][-1]
    np.testing.assert_allclose(history.history["loss"][-1], expected_total, rtol=1e-5)


def test_training_logs_contrastive_metrics():
    model = _model()
    history = model.fit(_dataset(*_views(2)), epochs=2, verbose=0)
    assert set(history.history) == {"loss", "moco_loss", "mix_loss", "top1"}
    assert all(np.isfinite(history.history["loss"]))
    assert all(0.0 <= value <= 1.0 for value in history.history["top1"])


@pytest.mark.parametrize(
    "batch, overrides, message",
    [(7, {}, "must be even"), (6, {"key_bn_splits": 4}, "not divisible by key_bn_splits=4"), (8, {"queue_size": 6}, "smaller than the batch size")],
)
def test_bad_batch_sizes_are_rejected(batch, overrides, message):
    model = _model(**overrides)
    images = np.zeros((batch, IMAGE, IMAGE, 3), "float32")
    dataset = tf.data.Dataset.from_tensors((images, images))
    with pytest.raises(ValueError, match=message):
        model.fit(dataset, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "overrides, key",
    [({"temperature": 0}, "temperature"), ({"moco_momentum": 1.0}, "moco_momentum"), ({"mix_weight": -1}, "mix_weight")],
)
def test_invalid_hyperparameters_are_rejected(overrides, key):
    with pytest.raises(ValueError, match=key):
        _model(**overrides)


def test_weight_decay_adds_l2_gradient():
    """Plain SGD: decayed = w - lr * (g + wd * w) and plain = w - lr * g, so they differ by lr * wd * w."""
    decayed, plain = _model(weight_decay=0.5), _model(weight_decay=0.0)
    decayed.compile(optimizer=keras.optimizers.SGD(0.1))
    plain.compile(optimizer=keras.optimizers.SGD(0.1))
    plain.set_weights(decayed.get_weights())  # same weights and random state, so the same g
    initial = [w.numpy() for w in decayed.backbone.trainable_weights]
    dataset = _dataset(*_views(1))

    decayed.fit(dataset, epochs=1, verbose=0)
    plain.fit(dataset, epochs=1, verbose=0)

    for w0, d, p in zip(initial, decayed.backbone.trainable_weights, plain.backbone.trainable_weights):
        np.testing.assert_allclose(p.numpy() - d.numpy(), 0.1 * 0.5 * w0, rtol=1e-3, atol=1e-6)


def test_config_round_trip():
    model = _model(queue_size=40, mix_weight=0.5)
    clone = MixCo.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert clone.queue.shape == (40, 8)


def test_keras_file_round_trip(tmp_path):
    """A `.keras` file restores every weight: encoders, queue and pointer."""
    model = _model()
    model.fit(_dataset(*_views(1)), epochs=1, verbose=0)
    path = tmp_path / "mixco.keras"

    model.save(path)
    restored = keras.models.load_model(path)

    assert isinstance(restored, MixCo)
    assert restored.get_config() == model.get_config()
    assert int(restored.queue_pointer.numpy()) == int(model.queue_pointer.numpy()) == BATCH
    np.testing.assert_array_equal(restored.queue.numpy(), model.queue.numpy())
    for original, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy(), err_msg=original.path)


@pytest.mark.parametrize("batch_norm", ["synchronized", "none"])
def test_batch_norm_modes_train(batch_norm):
    model = _model(batch_norm=batch_norm)
    history = model.fit(_dataset(*_views(2)), epochs=1, verbose=0)

    assert np.isfinite(history.history["loss"][-1])
    assert model.get_config()["batch_norm"] == batch_norm


def test_batch_norm_none_has_no_normalization_layers():
    model = _model(batch_norm="none")
    layers = model.backbone.layers + model.key_backbone.layers

    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)


def test_unknown_batch_norm_is_rejected():
    with pytest.raises(ValueError, match="Invalid batch_norm='group'"):
        _model(batch_norm="group")
def test_mix_halves_with_integer_seed_is_repeatable():
    images = tf.constant(np.random.default_rng(4).normal(size=(BATCH, IMAGE, IMAGE, 3)).astype("float32"))

    first_mixed, first_lam = mix_halves(images, seed=11)
    second_mixed, second_lam = mix_halves(images, seed=11)
    _, other_lam = mix_halves(images, seed=12)

    np.testing.assert_array_equal(first_lam.numpy(), second_lam.numpy())
    np.testing.assert_array_equal(first_mixed.numpy(), second_mixed.numpy())
    assert not np.array_equal(first_lam.numpy(), other_lam.numpy())


def test_from_config_rebuilds_equal_model():
    """Same weights by path, shape, dtype and trainability; same features once weights are copied."""
    model = _model(queue_size=40, mix_weight=0.5, key_bn_splits=4)
    clone = MixCo.from_config(model.get_config())

    def layout(weights):
        return [(w.path, tuple(w.shape), w.dtype, w.trainable) for w in weights]

    assert layout(clone.weights) == layout(model.weights)
    assert layout(clone.trainable_weights) == layout(model.trainable_weights)
    assert clone.count_params() == model.count_params()
    assert (clone.queue_size, clone.key_bn_splits, clone.mix_weight) == (40, 4, 0.5)
    # The same seed draws the same initial queue.
    np.testing.assert_array_equal(clone.queue.numpy(), model.queue.numpy())

    clone.set_weights(model.get_weights())
    images = np.random.default_rng(5).normal(size=(4, IMAGE, IMAGE, 3)).astype("float32")
    np.testing.assert_array_equal(clone(images).numpy(), model(images).numpy())


def test_keras_file_reload_trains_like_original(tmp_path):
    """The optimizer slots and the random-generator state come back too, so both continue alike."""
    model = _model()
    dataset = _dataset(*_views(1))
    model.fit(dataset, epochs=1, verbose=0)
    path = tmp_path / "mixco.keras"
    model.save(path)
    restored = keras.models.load_model(path)

    np.testing.assert_array_equal(restored.seed_generator.state.numpy(), model.seed_generator.state.numpy())
    assert int(restored.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 1
    model.fit(dataset, epochs=1, verbose=0)
    restored.fit(dataset, epochs=1, verbose=0)

    for original, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy(), err_msg=original.path)


def test_weights_file_without_seed_state_loads(tmp_path):
    """Weights saved before the generator state was stored still load, with a fresh generator."""
    import h5py

    model = _model()
    model.fit(_dataset(*_views(1)), epochs=1, verbose=0)
    path = str(tmp_path / "mixco.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r+") as weights_file:
        names = []
        weights_file.visit(names.append)
        seed_entries = [name for name in names if name.endswith("seed_generator_state")]
        assert len(seed_entries) == 1
        del weights_file[seed_entries[0]]
    fresh = _model()
    fresh.optimizer.build(fresh.trainable_variables)

    fresh.load_weights(path)

    np.testing.assert_array_equal(fresh.queue.numpy(), model.queue.numpy())
    np.testing.assert_array_equal(fresh.seed_generator.state.numpy(), _model().seed_generator.state.numpy())


def test_summary_lists_encoders_and_queue():
    model = _model(queue_size=40, moco_momentum=0.9, key_bn_splits=2)
    lines = []

    model.summary(print_fn=lines.append)

    text = "\n".join(lines)
    for layer in ("backbone", "projection_head", "key_backbone", "key_projection_head"):
        assert layer in text
    assert "Total params" in text
    assert "Queue: 40 keys x 8 dims (non-trainable), pointer at 0" in text
    assert "momentum m=0.9; split BatchNorm in 2 groups" in text
    assert "InfoNCE (T=0.2) + 1.0 * mix loss (T_mix=0.05)" in text
    assert "mix loss" not in "\n".join(_summary_lines(_model(mix_weight=0.0)))


def _summary_lines(model):
    lines = []
    model.summary(print_fn=lines.append)
    return lines
