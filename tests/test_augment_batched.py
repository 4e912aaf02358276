"""Batched on-device augmentation: each transform against NumPy, the per-sample draws, and training with it."""

import colorsys
import dataclasses
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import augment, augment_batched
from mixco_tf import config as config_lib
from mixco_tf.models import MixCo, SimCLR
# Test modules sit on pytest's import path, because tests/ is not a package.
from test_augment import IDENTITY
from test_train_cli import TINY_FLAGS, _run_train

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _random_images(batch, size, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def _parameters(batch, **overrides):
    """Per-sample parameters of no change, with `overrides` as float32 or bool arrays."""
    parameters = {
        "crop_box": np.tile(np.float32([[0.0, 0.0, 1.0, 1.0]]), [batch, 1]),
        "jitter": np.zeros(batch, bool),
        "brightness": np.ones(batch, np.float32),
        "contrast": np.ones(batch, np.float32),
        "saturation": np.ones(batch, np.float32),
        "hue": np.zeros(batch, np.float32),
        "grayscale": np.zeros(batch, bool),
        "blur": np.zeros(batch, bool),
        "blur_sigma": np.ones(batch, np.float32),
        "flip": np.zeros(batch, bool),
    }
    parameters.update(overrides)
    return {name: tf.constant(value) for name, value in parameters.items()}


# ---------------------------------------------------------------------- crop


def _numpy_triangle_resample(image, box, size):
    """Antialiased bilinear resampling of a box, written with loops in float64."""
    height, width, _ = image.shape

    def weights(start, end, side):
        scale = (end - start) * side / size
        kernel = max(scale, 1.0)
        matrix = np.zeros((size, side))
        for i in range(size):
            center = start * side + (i + 0.5) * scale
            for j in range(side):
                matrix[i, j] = max(0.0, 1.0 - abs(j + 0.5 - center) / kernel)
            matrix[i] /= matrix[i].sum()
        return matrix

    rows = weights(box[0], box[2], height)
    columns = weights(box[1], box[3], width)
    return np.einsum("ih,hwc,jw->ijc", rows, image.astype(np.float64), columns)


def _numpy_bilinear_sample(image, y, x):
    """Classic bilinear interpolation at pixel coordinates (pixel centers at integers)."""
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    dy, dx = y - y0, x - x0
    top = (1 - dx) * image[y0, x0] + dx * image[y0, x0 + 1]
    bottom = (1 - dx) * image[y0 + 1, x0] + dx * image[y0 + 1, x0 + 1]
    return (1 - dy) * top + dy * bottom


@pytest.mark.parametrize("size", [5, 12])
def test_crop_matches_numpy_resampler(size):
    images = _random_images(2, 9)
    boxes = np.float32([[0.1, 0.2, 0.8, 0.9], [0.0, 0.3, 0.55, 1.0]])

    crops = augment_batched.resized_crops(tf.constant(images), tf.constant(boxes), size).numpy()

    for crop, image, box in zip(crops, images, boxes):
        np.testing.assert_allclose(crop, _numpy_triangle_resample(image, box, size), atol=1e-5)


def test_upscaled_crop_is_bilinear_interpolation():
    """Upscaling needs no antialiasing, so an interior pixel is a plain bilinear sample."""
    image = _random_images(1, 10)
    box = np.float32([0.2, 0.3, 0.6, 0.8])  # 4 x 5 source pixels to 16 x 16
    size = 16

    crop = augment_batched.resized_crops(tf.constant(image), tf.constant(box[None]), size).numpy()[0]

    for i, j in [(3, 5), (8, 8), (12, 2)]:
        y = box[0] * 10 + (i + 0.5) * (box[2] - box[0]) * 10 / size - 0.5
        x = box[1] * 10 + (j + 0.5) * (box[3] - box[1]) * 10 / size - 0.5
        np.testing.assert_allclose(crop[i, j], _numpy_bilinear_sample(image[0], y, x), atol=1e-5)


@pytest.mark.parametrize("size", [7, 16, 32, 48])
def test_whole_box_equals_antialiased_resize(size):
    images = _random_images(3, 32)
    boxes = np.tile(np.float32([[0.0, 0.0, 1.0, 1.0]]), [3, 1])

    crops = augment_batched.resized_crops(tf.constant(images), tf.constant(boxes), size)

    expected = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    np.testing.assert_allclose(crops.numpy(), expected.numpy(), atol=1e-5)


# ---------------------------------------------------------------------- color


def test_brightness_and_contrast_match_numpy():
    images = _random_images(3, 6)
    brightness = np.float32([0.6, 1.0, 1.4])
    contrast = np.float32([1.3, 0.7, 1.0])
    config = augment.AugmentConfig(brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0)

    jittered = augment_batched.color_jitter(
        tf.constant(images), brightness, contrast, np.ones(3, np.float32), np.zeros(3, np.float32), config
    ).numpy()

    expected = np.clip(images * brightness[:, None, None, None], 0, 1)
    mean = expected.mean(axis=(1, 2), keepdims=True)
    expected = np.clip(mean + (expected - mean) * contrast[:, None, None, None], 0, 1)
    np.testing.assert_allclose(jittered, expected, atol=1e-5)


def _numpy_hsv_adjust(image, saturation=1.0, hue=0.0):
    out = np.empty_like(image)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*image[index])
        out[index] = colorsys.hsv_to_rgb((h + hue) % 1.0, min(1.0, s * saturation), v)
    return out


def test_saturation_matches_numpy_and_tf():
    images = _random_images(3, 5)
    factors = np.float32([0.6, 1.0, 1.4])
    config = augment.AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.4, hue=0.0)

    jittered = augment_batched.color_jitter(
        tf.constant(images), np.ones(3, np.float32), np.ones(3, np.float32), factors, np.zeros(3, np.float32), config
    ).numpy()

    for output, image, factor in zip(jittered, images, factors):
        np.testing.assert_allclose(output, _numpy_hsv_adjust(image, saturation=factor), atol=1e-5)
        np.testing.assert_allclose(output, tf.image.adjust_saturation(image, factor).numpy(), atol=1e-5)


def test_hue_matches_adjust_hue_per_image():
    images = _random_images(4, 5)
    deltas = np.float32([-0.1, -0.03, 0.05, 0.1])
    config = augment.AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1)

    jittered = augment_batched.color_jitter(
        tf.constant(images), np.ones(4, np.float32), np.ones(4, np.float32), np.ones(4, np.float32), deltas, config
    ).numpy()

    for output, image, delta in zip(jittered, images, deltas):
        np.testing.assert_allclose(output, tf.image.adjust_hue(image, delta).numpy(), atol=1e-5)
        np.testing.assert_allclose(output, _numpy_hsv_adjust(image, hue=delta), atol=1e-5)


def test_grayscale_matches_numpy():
    images = _random_images(2, 4)

    gray = augment_batched.grayscale(tf.constant(images)).numpy()

    expected = images @ np.float32([0.2989, 0.5870, 0.1140])
    for channel in range(3):
        np.testing.assert_allclose(gray[..., channel], expected, atol=1e-6)
    np.testing.assert_allclose(gray, tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(images)).numpy(), atol=1e-6)


# ---------------------------------------------------------------------- blur and flip


@pytest.mark.parametrize("size", [16, 48])
def test_blur_matches_augment_per_image(size):
    images = _random_images(3, size)
    sigmas = np.float32([0.1, 0.9, 2.0])

    blurred = augment_batched.gaussian_blur(tf.constant(images), tf.constant(sigmas)).numpy()

    for output, image, sigma in zip(blurred, images, sigmas):
        config = augment.AugmentConfig(blur_sigma=(float(sigma), float(sigma)))
        expected = augment._gaussian_blur(tf.constant(image), tf.constant([0, 0]), config).numpy()
        np.testing.assert_allclose(output, expected, atol=1e-5)


def test_gates_apply_per_sample():
    images = _random_images(4, 8)
    config = augment.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), blur_prob=0.5, flip_prob=0.5)
    parameters = _parameters(
        4,
        flip=np.array([True, False, False, False]),
        grayscale=np.array([False, True, False, False]),
        jitter=np.array([False, False, True, False]),
        brightness=np.float32([1.0, 1.0, 0.5, 1.0]),
    )

    views = augment_batched.apply_parameters(tf.constant(images), parameters, 8, config).numpy()

    np.testing.assert_allclose(views[0], images[0][:, ::-1], atol=1e-5)
    np.testing.assert_allclose(views[1], images[1] @ np.float32([0.2989, 0.587, 0.114])[:, None].repeat(3, 1), atol=1e-5)
    np.testing.assert_allclose(views[2], images[2] * 0.5, atol=1e-5)
    np.testing.assert_allclose(views[3], images[3], atol=1e-5)


# ---------------------------------------------------------------------- random draws

NUM_DRAWS = 512


def _tolerance(probability):
    """Four standard deviations of a binomial rate over `NUM_DRAWS` samples (false alarm < 1e-4)."""
    return 4 * math.sqrt(probability * (1 - probability) / NUM_DRAWS)


def _identical_views(config, image):
    images = np.repeat(image[None], NUM_DRAWS, axis=0)
    return augment_batched.augment_batch(tf.constant(images), tf.constant([5, 6]), image.shape[0], config).numpy()


def test_flip_rate_matches_probability():
    image = np.zeros((8, 8, 3), np.float32)
    image[:, :4] = 1.0  # bright left half
    config = dataclasses.replace(IDENTITY, flip_prob=0.3)

    views = _identical_views(config, image)

    flipped = views[:, 0, 0, 0] < 0.5
    np.testing.assert_allclose(views[flipped], np.broadcast_to(image[:, ::-1], views[flipped].shape), atol=1e-6)
    assert abs(flipped.mean() - 0.3) < _tolerance(0.3)


def test_grayscale_rate_matches_probability():
    image = np.tile(np.float32([0.9, 0.2, 0.1]), [8, 8, 1])
    config = dataclasses.replace(IDENTITY, grayscale_prob=0.2)

    views = _identical_views(config, image)

    gray = np.abs(views[..., 0] - views[..., 1]).max(axis=(1, 2)) < 1e-6
    assert abs(gray.mean() - 0.2) < _tolerance(0.2)


def test_jitter_rate_matches_probability():
    image = _random_images(1, 8)[0]
    config = dataclasses.replace(IDENTITY, brightness=0.4, color_jitter_prob=0.8)

    views = _identical_views(config, image)

    changed = np.abs(views - image).max(axis=(1, 2, 3)) > 1e-6
    assert abs(changed.mean() - 0.8) < _tolerance(0.8)
    # Each jittered sample has its own factor.
    assert len(np.unique(np.round(views[changed].mean(axis=(1, 2, 3)), 6))) > 0.9 * changed.sum()


def test_crop_boxes_stay_in_scale_and_ratio():
    parameters = augment_batched.draw_parameters(tf.constant([1, 2]), NUM_DRAWS, (32, 32), augment.AugmentConfig())

    boxes = parameters["crop_box"].numpy()
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes.min() >= 0.0
    assert boxes.max() <= 1.0 + 1e-6
    assert (heights * widths).min() >= 0.2 - 1e-6
    assert (heights * widths).max() <= 1.0 + 1e-6
    assert np.all(np.abs(np.log(widths / heights)) <= math.log(4 / 3) + 1e-5)


def test_crop_area_is_uniform():
    """With ratio 1 every box fits, so the area is U(0.2, 1): mean 0.6, standard deviation 0.8 / sqrt(12)."""
    config = augment.AugmentConfig(crop_ratio=(1.0, 1.0))

    boxes = augment_batched.draw_parameters(tf.constant([1, 2]), NUM_DRAWS, (32, 32), config)["crop_box"].numpy()

    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert abs(areas.mean() - 0.6) < 4 * 0.8 / math.sqrt(12 * NUM_DRAWS)
    assert abs(np.median(areas) - 0.6) < 0.05


def test_crop_ratio_is_log_uniform():
    """Small areas always fit, so log(ratio) is U(-L, L), L = log(4/3): mean 0 within 4 standard
    deviations, where a uniform ratio would give a mean of 0.028."""
    config = augment.AugmentConfig(crop_scale=(0.1, 0.2))
    num_draws = 20_000

    boxes = augment_batched.draw_parameters(tf.constant([1, 2]), num_draws, (32, 32), config)["crop_box"].numpy()

    log_ratios = np.log((boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0]))
    half_width = math.log(4 / 3)
    assert abs(log_ratios.mean()) < 4 * half_width / math.sqrt(3 * num_draws)
    assert abs(log_ratios.std() - half_width / math.sqrt(3)) < 0.01


def test_crop_falls_back_to_whole_image():
    """A full-area box with aspect ratio 2 to 3 never fits a square, so every sample keeps the image."""
    config = augment.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 3.0))

    boxes = augment_batched.draw_parameters(tf.constant([1, 2]), 64, (16, 16), config)["crop_box"].numpy()

    np.testing.assert_array_equal(boxes, np.tile([[0.0, 0.0, 1.0, 1.0]], [64, 1]))


def test_samples_get_different_parameters():
    parameters = augment_batched.draw_parameters(tf.constant([3, 4]), 2, (16, 16), augment.AugmentConfig())

    for name in ("crop_box", "brightness", "contrast", "saturation", "hue", "blur_sigma"):
        first, second = parameters[name].numpy()
        assert not np.array_equal(first, second), name


def test_same_seed_same_views():
    images = (_random_images(6, 16) * 255).astype(np.uint8)
    config = augment.AugmentConfig()

    first = augment_batched.augment_batch(images, tf.constant([7, 8]), 12, config).numpy()
    second = augment_batched.augment_batch(images, tf.constant([7, 8]), 12, config).numpy()
    other = augment_batched.augment_batch(images, tf.constant([7, 9]), 12, config).numpy()

    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)
    assert first.shape == (6, 12, 12, 3)
    assert first.min() >= 0.0
    assert first.max() <= 1.0


def test_xla_compiles_the_augmentation():
    images = (_random_images(4, 16) * 255).astype(np.uint8)
    config = augment.AugmentConfig()
    parameters = augment_batched.draw_parameters(tf.constant([1, 2]), 4, (16, 16), config)

    compiled = tf.function(lambda x, p: augment_batched.apply_parameters(x, p, 12, config), jit_compile=True)

    expected = augment_batched.apply_parameters(images, parameters, 12, config)
    np.testing.assert_allclose(compiled(images, parameters).numpy(), expected.numpy(), atol=1e-5)
    # XLA's random ops draw other values than graph mode, so the whole draw is only run.
    generator = keras.random.SeedGenerator(0)
    draw = tf.function(
        lambda x: augment_batched.draw_two_views(x, generator, image_size=12, config=config, mean=MEAN, std=STD),
        jit_compile=True,
    )
    view_q, view_k = draw(images)
    assert view_q.shape == view_k.shape == (4, 12, 12, 3)
    assert np.isfinite(view_q.numpy()).all()


# ---------------------------------------------------------------------- bad input


def test_wrong_rank_is_rejected():
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        augment_batched.augment_batch(np.zeros((16, 16, 3), np.uint8), tf.constant([1, 2]), 8, augment.AugmentConfig())


def test_model_arguments_are_checked():
    with pytest.raises(ValueError, match="image_size"):
        MixCo(width_multiplier=0.0625, queue_size=16, augmentation=augment.AugmentConfig(), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="std"):
        MixCo(width_multiplier=0.0625, queue_size=16, augmentation={}, image_size=8, mean=MEAN, std=(0.1, 0.0, 0.1))


def test_config_key_is_validated():
    with pytest.raises(ValueError, match="augment_on_device"):
        config_lib.from_dict({"augment_on_device": "sometimes"})
    saved = config_lib.Config().to_dict()
    changed = config_lib.changed_keys(saved, config_lib.Config(augment_on_device=True))
    assert changed == [("augment_on_device", False, True)]


# ---------------------------------------------------------------------- training


def _augmenting_mixco(**overrides):
    settings = dict(
        width_multiplier=0.0625,
        projection_dim=8,
        queue_size=32,
        key_bn_splits=2,
        seed=0,
        augmentation=augment.AugmentConfig(),
        image_size=16,
        mean=MEAN,
        std=STD,
    )
    settings.update(overrides)
    model = MixCo(**settings)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def test_mixco_trains_on_raw_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3)).astype(np.uint8)
    labels = np.arange(24) % 3
    model = _augmenting_mixco()
    before = [w.copy() for w in model.backbone.get_weights()]

    plain = tf.data.Dataset.from_tensor_slices(images).batch(8, drop_remainder=True)
    with_labels = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8, drop_remainder=True)
    first = model.fit(plain, epochs=1, verbose=0).history
    second = model.fit(with_labels, epochs=1, verbose=0).history

    for history in (first, second):
        assert all(np.isfinite(history[name][-1]) for name in ("loss", "moco_loss", "mix_loss"))
    moved = [np.abs(a - b).max() for a, b in zip(model.backbone.get_weights(), before)]
    assert max(moved) > 0
    model.save(tmp_path / "mixco.keras")
    restored = keras.models.load_model(tmp_path / "mixco.keras")
    assert restored.augmentation == model.augmentation


def test_simclr_trains_on_raw_images():
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    model = SimCLR(
        width_multiplier=0.0625, projection_dim=8, seed=0,
        augmentation=augment.AugmentConfig(), image_size=16, mean=MEAN, std=STD,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))

    history = model.fit(tf.data.Dataset.from_tensor_slices(images).batch(8, drop_remainder=True), verbose=0).history

    assert np.isfinite(history["loss"][-1])


def test_odd_batch_and_view_pairs_are_rejected():
    model = _augmenting_mixco()
    odd = tf.data.Dataset.from_tensors(np.zeros((7, 16, 16, 3), np.uint8))
    views = tf.data.Dataset.from_tensors((np.zeros((8, 16, 16, 3), np.float32),) * 2)

    with pytest.raises(ValueError, match="must be even; got 7"):
        model.fit(odd, verbose=0)
    with pytest.raises(ValueError, match="pairs of image batches"):
        model.fit(views, verbose=0)


_REPLICA_SCRIPT = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from mixco_tf import augment, augment_batched

four = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("uint8")
images = np.concatenate([four, four])  # both replicas get the same images
settings = dict(image_size=12, config=augment.AugmentConfig(), mean=(0.5,) * 3, std=(0.25,) * 3)


def views(strategy):
    with strategy.scope():
        generator = keras.random.SeedGenerator(7)
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(images))

    @tf.function
    def step(batch):
        return strategy.run(lambda x: augment_batched.draw_two_views(x, generator, **settings), args=(batch,))

    pair = step(next(iter(dataset)))
    return [np.concatenate([t.numpy() for t in strategy.experimental_local_results(v)]) for v in pair]


one_replica = views(tf.distribute.get_strategy())
two_replicas = views(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({
    "split_difference": max(float(np.abs(a - b).max()) for a, b in zip(one_replica, two_replicas)),
    "replica_difference": float(np.abs(two_replicas[0][:4] - two_replicas[0][4:]).max()),
}))
"""


def test_replicas_draw_their_slice_of_the_global_batch():
    """Two replicas draw different views, which together equal one replica's views of the global batch."""
    completed = subprocess.run(
        [sys.executable, "-c", _REPLICA_SCRIPT], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    assert measured["split_difference"] < 1e-5
    assert measured["replica_difference"] > 0.1


def test_train_cli_runs_with_on_device_augmentation(tmp_path):
    model_dir = tmp_path / "run"

    completed = _run_train([f"--model_dir={model_dir}", "--augment_on_device=true", "--evaluate=false", *TINY_FLAGS])

    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["config"]["augment_on_device"] is True
    assert results["epochs_completed"] == 1
    assert np.isfinite(results["final_metrics"]["loss"])
    assert os.path.isfile(os.path.join(results["export_dir"], "saved_model.pb"))


@pytest.mark.slow
def test_train_cli_resumes_with_on_device_augmentation(tmp_path):
    model_dir = tmp_path / "run"
    flags = [f"--model_dir={model_dir}", "--augment_on_device=true", "--evaluate=false", *TINY_FLAGS[1:]]
    first = _run_train([*flags, "--epochs=1"])
    assert first.returncode == 0, first.stderr[-3000:]

    resumed = _run_train([*flags, "--epochs=2"])
    switched = _run_train([f"--model_dir={model_dir}", "--evaluate=false", *TINY_FLAGS[1:], "--epochs=3"])

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming after epoch 1 of 2." in resumed.stderr
    assert json.loads((model_dir / "results.json").read_text())["epochs_completed"] == 2
    assert switched.returncode == 2, switched.stderr[-3000:]
    assert "augment_on_device: True -> False" in switched.stderr
