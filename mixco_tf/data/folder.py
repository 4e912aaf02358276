"""The `folder` dataset: your own images in a class tree or a flat folder.

`--dataset=folder --data_dir=ROOT` accepts three layouts:

- `ROOT/train/<class>/...` and optionally `ROOT/val/<class>/...` (or `test/`,
  `validation/`): the splits as given.
- `ROOT/<class>/...`: every class folder contributes a fixed 10% of its files (at least
  one when it has two or more) to the test split, chosen with a seeded shuffle.
- `ROOT/*.jpg`, images directly in ROOT: one unlabeled train split for label-free
  pretraining (labels -1, no test split, so the run skips evaluation).

Class names are the sorted folder names, and labels are their indices. Images are
found recursively below each class folder by extension (`IMAGE_EXTENSIONS`, any case)
and decoded by content, see `mixco_tf.data.decode`. Other files are ignored and counted.

Every file is decoded once when the data set loads: that pass finds bad files before
training and measures the per-channel mean and std of the train split. Train images are
decoded again in the tf.data pipeline. When they fit in `MEMORY_CACHE_LIMIT_BYTES`, the
training pipeline caches them in memory. Larger sets are cached in a file below
`cache_dir`. Either way the pipeline decodes each train image once per run.
"""

import hashlib
import logging
import os
import tempfile
from typing import Optional

import numpy as np
import tensorflow as tf

from mixco_tf.data import decode
from mixco_tf.data.registry import DatasetSplits, register_dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
SPLIT_FOLDERS_TRAIN = ("train",)
SPLIT_FOLDERS_TEST = ("val", "validation", "test")
TEST_FRACTION = 0.1
SPLIT_SEED = 0
# Decoded train images up to this size are cached in memory by the training pipeline.
MEMORY_CACHE_LIMIT_BYTES = 4 * 2**30


class FolderLayoutError(ValueError):
    """An image folder whose layout the `folder` data set cannot read."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: str) -> tuple[list[str], int]:
    """Returns the sorted image paths below `folder` (recursive) and the count of other files."""
    images, ignored = [], 0
    for parent, subfolders, names in os.walk(folder):
        subfolders.sort()
        for name in sorted(names):
            if _is_image(name):
                images.append(os.path.join(parent, name))
            else:
                ignored += 1
    return images, ignored


def _class_folders(root: str) -> list[str]:
    return sorted(
        name for name in os.listdir(root) if not name.startswith(".") and os.path.isdir(os.path.join(root, name))
    )


def _read_class_tree(root: str, class_names: Optional[list] = None) -> tuple[list, list, list]:
    """Lists `root/<class>/...` images; returns `(paths, labels, class_names)`."""
    found = _class_folders(root)
    if class_names is None:
        class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise FolderLayoutError(
            f"Class folder(s) {unknown} in {root!r} are not classes of the train split "
            f"({len(class_names)} classes). Every split needs the same class folders."
        )
    paths, labels, ignored = [], [], 0
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        images, ignored_here = _list_images(folder)
        ignored += ignored_here
        if not images:
            raise FolderLayoutError(
                f"Class folder {folder!r} contains no image files (extensions {list(IMAGE_EXTENSIONS)}). "
                "Add images or remove the folder."
            )
        paths += images
        labels += [label] * len(images)
    if ignored:
        logger.info("Ignored %d files without an image extension below %s", ignored, root)
    return paths, labels, class_names


def _hold_out_test(paths: list, labels: list) -> tuple[list, list, list, list]:
    """Moves a seeded `TEST_FRACTION` of each class's files to a test split."""
    rng = np.random.default_rng(SPLIT_SEED)
    labels_array = np.asarray(labels)
    test_index = []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        if len(members) < 2:
            continue
        count = max(1, int(round(TEST_FRACTION * len(members))))
        test_index += list(rng.permutation(members)[:count])
    is_test = np.zeros(len(paths), bool)
    is_test[test_index] = True
    train = [(p, l) for p, l, t in zip(paths, labels, is_test) if not t]
    test = [(p, l) for p, l, t in zip(paths, labels, is_test) if t]
    return [p for p, _ in train], [l for _, l in train], [p for p, _ in test], [l for _, l in test]


def _find_layout(root: str):
    """Returns `(train_paths, train_labels, test_paths, test_labels, class_names)`."""
    if not os.path.isdir(root):
        raise FolderLayoutError(
            f"data_dir={root!r} is not a folder. For dataset=folder pass --data_dir=ROOT, a folder "
            "with one subfolder of images per class, or with the images themselves."
        )
    entries = [name for name in os.listdir(root) if not name.startswith(".")]
    subfolders = _class_folders(root)
    top_images = sorted(name for name in entries if _is_image(name) and os.path.isfile(os.path.join(root, name)))

    train_folder = next((name for name in SPLIT_FOLDERS_TRAIN if name in subfolders), None)
    if train_folder is not None:
        train_paths, train_labels, class_names = _read_class_tree(os.path.join(root, train_folder))
        test_folder = next((name for name in SPLIT_FOLDERS_TEST if name in subfolders), None)
        test_paths, test_labels = [], []
        if test_folder is not None:
            test_paths, test_labels, _ = _read_class_tree(os.path.join(root, test_folder), class_names)
        return train_paths, train_labels, test_paths, test_labels, class_names
    if subfolders and top_images:
        raise FolderLayoutError(
            f"Folder {root!r} contains both class folders ({subfolders[:3]}) and images at its top "
            f"level ({top_images[:3]}). Move the images into class folders for labeled data, or "
            "the folders' images into ROOT for label-free pretraining."
        )
    if subfolders:
        paths, labels, class_names = _read_class_tree(root)
        return (*_hold_out_test(paths, labels), class_names)
    if top_images:
        paths = [os.path.join(root, name) for name in top_images]
        return paths, [-1] * len(paths), [], [], []
    raise FolderLayoutError(
        f"Folder {root!r} contains no images and no class folders (image extensions: "
        f"{list(IMAGE_EXTENSIONS)}). Put images in ROOT/<class>/ or directly in ROOT."
    )


def _decode_path(path, label):
    return decode.decode_image(tf.io.read_file(path)), label


def image_files_dataset(paths: list, labels: list) -> tf.data.Dataset:
    """Builds a dataset of `(image, label)` from files: uint8 `[height, width, 3]`, int64 scalar.

    Files are read and decoded in parallel, in order.
    """
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int64))
    )
    return dataset.map(_decode_path, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def default_cache_dir(root: str) -> str:
    """Returns the file-cache folder of a large image folder: one per absolute root path."""
    digest = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "mixco_tf_cache", f"folder-{digest}")


def load_folder(
    root: str, *, skip_bad_files: bool = False, cache_dir: Optional[str] = None, name: str = "folder"
) -> DatasetSplits:
    """Loads an image folder, see the module docstring for the layouts.

    Args:
        root: the folder.
        skip_bad_files: leave out files that cannot be decoded and count them, instead
            of raising an error naming them.
        cache_dir: folder for the decoded-image cache of large train splits; None uses
            `default_cache_dir(root)`.
        name: the data set name recorded in the splits.

    Returns:
        `DatasetSplits` with uint8 images of their original sizes. `image_size` is the
        median shorter side of the train images, and `mean`/`std` are measured on them.

    Raises:
        FolderLayoutError: if `root` is missing, empty or mixes layouts, or a class
            folder is empty.
        mixco_tf.data.decode.BadImageFilesError: if a file cannot be decoded and
            `skip_bad_files` is False.
    """
    train_paths, train_labels, test_paths, test_labels, class_names = _find_layout(root)
    unlabeled = not class_names

    train_check = decode.check_image_files(
        train_paths, skip_bad_files=skip_bad_files, description=f"the train split of folder {root!r}"
    )
    test_check = decode.check_image_files(
        test_paths, skip_bad_files=skip_bad_files, description=f"the test split of folder {root!r}"
    )
    if not train_check.good_paths:
        raise FolderLayoutError(f"Folder {root!r} has no decodable training images; see the warnings above.")
    train_labels = _labels_of(train_check, train_paths, train_labels)
    test_labels = _labels_of(test_check, test_paths, test_labels)

    mean, std = train_check.mean_std()
    image_size = int(np.median([min(size) for size in train_check.sizes]))
    fits_in_memory = train_check.decoded_bytes <= MEMORY_CACHE_LIMIT_BYTES
    train = image_files_dataset(train_check.good_paths, train_labels)
    if not fits_in_memory:
        cache_dir = cache_dir or default_cache_dir(root)
        os.makedirs(cache_dir, exist_ok=True)
        logger.info(
            "The decoded train images take %.1f GiB, more than the %.0f GiB memory cache; caching them in %s",
            train_check.decoded_bytes / 2**30,
            MEMORY_CACHE_LIMIT_BYTES / 2**30,
            cache_dir,
        )
        train = train.cache(os.path.join(cache_dir, "train"))
    return DatasetSplits(
        name=name,
        train=train,
        test=image_files_dataset(test_check.good_paths, test_labels),
        num_train=len(train_check.good_paths),
        num_test=len(test_check.good_paths),
        num_classes=len(class_names),
        image_size=image_size,
        mean=mean,
        std=std,
        class_names=tuple(class_names),
        skipped_files=len(train_check.bad_files) + len(test_check.bad_files),
        fits_in_memory=fits_in_memory,
        unlabeled=unlabeled,
    )


def _labels_of(check: decode.ImageFileCheck, paths: list, labels: list) -> list:
    label_of = dict(zip(paths, labels))
    return [label_of[path] for path in check.good_paths]


@register_dataset("folder")
def load(data_dir=None, skip_bad_files=False) -> DatasetSplits:
    """Loads the image folder `data_dir`; see `load_folder`."""
    if not data_dir:
        raise FolderLayoutError(
            "dataset=folder needs data_dir: pass --data_dir=ROOT, a folder with one subfolder "
            "of images per class (or with the images themselves, for label-free pretraining)."
        )
    return load_folder(data_dir, skip_bad_files=skip_bad_files)
