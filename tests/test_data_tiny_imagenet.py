"""The Tiny ImageNet TFDS builder on a miniature tiny-imagenet-200.zip in the real layout."""

import os
import shutil
import zipfile

import numpy as np
import pytest

from mixco_tf.data import decode, load_dataset, miniature, tiny_imagenet

ODD_KINDS = miniature.ODD_KINDS


def _nearest_class(image):
    """Returns the label whose class colour is closest to the image's mean colour."""
    colors = np.stack([miniature.class_color(label) for label in range(len(miniature.TINY_WNIDS))]).astype(float)
    mean = image.reshape(-1, 3).astype(float).mean(axis=0)
    return int(np.argmin(np.abs(colors - mean).sum(axis=1)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tiny")
    expected = miniature.write_tiny_imagenet_zip(
        str(data_dir / "tiny-imagenet-200.zip"), num_classes=3, train_per_class=4, val_per_class=2, odd_kinds=ODD_KINDS
    )
    return data_dir, expected, load_dataset("tiny_imagenet", str(data_dir))


def test_split_sizes_count_every_image(prepared):
    _, expected, splits = prepared

    assert splits.num_train == len(expected["train"]) == 3 * 4 + len(ODD_KINDS)
    assert splits.num_test == len(expected["validation"]) == 3 * 2
    assert len(list(splits.train)) == splits.num_train
    assert len(list(splits.test)) == splits.num_test
    assert splits.skipped_files == 0


def test_images_are_rgb_uint8_64(prepared):
    _, _, splits = prepared

    assert splits.train.element_spec[0].shape.as_list() == [64, 64, 3]
    assert splits.train.element_spec[0].dtype.name == "uint8"
    assert splits.train.element_spec[1].dtype.name == "int64"
    assert splits.image_size == 64


def test_labels_follow_wnids_order(prepared):
    _, expected, splits = prepared

    for dataset, name in ((splits.train, "train"), (splits.test, "validation")):
        examples = list(dataset.as_numpy_iterator())
        labels = [int(label) for _, label in examples]
        # The grayscale JPEG has lost its class colour, so only coloured images are checked.
        coloured = [(image, int(label)) for image, label in examples if np.ptp(image.mean(axis=(0, 1))) > 10]
        assert len(coloured) == len(examples) - (name == "train")
        assert [label for _, label in coloured] == [_nearest_class(image) for image, _ in coloured], name
        assert sorted(labels) == sorted(expected[name].values()), name


def test_class_names_come_from_words_txt(prepared):
    _, expected, splits = prepared

    assert splits.num_classes == 3
    assert splits.class_names == ("class 0 name, synonym 0", "class 1 name, synonym 1", "class 2 name, synonym 2")


def test_boxes_and_test_images_stay_out(prepared):
    data_dir, _, _ = prepared
    builder = tiny_imagenet.TinyImagenet(data_dir=str(data_dir))
    ids = [example["id"].decode() for split in ("train", "validation") for example in builder.as_dataset(split=split).as_numpy_iterator()]

    assert not [key for key in ids if key.startswith("test/") or key.endswith(".txt")]
    assert len(ids) == len(set(ids))


def test_mean_std_measured_on_train_images(prepared):
    data_dir, expected, splits = prepared
    with zipfile.ZipFile(data_dir / "tiny-imagenet-200.zip") as archive:
        images = [decode.decode_image_bytes(archive.read("tiny-imagenet-200/" + name)) for name in expected["train"]]
    pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(np.float64) / 255.0

    np.testing.assert_allclose(splits.mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(splits.std, pixels.std(axis=0), rtol=1e-6)


def test_prepared_copy_loads_without_archive(prepared, tmp_path):
    data_dir, _, splits = prepared
    copy = tmp_path / "copy"
    shutil.copytree(data_dir / "tiny_imagenet", copy / "tiny_imagenet")

    reloaded = load_dataset("tiny_imagenet", str(copy))

    assert reloaded.num_train == splits.num_train
    assert reloaded.mean == splits.mean
    assert reloaded.class_names == splits.class_names


@pytest.mark.parametrize("where", ["data_dir", "manual_dir", "folder_itself"])
def test_extracted_folder_is_accepted(tmp_path, where):
    archive = tmp_path / "tiny-imagenet-200.zip"
    expected = miniature.write_tiny_imagenet_zip(str(archive), num_classes=2, train_per_class=2, val_per_class=1)
    source = {"data_dir": tmp_path / "data", "manual_dir": tmp_path / "data" / "downloads" / "manual"}.get(where)
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(source or tmp_path)
    data_dir = tmp_path / "data" if source else tmp_path / "tiny-imagenet-200"

    splits = load_dataset("tiny_imagenet", str(data_dir))

    assert (splits.num_train, splits.num_test) == (len(expected["train"]), len(expected["validation"]))


def test_skipped_files_are_counted_and_remembered(tmp_path):
    bad = {"empty.JPEG": b"", "cut.JPEG": miniature.truncated(miniature.encode_image(miniature.class_image(0, 64, np.random.default_rng(0))))}
    expected = miniature.write_tiny_imagenet_zip(
        str(tmp_path / "tiny-imagenet-200.zip"), num_classes=2, train_per_class=2, val_per_class=1, bad_train_files=bad
    )

    splits = load_dataset("tiny_imagenet", str(tmp_path), skip_bad_files=True)
    assert splits.skipped_files == 2
    assert splits.num_train == len(expected["train"])

    # The prepared copy lacks the bad files, so a strict run must not use it silently.
    with pytest.raises(decode.BadImageFilesError, match="skip_bad_files=true"):
        load_dataset("tiny_imagenet", str(tmp_path))
    assert load_dataset("tiny_imagenet", str(tmp_path), skip_bad_files=True).skipped_files == 2


def test_image_of_wrong_size_is_named(tmp_path):
    wrong = miniature.encode_image(miniature.class_image(0, 32, np.random.default_rng(0)))
    miniature.write_tiny_imagenet_zip(str(tmp_path / "tiny-imagenet-200.zip"), num_classes=1, train_per_class=1, bad_train_files={"small.JPEG": wrong})

    with pytest.raises(decode.BadImageFilesError, match=r"small\.JPEG.*32x32, expected 64x64"):
        load_dataset("tiny_imagenet", str(tmp_path))
    assert not os.path.exists(tmp_path / "tiny_imagenet" / "1.0.0")
