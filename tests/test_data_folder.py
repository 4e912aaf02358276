"""The `folder` data set: class trees, train/val trees and flat folders, with odd files."""

import os

import numpy as np
import PIL.Image
import pytest

from mixco_tf.data import decode, folder, load_dataset, miniature


def test_class_tree_with_odd_files(tmp_path):
    written = miniature.write_image_folder(str(tmp_path), num_classes=3, per_class=10, odd_kinds=miniature.ODD_KINDS)
    (tmp_path / "class_1" / "notes.txt").write_text("not an image")

    splits = load_dataset("folder", str(tmp_path))

    assert splits.num_train + splits.num_test == len(written)
    # 10% of each class is held out: 2 of class 0's 16 files, 1 of each other class's 10.
    assert splits.num_test == 4
    assert splits.class_names == ("class_0", "class_1", "class_2")
    assert splits.train.element_spec[0].shape.as_list() == [None, None, 3]
    examples = list(splits.train.as_numpy_iterator()) + list(splits.test.as_numpy_iterator())
    assert all(image.shape == (24, 24, 3) and image.dtype == np.uint8 for image, _ in examples)
    assert sorted(int(label) for _, label in examples) == sorted(written.values())
    assert splits.image_size == 24


def test_pixels_and_mean_match_pillow(tmp_path):
    written = miniature.write_image_folder(str(tmp_path / "train"), num_classes=2, per_class=3, odd_kinds=("cmyk_jpeg", "rgba_png"))
    miniature.write_image_folder(str(tmp_path / "val"), num_classes=2, per_class=1, seed=1)

    splits = load_dataset("folder", str(tmp_path))

    paths = sorted(written)
    pillow = {name: np.asarray(PIL.Image.open(tmp_path / "train" / name).convert("RGB")) for name in paths}
    decoded = list(splits.train.as_numpy_iterator())
    assert splits.num_train == len(paths)
    assert splits.num_test == 2
    # The loader lists class folders and their files in sorted order.
    ordered = [pillow[name] for name in paths]
    for (image, _), expected in zip(decoded, ordered):
        assert np.abs(image.astype(float) - expected).mean() <= 3.0
    pixels = np.concatenate([image.reshape(-1, 3) for image in pillow.values()]).astype(np.float64) / 255.0
    np.testing.assert_allclose(splits.mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(splits.std, pixels.std(axis=0), rtol=1e-6)


def test_flat_folder_is_unlabeled(tmp_path):
    miniature.write_image_folder(str(tmp_path / "tree"), num_classes=2, per_class=3)
    for path in (tmp_path / "tree").rglob("*.jpg"):
        path.rename(tmp_path / f"{path.parent.name}_{path.name}")
    (tmp_path / "tree").rename(tmp_path / ".hidden")

    splits = load_dataset("folder", str(tmp_path))

    assert splits.unlabeled
    assert (splits.num_train, splits.num_test, splits.num_classes) == (6, 0, 0)
    assert {int(label) for _, label in splits.train.as_numpy_iterator()} == {-1}


def test_skip_bad_files_counts_them(tmp_path):
    miniature.write_image_folder(str(tmp_path), num_classes=2, per_class=4)
    (tmp_path / "class_0" / "empty.jpg").write_bytes(b"")
    (tmp_path / "class_1" / "cut.png").write_bytes(miniature.truncated(miniature.encode_image(miniature.class_image(1, 24, np.random.default_rng(0)), "png")))

    splits = load_dataset("folder", str(tmp_path), skip_bad_files=True)

    assert splits.skipped_files == 2
    assert splits.num_train + splits.num_test == 8
    assert splits.summary()["skipped_files"] == 2


def test_large_train_split_is_cached_in_a_file(tmp_path, monkeypatch):
    miniature.write_image_folder(str(tmp_path / "data"), num_classes=2, per_class=3)
    monkeypatch.setattr(folder, "MEMORY_CACHE_LIMIT_BYTES", 100)

    splits = folder.load_folder(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    first = [image for image, _ in splits.train.as_numpy_iterator()]
    second = [image for image, _ in splits.train.as_numpy_iterator()]

    assert not splits.fits_in_memory
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith("train")]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
