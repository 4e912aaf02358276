"""CIFAR-10/100 through TFDS's own builders, on archives in the real binary format."""

import os
import shutil

import numpy as np
import pytest
from tensorflow_datasets.core.download import download_manager

from mixco_tf.data import cifar, load_dataset, miniature


def _sorted_by_bytes(images, labels):
    order = sorted(range(len(labels)), key=lambda i: images[i].tobytes())
    return np.stack([images[i] for i in order]), np.asarray([labels[i] for i in order])


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_real_builder_reads_written_archive(tmp_path, name, num_classes):
    written = miniature.write_cifar_archive(str(tmp_path), name, train_per_file=4, num_test=6)

    splits = cifar.load_cifar(name, str(tmp_path), verify_checksums=False)

    assert (splits.num_train, splits.num_test) == (len(written["train"][1]), 6)
    assert splits.num_classes == num_classes
    assert splits.image_size == 32
    for split, dataset in (("train", splits.train), ("test", splits.test)):
        examples = list(dataset.as_numpy_iterator())
        images = np.stack([image for image, _ in examples])
        labels = [int(label) for _, label in examples]
        # TFDS stores the records in a hashed order, so compare them as sets of pairs.
        got_images, got_labels = _sorted_by_bytes(images, labels)
        want_images, want_labels = _sorted_by_bytes(list(written[split][0]), list(written[split][1]))
        np.testing.assert_array_equal(got_images, want_images)
        np.testing.assert_array_equal(got_labels, want_labels)
    prefix = "class_" if name == "cifar10" else "fine_"
    assert splits.class_names[:2] == (f"{prefix}0", f"{prefix}1")


def test_prepared_copy_loads_offline(tmp_path, monkeypatch):
    miniature.write_cifar_archive(str(tmp_path / "elsewhere"), "cifar10")
    cifar.load_cifar("cifar10", str(tmp_path / "elsewhere"), verify_checksums=False)
    shutil.copytree(tmp_path / "elsewhere" / "cifar10", tmp_path / "here" / "cifar10")
    # Any network call would go to a closed port on this machine and fail.
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")

    splits = load_dataset("cifar10", str(tmp_path / "here"))

    assert splits.num_train == 20
    assert splits.mean == cifar.CIFAR10_MEAN


def test_registered_checksum_is_verified(tmp_path):
    miniature.write_cifar_archive(str(tmp_path), "cifar10")

    # The miniature archive is not the real one, so TFDS's registered checksum rejects it.
    with pytest.raises(download_manager.NonMatchingChecksumError):
        load_dataset("cifar10", str(tmp_path))
    assert not os.path.exists(tmp_path / "cifar10" / "3.0.2" / "dataset_info.json")
