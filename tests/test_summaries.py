"""The learning-rate column of history.csv and the TensorBoard images of mixed inputs."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import preview, summaries
from mixco_tf.augment import AugmentConfig
from mixco_tf.data import load_dataset

IMAGE_SIZE = 16
AUGMENT = AugmentConfig(crop_scale=(0.4, 1.0), blur_prob=0.0, flip_prob=0.0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_learning_rate_column_follows_schedule(tmp_path):
    """Cosine decay over 3 epochs of 4 steps; each row contains the rate of the next step."""
    steps_per_epoch, epochs, peak = 4, 3, 0.2
    schedule = keras.optimizers.schedules.CosineDecay(peak, decay_steps=steps_per_epoch * epochs)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    features = np.ones((steps_per_epoch * 2, 2), "float32")
    targets = np.zeros((steps_per_epoch * 2, 1), "float32")
    history_path = tmp_path / "history.csv"

    model.fit(
        features,
        targets,
        batch_size=2,
        epochs=epochs,
        verbose=0,
        callbacks=[summaries.LearningRateLogger(), keras.callbacks.CSVLogger(str(history_path))],
    )

    with open(history_path) as stream:
        rates = [float(row["learning_rate"]) for row in csv.DictReader(stream)]
    steps = steps_per_epoch * np.arange(1, epochs + 1)
    expected = peak * 0.5 * (1.0 + np.cos(np.pi * steps / (steps_per_epoch * epochs)))
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-7)


def test_pair_strips_layout():
    rng = np.random.default_rng(0)
    views = rng.uniform(size=(4, 8, 8, 3)).astype("float32")
    mixed = rng.uniform(size=(2, 8, 8, 3)).astype("float32")
    batch = preview.PreviewBatch(
        originals=np.zeros((4, 8, 8, 3), "uint8"),
        view_q=views,
        view_k=views,
        mixed=mixed,
        lam=np.array([0.3, 0.6], "float32"),
    )

    strips = summaries.pair_strips(batch)

    # 8 pixels times 8 reaches MIN_DISPLAY_SIDE = 64.
    assert strips.shape == (2, 64, 192, 3)
    np.testing.assert_array_equal(strips[1, ::8, 0:64:8], views[1])
    np.testing.assert_array_equal(strips[1, ::8, 64:128:8], views[3])
    np.testing.assert_array_equal(strips[1, ::8, 128:192:8], mixed[1])
    np.testing.assert_array_equal(strips[0, 7, 7], views[0, 0, 0])


def _image_events(log_dir):
    """Returns [(step, [decoded uint8 images], description)] of the `mixed_inputs` tag."""
    events = []
    for path in sorted(tf.io.gfile.glob(f"{log_dir}/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag != "mixed_inputs":
                    continue
                # The tensor contains width, height, then one encoded PNG per image.
                encoded = tf.make_ndarray(value.tensor)[2:]
                images = [tf.io.decode_png(png).numpy() for png in encoded]
                events.append((event.step, images, value.metadata.summary_description))
    return events


def test_mixed_image_summary_writes_each_epoch(digits, tmp_path):
    def make_sampler():
        return preview.PreviewSampler(digits, image_size=IMAGE_SIZE, augment_config=AUGMENT, num_pairs=4, seed=5)

    callback = summaries.MixedImageSummary(str(tmp_path / "mixed_inputs"), make_sampler(), seed=10)

    callback.on_train_begin()
    callback.on_epoch_end(0)
    callback.on_epoch_end(1)
    callback.on_train_end()

    events = _image_events(tmp_path / "mixed_inputs")
    assert [step for step, _, _ in events] == [0, 1]
    # A second sampler with the same seed replays the callback's draws.
    replay = make_sampler()
    for epoch, (_, images, description) in enumerate(events):
        batch = replay.sample(mix_seed=10 + epoch)
        expected = summaries.pair_strips(batch)
        assert len(images) == 4
        for image, strip in zip(images, expected):
            assert image.shape == (64, 192, 3)
            # PNG stores uint8, so values agree to within one level of 255.
            np.testing.assert_allclose(image / 255.0, strip, atol=1.0 / 255 + 1e-6)
        assert f"pair 0: lam = {batch.lam[0]:.3f}" in description
    first_images, second_images = events[0][1], events[1][1]
    assert not np.array_equal(first_images[0], second_images[0])
