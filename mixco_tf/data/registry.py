"""Dataset registry: named loaders that return train and test splits as tf.data pipelines.

A loader is a function `loader(data_dir, skip_bad_files=False) -> DatasetSplits`
registered under a name with `@register_dataset("name")`. `load_dataset("name")` calls it.
A loader that reads image files decodes each of them before it returns (see
`mixco_tf.data.decode`), so a bad file stops a run before training starts. To add a dataset, write a
module with a registered loader and import it in `mixco_tf/data/__init__.py`.
"""

import dataclasses
import logging
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

Loader = Callable[..., "DatasetSplits"]

_LOADERS: dict[str, Loader] = {}


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """Train and test splits of one dataset, with the facts needed to train on it.

    Attributes:
        name: registry name of the dataset.
        train: dataset of `(image, label)`, image uint8 `[height, width, 3]`, label int64
            scalar.
        test: dataset of `(image, label)`, same element spec as `train`.
        num_train: number of training examples.
        num_test: number of test examples.
        num_classes: number of classes, labels are in `[0, num_classes)`.
        image_size: native side length of the images, in pixels.
        mean: per-channel mean of the training images in [0, 1] units (R, G, B).
        std: per-channel standard deviation of the training images in [0, 1] units.
        class_names: name of each class, indexed by label.
        train_numpy: `(images, labels)` of the train split when the dataset lives in
            memory, else None. Read-only arrays, prefer `train_arrays()`.
        test_numpy: `(images, labels)` of the test split, as `train_numpy`.
        skipped_files: image files left out because they cannot be decoded (only with
            `skip_bad_files=True`; 0 otherwise).
        fits_in_memory: whether the decoded train split fits the in-memory cache of the
            training pipeline. False for large image folders, which the loader caches
            in a file instead.
        unlabeled: True when the data has no labels (a flat image folder). Labels are
            then -1 and `num_classes` is 0.
    """

    name: str
    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    train_numpy: Optional[tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default=None, repr=False, compare=False
    )
    test_numpy: Optional[tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default=None, repr=False, compare=False
    )
    skipped_files: int = 0
    fits_in_memory: bool = True
    unlabeled: bool = False

    def summary(self) -> dict:
        """Returns the facts about the data that results.json records."""
        return {
            "name": self.name,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "skipped_files": self.skipped_files,
        }

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the train split as NumPy arrays.

        Returns:
            `(images, labels)`: uint8 `[num_train, height, width, 3]` and int64
            `[num_train]`. In-memory datasets return their stored read-only arrays.
            Others are read through `train` once, which needs the whole split in memory
            and equal image sizes.
        """
        if self.train_numpy is not None:
            return self.train_numpy
        return _dataset_to_arrays(self.train)

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the test split as NumPy arrays, like `train_arrays()`."""
        if self.test_numpy is not None:
            return self.test_numpy
        return _dataset_to_arrays(self.test)


def _dataset_to_arrays(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for image, label in dataset.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Registers a loader under `name`; used as a decorator.

    Args:
        name: the name that `load_dataset` and the `dataset` config key accept.

    Returns:
        A decorator that stores the loader and returns it unchanged.

    Raises:
        ValueError: if `name` is already registered.
    """

    def decorator(loader: Loader) -> Loader:
        if name in _LOADERS:
            raise ValueError(
                f"Dataset name {name!r} is already registered by {_LOADERS[name].__module__}. "
                "Choose another name for the new loader."
            )
        _LOADERS[name] = loader
        return loader

    return decorator


def available_datasets() -> tuple[str, ...]:
    """Returns the registered dataset names, sorted."""
    return tuple(sorted(_LOADERS))


def load_dataset(
    name: str, data_dir: Optional[str] = None, skip_bad_files: bool = False
) -> DatasetSplits:
    """Loads the train and test splits of a registered dataset.

    Args:
        name: a registered name, see `available_datasets()`.
        data_dir: folder where the loader finds or downloads its files. Loaders of
            bundled datasets ignore it. None lets the loader pick its default.
        skip_bad_files: leave out image files that cannot be decoded and count them in
            `DatasetSplits.skipped_files`, instead of raising an error naming them.

    Returns:
        The dataset's `DatasetSplits`.

    Raises:
        ValueError: if `name` is not registered, or (from the loader) if files are
            missing or cannot be decoded; the message names the file and the fix.
    """
    if name not in _LOADERS:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(available_datasets())}."
        )
    logger.info("Loading dataset %s (data_dir=%s)", name, data_dir)
    splits = _LOADERS[name](data_dir, skip_bad_files=skip_bad_files)
    logger.info(
        "Loaded dataset %s: %d train and %d test images, %d classes, %dx%d pixels, %d files skipped",
        name,
        splits.num_train,
        splits.num_test,
        splits.num_classes,
        splits.image_size,
        splits.image_size,
        splits.skipped_files,
    )
    return splits
