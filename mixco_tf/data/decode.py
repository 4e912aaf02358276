"""Image decoding by content, to RGB uint8, for files as they occur in real data sets.

Real image collections contain files whose name does not match their content. Some
are grayscale or CMYK JPEGs, RGBA or palette PNGs, or PNGs and GIFs saved under a `.JPEG`
name (ImageNet's train set has CMYK JPEGs and a PNG named `.JPEG`). Others are
truncated or empty, left by failed downloads. Every decoder here looks at the bytes, not the file name, and returns
`[height, width, 3]` uint8 RGB:

- grayscale and grayscale-with-alpha are repeated to three channels,
- the alpha channel of RGBA and LA images is dropped (not composited),
- palette images are expanded to their RGB colours,
- animated GIFs give their first frame,
- CMYK JPEGs are converted by Pillow. On a noisy test image TensorFlow's own CMYK
  conversion differed from Pillow's by 3.2 levels on average and 16 at most, so
  `decode_image` sends CMYK JPEGs through Pillow.

`check_image_files` decodes every file once before training, so that a bad file stops
the run with its path instead of failing an epoch hours later.
"""

import concurrent.futures
import dataclasses
import io
import logging
import os
from typing import Optional, Sequence

import numpy as np
import PIL.Image
import tensorflow as tf

logger = logging.getLogger(__name__)

# Bad files listed by name in an error message; the rest are counted.
MAX_LISTED_BAD_FILES = 10


class BadImageError(ValueError):
    """An image file that cannot be decoded: empty, truncated or not an image."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Cannot decode image file {path!r}: {reason}")
        self.path = path
        self.reason = reason


class BadImageFilesError(ValueError):
    """One or more image files of a data set cannot be decoded."""


@dataclasses.dataclass
class ImageFileCheck:
    """Result of `check_image_files`.

    Attributes:
        good_paths: the decodable files, in input order.
        bad_files: `(path, reason)` of each file that cannot be decoded.
        sizes: `(height, width)` of each good file, in the order of `good_paths`.
        channel_sum: float64 `[3]`, sum of each RGB channel over all good pixels, in
            [0, 1] units.
        channel_sum_squares: float64 `[3]`, sum of squares of the same values.
    """

    good_paths: list
    bad_files: list
    sizes: list
    channel_sum: np.ndarray
    channel_sum_squares: np.ndarray

    @property
    def num_pixels(self) -> int:
        return int(sum(height * width for height, width in self.sizes))

    @property
    def decoded_bytes(self) -> int:
        """Bytes that the decoded uint8 RGB images of `good_paths` take in memory."""
        return 3 * self.num_pixels

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Returns the per-channel mean and population standard deviation in [0, 1] units."""
        if self.num_pixels == 0:
            raise ValueError("No decodable images, so there is no mean or std.")
        mean = self.channel_sum / self.num_pixels
        variance = np.maximum(self.channel_sum_squares / self.num_pixels - mean**2, 0.0)
        return tuple(float(x) for x in mean), tuple(float(x) for x in np.sqrt(variance))


def decode_image_bytes(contents: bytes, path: str = "<bytes>") -> np.ndarray:
    """Decodes an encoded image by its content with Pillow.

    Args:
        contents: the file's bytes (JPEG, PNG, GIF, BMP, WebP, TIFF, ...).
        path: the file's path, used in error messages only.

    Returns:
        uint8 array `[height, width, 3]`, RGB. Animated images give their first frame.

    Raises:
        BadImageError: if the bytes are empty, truncated or not an image.
    """
    if not contents:
        raise BadImageError(path, "the file is empty (0 bytes)")
    try:
        with PIL.Image.open(io.BytesIO(contents)) as image:
            image.seek(0)
            # load() decodes all pixel data, so a truncated file fails here, not later.
            image.load()
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow raises UnidentifiedImageError (an OSError) for unknown content and
        # OSError "image file is truncated" for a cut-off file.
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 1:
        raise BadImageError(path, f"decoded to an array of shape {array.shape}, expected [height, width, 3]")
    return array


def decode_image_file(path: str) -> np.ndarray:
    """Reads and decodes an image file with Pillow, like `decode_image_bytes`."""
    with tf.io.gfile.GFile(path, "rb") as stream:
        contents = stream.read()
    return decode_image_bytes(contents, path)


def _decode_with_pillow(contents) -> np.ndarray:
    # tf.numpy_function passes a string scalar as a 0-d object array.
    if isinstance(contents, np.ndarray):
        contents = contents.item()
    return decode_image_bytes(bytes(contents))


def decode_image(contents: tf.Tensor) -> tf.Tensor:
    """Decodes an encoded image by its content inside a tf.data pipeline.

    TensorFlow decodes JPEG, PNG, GIF (first frame) and BMP. CMYK JPEGs go through
    Pillow (`tf.numpy_function`) so their colours match Pillow's conversion.

    Args:
        contents: string scalar tensor, the file's bytes.

    Returns:
        uint8 tensor `[height, width, 3]` with a static rank of 3.

    Raises:
        tf.errors.InvalidArgumentError: when run on bytes that are not a valid image.
            Call `check_image_files` first to find such files with their paths.
    """

    def decode_cmyk():
        image = tf.numpy_function(_decode_with_pillow, [contents], tf.uint8, stateful=False)
        return tf.ensure_shape(image, [None, None, 3])

    def decode_other():
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3])

    is_jpeg = tf.io.is_jpeg(contents)
    # extract_jpeg_shape only parses JPEG headers, so non-JPEG input takes the other branch.
    num_channels = tf.cond(
        is_jpeg, lambda: tf.io.extract_jpeg_shape(contents)[2], lambda: tf.constant(3, tf.int32)
    )
    image = tf.cond(tf.equal(num_channels, 4), decode_cmyk, decode_other)
    image.set_shape([None, None, 3])
    return image


def _check_one(path: str):
    """Returns `(path, reason, None)` for a bad file or `(path, None, stats)`."""
    try:
        array = decode_image_file(path)
    except BadImageError as error:
        return path, error.reason, None
    except OSError as error:
        return path, f"cannot read the file: {error}", None
    pixels = array.reshape(-1, 3).astype(np.float64) / 255.0
    stats = (array.shape[:2], pixels.sum(axis=0), np.square(pixels).sum(axis=0))
    return path, None, stats


def check_image_files(
    paths: Sequence[str],
    *,
    skip_bad_files: bool,
    description: str,
    num_threads: Optional[int] = None,
) -> ImageFileCheck:
    """Decodes every file once to find bad ones and measure the good ones.

    Pillow releases the GIL while it decodes, so threads decode files in parallel.

    Args:
        paths: image files.
        skip_bad_files: if True, bad files are left out and counted; if False, the
            first bad files raise an error.
        description: what the files are, e.g. "the train split of folder /data/x",
            for messages.
        num_threads: decoding threads; None uses the number of CPU cores.

    Returns:
        The `ImageFileCheck` of the files.

    Raises:
        BadImageFilesError: if a file cannot be decoded and `skip_bad_files` is False,
            naming up to `MAX_LISTED_BAD_FILES` paths with their reasons.
    """
    num_threads = num_threads or os.cpu_count() or 1
    good_paths, bad_files, sizes = [], [], []
    channel_sum = np.zeros(3)
    channel_sum_squares = np.zeros(3)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for path, reason, stats in pool.map(_check_one, paths):
            if reason is not None:
                bad_files.append((path, reason))
                continue
            good_paths.append(path)
            sizes.append(tuple(int(x) for x in stats[0]))
            channel_sum += stats[1]
            channel_sum_squares += stats[2]
    if bad_files and not skip_bad_files:
        raise BadImageFilesError(bad_files_message(bad_files, description))
    if bad_files:
        logger.warning(
            "Skipped %d of %d image files of %s that cannot be decoded (skip_bad_files=true); first: %s (%s)",
            len(bad_files),
            len(paths),
            description,
            bad_files[0][0],
            bad_files[0][1],
        )
    return ImageFileCheck(good_paths, bad_files, sizes, channel_sum, channel_sum_squares)


def bad_files_message(bad_files: Sequence[tuple[str, str]], description: str) -> str:
    """Formats the error message for files that cannot be decoded."""
    listed = "\n".join(f"  {path}: {reason}" for path, reason in bad_files[:MAX_LISTED_BAD_FILES])
    more = len(bad_files) - MAX_LISTED_BAD_FILES
    if more > 0:
        listed += f"\n  ... and {more} more"
    return (
        f"{len(bad_files)} image file(s) of {description} cannot be decoded:\n{listed}\n"
        "Replace or delete these files, or pass --skip_bad_files=true to leave them out "
        "(the run then logs and records how many it skipped)."
    )
