"""The augmentation preview: real views, real mixing, the figure and the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import preview
from mixco_tf.augment import AugmentConfig
from mixco_tf.config import Config
from mixco_tf.data import load_dataset
from mixco_tf.models.mixing import mix_halves

IMAGE_SIZE = 16
AUGMENT = AugmentConfig(crop_scale=(0.4, 1.0), blur_prob=0.0, flip_prob=0.0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _sampler(digits, **overrides):
    settings = dict(image_size=IMAGE_SIZE, augment_config=AUGMENT, num_pairs=3, seed=7, start=5)
    settings.update(overrides)
    return preview.PreviewSampler(digits, **settings)


def _png_shape(path):
    return tuple(tf.io.decode_png(tf.io.read_file(str(path))).shape)


def test_batch_shapes_and_originals(digits):
    batch = _sampler(digits).sample(mix_seed=1)

    train_images, _ = digits.train_arrays()
    np.testing.assert_array_equal(batch.originals, train_images[5:11])
    assert batch.view_q.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch.view_k.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch.mixed.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch.num_pairs == 3
    for views in (batch.view_q, batch.view_k, batch.mixed):
        assert views.min() >= 0.0
        assert views.max() <= 1.0


def test_mixed_is_lam_weighted_query_views(digits):
    batch = _sampler(digits).sample(mix_seed=2)

    lam = batch.lam[:, None, None, None]
    expected = lam * batch.view_q[:3] + (1.0 - lam) * batch.view_q[3:]
    np.testing.assert_allclose(batch.mixed, expected, atol=1e-5)


def test_lam_comes_from_mix_halves(digits):
    batch = _sampler(digits).sample(mix_seed=9)

    _, lam = mix_halves(tf.zeros([6, IMAGE_SIZE, IMAGE_SIZE, 3]), seed=9)

    np.testing.assert_array_equal(batch.lam, lam.numpy())
    assert np.all((batch.lam >= 0.0) & (batch.lam <= 1.0))


def test_query_and_key_views_differ(digits):
    batch = _sampler(digits).sample()

    assert not np.allclose(batch.view_q, batch.view_k)


def test_sampling_again_draws_new_views(digits):
    sampler = _sampler(digits)

    first, second = sampler.sample(mix_seed=0), sampler.sample(mix_seed=0)

    np.testing.assert_array_equal(first.originals, second.originals)
    np.testing.assert_array_equal(first.lam, second.lam)
    assert not np.allclose(first.view_q, second.view_q)


def test_same_seed_gives_same_batch(digits):
    first = _sampler(digits).sample(mix_seed=3)
    second = _sampler(digits).sample(mix_seed=3)

    np.testing.assert_array_equal(first.view_q, second.view_q)
    np.testing.assert_array_equal(first.view_k, second.view_k)
    np.testing.assert_array_equal(first.mixed, second.mixed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_pairs": 0}, "Invalid num_pairs=0"),
        ({"start": -1}, "Invalid start=-1"),
        ({"start": 1433}, "fewer than start=1433 \\+ 2 \\* num_pairs=6"),
    ],
)
def test_invalid_sampler_arguments_rejected(digits, overrides, message):
    with pytest.raises(ValueError, match=message):
        _sampler(digits, **overrides)


def test_figure_size_formula():
    # 7 columns of 1.2 inches; rows of 1.2 inches plus 0.5 inches of titles; 100 dpi.
    assert preview.figure_size_pixels(4) == (840, 530)
    assert preview.figure_size_pixels(1) == (840, 170)


def test_preview_figure_saves_png_of_expected_size(digits, tmp_path):
    figure = preview.preview_figure(digits, image_size=IMAGE_SIZE, augment_config=AUGMENT, num_pairs=2)
    path = tmp_path / "preview.png"

    figure.savefig(path, dpi=preview.DPI)

    width, height = preview.figure_size_pixels(2)
    assert _png_shape(path) == (height, width, 4)


def test_write_preview_ignores_earlier_global_seed(digits, tmp_path):
    """TensorFlow's global seed changes the views, so write_preview sets it to config.seed."""
    config = Config(seed=3)
    paths = []
    for global_seed in (1, 2):
        tf.random.set_seed(global_seed)
        paths.append(preview.write_preview(config, str(tmp_path / f"after-{global_seed}.png"), num_pairs=2, splits=digits))

    first, second = (tf.io.decode_png(tf.io.read_file(path)).numpy() for path in paths)
    np.testing.assert_array_equal(first, second)


def _run_preview(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "mixco_tf.preview", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def test_cli_writes_png(tmp_path):
    output = tmp_path / "out" / "preview.png"

    result = _run_preview(["--dataset=digits", f"--output={output}", "--num_pairs=3"], tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    width, height = preview.figure_size_pixels(3)
    assert _png_shape(output) == (height, width, 4)
    assert "Wrote the preview of digits" in result.stderr


def test_cli_rejects_unknown_dataset(tmp_path):
    result = _run_preview(["--dataset=cifar11", f"--output={tmp_path / 'p.png'}"], tmp_path)

    assert result.returncode == 2
    assert "cifar11" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_cli_requires_output(tmp_path):
    result = _run_preview(["--dataset=digits"], tmp_path)

    assert result.returncode != 0
    assert "--output" in result.stderr
