"""Decoding by content: odd real-world files, CMYK colours, bad files, the pre-training check."""

import io
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from mixco_tf.data import decode, miniature


def _photo_like(size=64, seed=0):
    """Returns a uint8 `[size, size, 3]` image with smooth gradients and some texture."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    image = np.stack([*np.meshgrid(ramp, ramp[::-1]), np.full((size, size), 120.0)], axis=-1)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _pillow_rgb(contents):
    with PIL.Image.open(io.BytesIO(contents)) as image:
        image.seek(0)
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("kind", miniature.ODD_KINDS)
def test_odd_kind_decodes_like_pillow(kind):
    contents = miniature.encode_image(_photo_like(), kind)
    expected = _pillow_rgb(contents).astype(float)

    in_graph = decode.decode_image(tf.constant(contents)).numpy()
    with_pillow = decode.decode_image_bytes(contents)

    assert in_graph.shape == (64, 64, 3)
    assert in_graph.dtype == np.uint8
    assert with_pillow.shape == (64, 64, 3)
    assert np.abs(in_graph - expected).mean() <= 3.0
    assert np.array_equal(with_pillow, expected.astype(np.uint8))


def test_cmyk_jpeg_matches_pillow_rgb_conversion():
    original = _photo_like(seed=1)
    contents = miniature.encode_image(original, "cmyk_jpeg")
    assert PIL.Image.open(io.BytesIO(contents)).mode == "CMYK"

    decoded = decode.decode_image(tf.constant(contents)).numpy().astype(float)
    pillow = _pillow_rgb(contents).astype(float)

    assert np.abs(decoded - pillow).mean() <= 3.0
    # The colours are the image's, not inverted or channel-swapped.
    assert np.abs(decoded - original.astype(float)).mean() <= 12.0


def test_gif_under_jpeg_name_gives_first_frame():
    first = _photo_like(seed=2)
    contents = miniature.encode_image(first, "gif_as_jpeg")

    decoded = decode.decode_image(tf.constant(contents)).numpy().astype(float)

    # The second frame is the negative image, so its mean difference would be near 128.
    assert np.abs(decoded - first.astype(float)).mean() < 20.0


def test_decode_in_dataset_map_has_static_rank_3():
    contents = [miniature.encode_image(_photo_like(), kind) for kind in ("jpeg", "cmyk_jpeg", "palette_png")]
    dataset = tf.data.Dataset.from_tensor_slices(contents).map(decode.decode_image)

    assert dataset.element_spec.shape.as_list() == [None, None, 3]
    assert dataset.element_spec.dtype == tf.uint8
    assert [image.shape for image in dataset.as_numpy_iterator()] == [(64, 64, 3)] * 3


@pytest.mark.parametrize(
    "contents, reason",
    [
        (b"", "empty"),
        (miniature.truncated(miniature.encode_image(_photo_like(), "jpeg")), "truncated"),
        (miniature.truncated(miniature.encode_image(_photo_like(), "png")), "truncated"),
        (b"this is not an image\n", "cannot identify"),
    ],
    ids=["empty", "truncated_jpeg", "truncated_png", "text"],
)
def test_bad_bytes_raise_with_path(contents, reason):
    with pytest.raises(decode.BadImageError, match=reason) as raised:
        decode.decode_image_bytes(contents, "/data/cat/img_7.JPEG")
    assert "/data/cat/img_7.JPEG" in str(raised.value)


def _write(folder, name, contents):
    path = os.path.join(folder, name)
    with open(path, "wb") as stream:
        stream.write(contents)
    return path


def test_check_image_files_names_bad_files(tmp_path):
    good = _write(tmp_path, "good.jpg", miniature.encode_image(_photo_like(), "jpeg"))
    empty = _write(tmp_path, "empty.jpg", b"")
    cut = _write(tmp_path, "cut.png", miniature.truncated(miniature.encode_image(_photo_like(), "png")))

    with pytest.raises(decode.BadImageFilesError) as raised:
        decode.check_image_files([good, empty, cut], skip_bad_files=False, description="the test files")

    message = str(raised.value)
    assert "2 image file(s) of the test files" in message
    assert empty in message
    assert cut in message
    assert good not in message
    assert "--skip_bad_files=true" in message


def test_check_image_files_skips_and_measures(tmp_path):
    images = [_photo_like(seed=seed, size=16 + 8 * seed) for seed in range(3)]
    paths = [_write(tmp_path, f"{index}.png", miniature.encode_image(image, "png")) for index, image in enumerate(images)]
    bad = _write(tmp_path, "zero.jpg", b"")

    check = decode.check_image_files([paths[0], bad, *paths[1:]], skip_bad_files=True, description="x")

    assert check.good_paths == paths
    assert check.bad_files == [(bad, "the file is empty (0 bytes)")]
    assert check.sizes == [image.shape[:2] for image in images]
    pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(np.float64) / 255.0
    mean, std = check.mean_std()
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-6)
    assert check.decoded_bytes == pixels.size
