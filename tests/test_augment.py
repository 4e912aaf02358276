"""Tests for the MoCo-v2 two-view augmentation."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mixco_tf.augment import AugmentConfig, augment_image, eval_dataset, two_view_dataset

MEAN = (0.3, 0.4, 0.5)
STD = (0.2, 0.25, 0.3)

# Every transform off: the crop keeps the whole image and nothing else runs.
IDENTITY = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    flip_prob=0.0,
)


def random_images(count, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def numpy_normalize(images):
    pixels = images.astype(np.float32) / np.float32(255)
    return (pixels - np.array(MEAN, np.float32)) / np.array(STD, np.float32)


def test_augment_image_shape_dtype_range():
    image = random_images(1, size=40)[0, :, :28]
    for i in range(5):
        view = augment_image(image, seed(i), 24, AugmentConfig()).numpy()
        assert view.shape == (24, 24, 3)
        assert view.dtype == np.float32
        assert view.min() >= 0.0
        assert view.max() <= 1.0


def test_augment_image_identity_when_disabled():
    image = random_images(1)[0]
    view = augment_image(image, seed(3), 32, IDENTITY).numpy()
    np.testing.assert_array_equal(view, image.astype(np.float32) / np.float32(255))


def test_augment_image_same_seed_same_view():
    image = random_images(1)[0]
    first = augment_image(image, seed(7, 1), 32, AugmentConfig()).numpy()
    second = augment_image(image, seed(7, 1), 32, AugmentConfig()).numpy()
    np.testing.assert_array_equal(first, second)


def test_augment_image_different_seed_different_view():
    image = random_images(1)[0]
    first = augment_image(image, seed(7, 1), 32, AugmentConfig()).numpy()
    second = augment_image(image, seed(8, 1), 32, AugmentConfig()).numpy()
    assert not np.array_equal(first, second)


def test_brightness_multiplies_by_factor():
    # A ramp below 0.6 never clips for factors up to 1.5, so the ratio shows the factor.
    ramp = np.linspace(0.05, 0.6, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    config = dataclasses.replace(IDENTITY, brightness=0.5, color_jitter_prob=1.0)
    factors = []
    for i in range(20):
        view = augment_image(ramp, seed(i), 32, config).numpy()
        ratio = view / ramp
        factor = ratio.mean()
        np.testing.assert_allclose(view, ramp * factor, rtol=1e-5)
        assert 0.5 <= factor <= 1.5
        factors.append(factor)
    assert min(factors) < 1.0 < max(factors)


def test_brightness_clips_to_one():
    bright = np.full((32, 32, 3), 250, np.uint8)
    config = dataclasses.replace(IDENTITY, brightness=0.9, color_jitter_prob=1.0)
    for i in range(10):
        view = augment_image(bright, seed(i), 32, config).numpy()
        assert view.max() <= 1.0


def test_grayscale_uses_tf_weights():
    image = random_images(1)[0]
    config = dataclasses.replace(IDENTITY, grayscale_prob=1.0)
    view = augment_image(image, seed(0), 32, config).numpy()
    rgb = image.astype(np.float32) / 255
    expected = 0.2989 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    for channel in range(3):
        np.testing.assert_allclose(view[..., channel], expected, atol=1e-6)


def test_flip_probability_one_mirrors():
    image = random_images(1)[0]
    config = dataclasses.replace(IDENTITY, flip_prob=1.0)
    view = augment_image(image, seed(0), 32, config).numpy()
    np.testing.assert_array_equal(view, np.fliplr(image.astype(np.float32) / np.float32(255)))


def test_blur_keeps_constant_image():
    # Reflect padding keeps the border as bright as the interior.
    image = np.full((32, 32, 3), 200, np.uint8)
    config = dataclasses.replace(IDENTITY, blur_prob=1.0, blur_sigma=(2.0, 2.0))
    view = augment_image(image, seed(0), 32, config).numpy()
    np.testing.assert_allclose(view, 200 / 255, atol=1e-6)


def test_blur_smooths_noise():
    image = random_images(1)[0]
    config = dataclasses.replace(IDENTITY, blur_prob=1.0, blur_sigma=(1.0, 1.0))
    view = augment_image(image, seed(0), 32, config).numpy()
    original = image.astype(np.float32) / 255
    assert view.std() < 0.8 * original.std()
    np.testing.assert_allclose(view.mean(), original.mean(), atol=0.01)


def test_crop_area_within_scale():
    # Channel 0 is the row and channel 1 the column of each pixel center, divided by 64.
    # Bilinear upscaling keeps these ramps linear and clamps at the crop's edges, so the
    # minimum and maximum of each channel give the crop's first and last pixel.
    size = 64
    centers = (np.arange(size, dtype=np.float32) + 0.5) / size
    image = np.zeros((size, size, 3), np.float32)
    image[..., 0] = centers[:, None]
    image[..., 1] = centers[None, :]
    config = dataclasses.replace(IDENTITY, crop_scale=(0.3, 0.6), crop_ratio=(0.75, 4 / 3))

    crops = set()
    for i in range(30):
        view = augment_image(image, seed(i), size, config).numpy()
        height = round((view[..., 0].max() - view[..., 0].min()) * size) + 1
        width = round((view[..., 1].max() - view[..., 1].min()) * size) + 1
        top = round(view[..., 0].min() * size - 0.5)
        area = height * width / size**2
        assert 0.3 <= area <= 0.6, (height, width)
        # The op rounds width = round(height * ratio), so allow half a pixel.
        assert 0.75 - 0.5 / height <= width / height <= 4 / 3 + 0.5 / height
        crops.add((top, height, width))
    assert len(crops) > 10


def test_config_lists_become_tuples():
    config = AugmentConfig(crop_scale=[0.3, 1.0], crop_ratio=[0.5, 2.0], blur_sigma=[0.1, 1.0])
    assert config.crop_scale == (0.3, 1.0)
    assert config.crop_ratio == (0.5, 2.0)
    assert config.blur_sigma == (0.1, 1.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.6, 0.2)),
        ("crop_scale", (0.2, 1.5)),
        ("crop_scale", (0.2,)),
        ("crop_ratio", (0.0, 1.0)),
        ("crop_ratio", (2.0, 1.0)),
        ("brightness", -0.1),
        ("contrast", float("nan")),
        ("saturation", "0.4"),
        ("hue", 0.6),
        ("color_jitter_prob", 1.5),
        ("grayscale_prob", -0.1),
        ("blur_prob", True),
        ("blur_sigma", (0.0, 2.0)),
        ("flip_prob", 2),
    ],
)
def test_config_invalid_value_names_field(field, value):
    with pytest.raises(ValueError, match=f"AugmentConfig.{field} "):
        AugmentConfig(**{field: value})


def test_augment_image_rejects_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        augment_image(random_images(1)[0], seed(0), 1, AugmentConfig())


def two_view_batches(images, **kwargs):
    options = dict(image_size=32, mean=MEAN, std=STD, batch_size=4, config=AugmentConfig(), seed=0)
    options.update(kwargs)
    dataset = two_view_dataset(tf.data.Dataset.from_tensor_slices(images), **options)
    return dataset, [(q.numpy(), k.numpy()) for q, k in dataset]


def test_two_view_static_shape_drops_remainder():
    dataset, batches = two_view_batches(random_images(10))
    for spec in dataset.element_spec:
        assert spec.shape == (4, 32, 32, 3)
        assert spec.dtype == tf.float32
    assert len(batches) == 2
    for view_q, view_k in batches:
        assert view_q.shape == (4, 32, 32, 3)
        assert view_k.shape == (4, 32, 32, 3)


def test_two_view_keeps_remainder_when_asked():
    _, batches = two_view_batches(random_images(10), drop_remainder=False)
    assert [q.shape[0] for q, _ in batches] == [4, 4, 2]


def test_two_view_drops_labels():
    images = random_images(8)
    labels = np.arange(8, dtype=np.int64)
    dataset = two_view_dataset(
        tf.data.Dataset.from_tensor_slices((images, labels)),
        image_size=16,
        mean=MEAN,
        std=STD,
        batch_size=4,
        config=AugmentConfig(),
        seed=0,
    )
    assert len(dataset.element_spec) == 2
    assert dataset.element_spec[0].shape == (4, 16, 16, 3)


def test_two_view_identity_is_normalized_image():
    images = random_images(8)
    _, batches = two_view_batches(images, config=IDENTITY, shuffle=False)
    expected = numpy_normalize(images)
    view_q = np.concatenate([q for q, _ in batches])
    view_k = np.concatenate([k for _, k in batches])
    np.testing.assert_allclose(view_q, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(view_k, expected, rtol=1e-6, atol=1e-6)


def test_two_view_views_differ():
    _, batches = two_view_batches(random_images(8), shuffle=False)
    for view_q, view_k in batches:
        for q, k in zip(view_q, view_k):
            assert not np.array_equal(q, k)


def test_two_view_same_seed_replays():
    images = random_images(8)
    _, first = two_view_batches(images, seed=5)
    _, second = two_view_batches(images, seed=5)
    for (q1, k1), (q2, k2) in zip(first, second):
        np.testing.assert_array_equal(q1, q2)
        np.testing.assert_array_equal(k1, k2)


def test_two_view_different_seed_differs():
    images = random_images(8)
    _, first = two_view_batches(images, seed=5)
    _, second = two_view_batches(images, seed=6)
    assert not np.array_equal(first[0][0], second[0][0])


def test_two_view_new_views_each_epoch():
    images = random_images(8)
    dataset, first_epoch = two_view_batches(images, shuffle=False)
    second_epoch = [(q.numpy(), k.numpy()) for q, k in dataset]
    assert not np.array_equal(first_epoch[0][0], second_epoch[0][0])


def test_two_view_shuffles_each_epoch():
    # With the identity config each view is the normalized image, so the order shows.
    images = random_images(16)
    dataset, first_epoch = two_view_batches(images, config=IDENTITY, batch_size=16)
    second_epoch = [(q.numpy(), k.numpy()) for q, k in dataset]
    expected = numpy_normalize(images)

    def source_indices(views):
        return [int(np.argmin(np.abs(expected - view).sum(axis=(1, 2, 3)))) for view in views]

    first_order = source_indices(first_epoch[0][0])
    second_order = source_indices(second_epoch[0][0])
    assert sorted(first_order) == list(range(16))
    assert sorted(second_order) == list(range(16))
    assert first_order != second_order
    assert first_order != list(range(16))


def test_two_view_rejects_too_few_images():
    with pytest.raises(ValueError, match="batch_size=16"):
        two_view_batches(random_images(10), batch_size=16)


@pytest.mark.parametrize(
    "name, value",
    [
        ("batch_size", 0),
        ("seed", -1),
        ("shuffle_buffer", 0),
        ("image_size", 0),
        ("std", (1.0, 0.0, 1.0)),
    ],
)
def test_two_view_rejects_bad_argument(name, value):
    with pytest.raises(ValueError, match=name):
        two_view_batches(random_images(8), **{name: value})


def test_eval_dataset_normalizes_keeps_remainder():
    images = random_images(10)
    labels = np.arange(10, dtype=np.int64)
    dataset = eval_dataset(
        tf.data.Dataset.from_tensor_slices((images, labels)),
        image_size=32,
        mean=MEAN,
        std=STD,
        batch_size=4,
    )
    batches = list(dataset.as_numpy_iterator())
    assert [len(batch_labels) for _, batch_labels in batches] == [4, 4, 2]
    assert dataset.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), labels)
    np.testing.assert_allclose(
        np.concatenate([x for x, _ in batches]), numpy_normalize(images), rtol=1e-6, atol=1e-6
    )


def test_eval_dataset_resizes_images_only():
    dataset = eval_dataset(
        tf.data.Dataset.from_tensor_slices(random_images(5, size=40)),
        image_size=24,
        mean=MEAN,
        std=STD,
        batch_size=8,
    )
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 1
    assert batches[0].shape == (5, 24, 24, 3)
    assert batches[0].dtype == np.float32


def test_two_view_dataset_shards_by_data():
    images = tf.data.Dataset.from_tensor_slices(np.zeros([8, 16, 16, 3], np.uint8))
    views = two_view_dataset(
        images, image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4, config=AugmentConfig(), seed=0
    )

    policy = views.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA
