"""Dataset registry. Importing this package registers every bundled loader."""

from mixco_tf.data import digits
from mixco_tf.data.registry import (
    DatasetSplits,
    available_datasets,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DatasetSplits",
    "available_datasets",
    "digits",
    "load_dataset",
    "register_dataset",
]
