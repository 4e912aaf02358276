"""The `digits` dataset: scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32.

`sklearn.datasets.load_digits()` ships 1,797 real 8x8 grayscale images of the digits 0-9
with pixel values 0-16, so this dataset needs no download. The loader converts them once:

1. scale to uint8 0-255 with `round(x * 255 / 16)`,
2. repeat the channel to RGB,
3. upsample to 32x32 with bilinear `tf.image.resize`, then round and clip to uint8.

Split: one fixed stratified split,
`sklearn.model_selection.train_test_split(test_size=360, stratify=labels, random_state=0)`,
gives 1,437 training and 360 test images, with each digit's share of the test split within
one image of its share of the whole set.
"""

import functools

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mixco_tf.data.registry import DatasetSplits, register_dataset

IMAGE_SIZE = 32
NUM_TEST = 360
SPLIT_SEED = 0

# Per-channel mean and population standard deviation of the 1,437 training images after
# upsampling to 32x32, in [0, 1] units: NumPy float64 over all pixels of `train_arrays()[0] / 255`.
# The three channels are equal because the images are gray.
MEAN = (0.30543386, 0.30543386, 0.30543386)
STD = (0.32355708, 0.32355708, 0.32355708)

CLASS_NAMES = tuple(str(digit) for digit in range(10))


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Converts scikit-learn's digits to 32x32 RGB uint8 and splits them.

    Returns:
        `(train_images, train_labels, test_images, test_labels)`: uint8
        `[1437, 32, 32, 3]`, int64 `[1437]`, uint8 `[360, 32, 32, 3]`, int64 `[360]`.
        The arrays are read-only because the cache shares them between callers.
    """
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., np.newaxis], 3, axis=-1)
    labels = digits.target.astype(np.int64)

    upsampled = tf.image.resize(
        tf.constant(images, tf.float32), (IMAGE_SIZE, IMAGE_SIZE), method="bilinear"
    )
    images = np.clip(np.round(upsampled.numpy()), 0, 255).astype(np.uint8)

    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED
    )
    arrays = (
        images[train_index],
        labels[train_index],
        images[test_index],
        labels[test_index],
    )
    for array in arrays:
        array.flags.writeable = False
    return arrays


@register_dataset("digits")
def load(data_dir=None, skip_bad_files=False) -> DatasetSplits:
    """Loads the digits splits. Both arguments are ignored because the data ships with scikit-learn."""
    del data_dir, skip_bad_files
    train_images, train_labels, test_images, test_labels = load_digits_arrays()
    return DatasetSplits(
        name="digits",
        train=tf.data.Dataset.from_tensor_slices((train_images, train_labels)),
        test=tf.data.Dataset.from_tensor_slices((test_images, test_labels)),
        num_train=len(train_labels),
        num_test=len(test_labels),
        num_classes=len(CLASS_NAMES),
        image_size=IMAGE_SIZE,
        mean=MEAN,
        std=STD,
        class_names=CLASS_NAMES,
        train_numpy=(train_images, train_labels),
        test_numpy=(test_images, test_labels),
    )
