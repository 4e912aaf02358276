"""Dataset registry. Importing this package registers every bundled loader."""

from mixco_tf.data import cifar, digits, folder, tiny_imagenet
from mixco_tf.data.registry import (
    DatasetSplits,
    available_datasets,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DatasetSplits",
    "available_datasets",
    "cifar",
    "digits",
    "folder",
    "load_dataset",
    "register_dataset",
    "tiny_imagenet",
]
