"""The `tiny_imagenet` dataset: Tiny ImageNet (200 classes, 64x64), the MixCo paper's data.

Tiny ImageNet is not in the TFDS catalog, so `TinyImagenet` is a TFDS
`GeneratorBasedBuilder` for the archive http://cs231n.stanford.edu/tiny-imagenet-200.zip.
Its layout, inside the folder `tiny-imagenet-200/`:

    wnids.txt                        the 200 WordNet ids, one per line: class ids in this order
    words.txt                        "<wnid>\\t<names>" for all of WordNet (82,115 lines)
    train/<wnid>/images/*.JPEG       500 images per class
    train/<wnid>/<wnid>_boxes.txt    bounding boxes, not used
    val/images/*.JPEG                10,000 images
    val/val_annotations.txt          "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per image
    test/images/*.JPEG               10,000 images without labels, not used

Splits: `train` (100,000 images, label from the wnid folder) and `validation` (10,000,
labels from `val_annotations.txt`), uint8 images `[64, 64, 3]`. Some files are
grayscale JPEGs; every image is decoded by content to RGB (see `mixco_tf.data.decode`).

Where the data comes from, first match wins:

1. a prepared copy in `<data_dir>/tiny_imagenet/<version>/`;
2. `tiny-imagenet-200.zip` or the extracted `tiny-imagenet-200/` in `data_dir` or in the
   TFDS manual folder `<data_dir>/downloads/manual/`;
3. a download through TFDS's download manager, after a check that the URL is reachable.

Preparing decodes every image once, records the per-channel mean and std of the train
images and the files it skipped in the dataset's metadata, and writes TFRecords.
"""

import logging
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixco_tf.data import decode, tfds_sources
from mixco_tf.data.registry import DatasetSplits, register_dataset

logger = logging.getLogger(__name__)

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE_NAME = "tiny-imagenet-200.zip"
FOLDER_NAME = "tiny-imagenet-200"
IMAGE_SIZE = 64


class TinyImagenetFormatError(ValueError):
    """A Tiny ImageNet file tree that does not match the real layout."""


def _read_wnids(root: str) -> list[str]:
    path = os.path.join(root, "wnids.txt")
    if not tf.io.gfile.exists(path):
        raise TinyImagenetFormatError(f"{path} is missing: every Tiny ImageNet copy lists its classes there.")
    with tf.io.gfile.GFile(path) as stream:
        wnids = [line.strip() for line in stream if line.strip()]
    if not wnids:
        raise TinyImagenetFormatError(f"{path} lists no class (WordNet id).")
    duplicates = sorted({wnid for wnid in wnids if wnids.count(wnid) > 1})
    if duplicates:
        raise TinyImagenetFormatError(f"{path} lists the WordNet ids {duplicates} more than once.")
    return wnids


def _read_words(root: str, wnids: list[str]) -> list[str]:
    """Returns the human-readable name of each wnid, from words.txt; the wnid where it has none."""
    path = os.path.join(root, "words.txt")
    names = {}
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as stream:
            for line in stream:
                wnid, _, words = line.rstrip("\n").partition("\t")
                names[wnid] = words.strip()
    missing = [wnid for wnid in wnids if not names.get(wnid)]
    if missing:
        logger.warning("%s has no name for %d WordNet ids (first: %s); using the ids as names.", path, len(missing), missing[0])
    return [names.get(wnid) or wnid for wnid in wnids]


def _read_val_annotations(root: str, wnids: list[str]) -> dict[str, str]:
    """Returns file name -> wnid from val/val_annotations.txt (tab-separated, with box columns)."""
    path = os.path.join(root, "val", "val_annotations.txt")
    if not tf.io.gfile.exists(path):
        raise TinyImagenetFormatError(f"{path} is missing: it contains the labels of the validation images.")
    known = set(wnids)
    labels = {}
    with tf.io.gfile.GFile(path) as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            columns = line.rstrip("\n").split("\t")
            if len(columns) < 2:
                raise TinyImagenetFormatError(
                    f"{path} line {number}: expected tab-separated '<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>', got {line.strip()!r}."
                )
            file_name, wnid = columns[0], columns[1]
            if wnid not in known:
                raise TinyImagenetFormatError(
                    f"{path} line {number}: WordNet id {wnid!r} of {file_name!r} is not in wnids.txt."
                )
            labels[file_name] = wnid
    return labels


class TinyImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Tiny ImageNet 200 as a TFDS builder; see the module docstring.

    Not registered in the TFDS catalog (a later TFDS release may add one of the same
    name). Build it directly: `TinyImagenet(data_dir=...)`.

    Args:
        skip_bad_files: leave out images that cannot be decoded and record them in the
            metadata, instead of failing the preparation.
        **kwargs: `tfds.core.GeneratorBasedBuilder` arguments, e.g. `data_dir`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train and validation splits, images decoded to RGB."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {ARCHIVE_NAME} (from {URL}) or its extracted folder {FOLDER_NAME}/ in the "
        "manual folder, or in --data_dir."
    )

    def __init__(self, *, skip_bad_files: bool = False, **kwargs):
        self._skip_bad_files = skip_bad_files
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Tiny ImageNet: 200 ImageNet classes at 64x64 pixels (CS231n).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
            metadata=tfds.core.MetadataDict(),
        )

    def _source_root(self, dl_manager) -> str:
        """Returns the extracted `tiny-imagenet-200` folder: manual copy, else a download."""
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError:
            # dl_manager.manual_dir asserts that the folder exists and is not empty.
            manual_dir = None
        if manual_dir:
            archive = os.path.join(manual_dir, ARCHIVE_NAME)
            if os.path.isfile(archive):
                logger.info("Extracting %s", archive)
                return os.path.join(os.fspath(dl_manager.extract(archive)), FOLDER_NAME)
            for candidate in (os.path.join(manual_dir, FOLDER_NAME), manual_dir):
                if os.path.isfile(os.path.join(candidate, "wnids.txt")):
                    return candidate
        return os.path.join(os.fspath(dl_manager.download_and_extract(URL)), FOLDER_NAME)

    def _split_generators(self, dl_manager):
        root = self._source_root(dl_manager)
        logger.info("Preparing Tiny ImageNet from %s", root)
        wnids = _read_wnids(root)
        self.info.features["label"].names = wnids
        self.info.metadata["class_names"] = _read_words(root, wnids)
        self.info.metadata["skipped_files"] = []
        val_labels = _read_val_annotations(root, wnids)
        return {
            "train": self._generate_examples(root, self._train_files(root, wnids), measure=True),
            "validation": self._generate_examples(root, self._val_files(root, val_labels), measure=False),
        }

    def _train_files(self, root: str, wnids: list[str]) -> list[tuple[str, str]]:
        train_dir = os.path.join(root, "train")
        if not tf.io.gfile.isdir(train_dir):
            raise TinyImagenetFormatError(f"{train_dir} is missing.")
        known = set(wnids)
        folders = [name.rstrip("/") for name in tf.io.gfile.listdir(train_dir)]
        unknown = sorted(set(folders) - known)
        if unknown:
            raise TinyImagenetFormatError(
                f"{train_dir} contains folder(s) {unknown} whose WordNet id is not in wnids.txt. "
                "Add the ids to wnids.txt or remove the folders."
            )
        files = []
        for wnid in wnids:
            images_dir = os.path.join(train_dir, wnid, "images")
            if not tf.io.gfile.isdir(images_dir):
                raise TinyImagenetFormatError(f"{images_dir} is missing: wnids.txt lists {wnid!r}, so its train images must be there.")
            # train/<wnid>/<wnid>_boxes.txt sits beside images/, so it is never listed here.
            files += [(os.path.join(images_dir, name), wnid) for name in sorted(tf.io.gfile.listdir(images_dir))]
        return files

    def _val_files(self, root: str, val_labels: dict[str, str]) -> list[tuple[str, str]]:
        images_dir = os.path.join(root, "val", "images")
        if not tf.io.gfile.isdir(images_dir):
            raise TinyImagenetFormatError(f"{images_dir} is missing.")
        names = sorted(tf.io.gfile.listdir(images_dir))
        unlabeled = [name for name in names if name not in val_labels]
        if unlabeled:
            raise TinyImagenetFormatError(
                f"Validation image(s) {unlabeled[:10]} in {images_dir} have no line in "
                f"{os.path.join(root, 'val', 'val_annotations.txt')}, so their labels are unknown."
            )
        missing = sorted(set(val_labels) - set(names))
        if missing:
            raise TinyImagenetFormatError(
                f"{os.path.join(root, 'val', 'val_annotations.txt')} lists image(s) {missing[:10]} "
                f"that are not in {images_dir}."
            )
        return [(os.path.join(images_dir, name), val_labels[name]) for name in names]

    def _generate_examples(self, root: str, files: list[tuple[str, str]], measure: bool):
        """Yields `(key, example)`; decodes each file by content and checks its size."""
        channel_sum = np.zeros(3)
        channel_sum_squares = np.zeros(3)
        num_pixels = 0
        for path, wnid in files:
            key = os.path.relpath(path, root)
            try:
                image = decode.decode_image_file(path)
                if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
                    raise decode.BadImageError(path, f"size {image.shape[1]}x{image.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
            except decode.BadImageError as error:
                if not self._skip_bad_files:
                    raise decode.BadImageFilesError(
                        decode.bad_files_message([(path, error.reason)], f"Tiny ImageNet in {root!r}")
                    ) from error
                logger.warning("Skipping %s: %s", path, error.reason)
                self.info.metadata["skipped_files"].append(key)
                continue
            if measure:
                pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
                channel_sum += pixels.sum(axis=0)
                channel_sum_squares += np.square(pixels).sum(axis=0)
                num_pixels += len(pixels)
            yield key, {"image": image, "label": wnid, "id": key}
        if measure and num_pixels:
            mean = channel_sum / num_pixels
            std = np.sqrt(np.maximum(channel_sum_squares / num_pixels - mean**2, 0.0))
            self.info.metadata["mean"] = [float(x) for x in mean]
            self.info.metadata["std"] = [float(x) for x in std]


def _manual_dir(data_dir: str) -> Optional[str]:
    """Returns the folder that contains the archive or extracted copy, if any."""
    for folder in (data_dir, os.path.join(data_dir, "downloads", "manual")):
        if os.path.isfile(os.path.join(folder, ARCHIVE_NAME)) or os.path.isfile(
            os.path.join(folder, FOLDER_NAME, "wnids.txt")
        ):
            return folder
    if os.path.isfile(os.path.join(data_dir, "wnids.txt")):
        return data_dir
    return None


def prepare(data_dir: Optional[str] = None, skip_bad_files: bool = False) -> TinyImagenet:
    """Returns the prepared builder, preparing it first from disk or a download if needed.

    Raises:
        mixco_tf.data.tfds_sources.DataNotFoundError: within seconds, if the data is
            neither prepared, nor on disk, nor downloadable. The message names the URL,
            the file name and the folder to put it in.
        TinyImagenetFormatError: if the files do not have the real layout.
        mixco_tf.data.decode.BadImageFilesError: for an image that cannot be decoded,
            unless `skip_bad_files`.
    """
    data_dir = tfds_sources.resolve_data_dir(data_dir)
    builder = TinyImagenet(data_dir=data_dir, skip_bad_files=skip_bad_files)
    if builder.is_prepared():
        return builder
    manual_dir = _manual_dir(data_dir)
    if manual_dir is None:
        tfds_sources.check_download_reachable(
            URL,
            f"Download {ARCHIVE_NAME} on a machine with network access and copy it to "
            f"{data_dir} (or {os.path.join(data_dir, 'downloads', 'manual')}); the folder "
            f"{FOLDER_NAME}/ extracted from it works too. Then rerun with --data_dir={data_dir}.",
        )
    os.makedirs(data_dir, exist_ok=True)
    builder.download_and_prepare(
        download_config=tfds_sources.offline_download_config(manual_dir)
    )
    return builder


@register_dataset("tiny_imagenet")
def load(data_dir=None, skip_bad_files=False) -> DatasetSplits:
    """Loads Tiny ImageNet's train and validation splits; see `prepare` for where from."""
    builder = prepare(data_dir, skip_bad_files=skip_bad_files)
    metadata = builder.info.metadata
    skipped = list(metadata.get("skipped_files", []))
    if skipped and not skip_bad_files:
        raise decode.BadImageFilesError(
            f"The prepared Tiny ImageNet in {builder.data_dir} was made with skip_bad_files=true and "
            f"leaves out {len(skipped)} file(s) (first: {skipped[0]}). Pass --skip_bad_files=true to "
            f"train on it, or delete {builder.data_dir} and fix the files to prepare it again."
        )
    splits = builder.info.splits
    return DatasetSplits(
        name="tiny_imagenet",
        train=builder.as_dataset(split="train", as_supervised=True, shuffle_files=False),
        test=builder.as_dataset(split="validation", as_supervised=True, shuffle_files=False),
        num_train=splits["train"].num_examples,
        num_test=splits["validation"].num_examples,
        num_classes=builder.info.features["label"].num_classes,
        image_size=IMAGE_SIZE,
        mean=tuple(metadata["mean"]),
        std=tuple(metadata["std"]),
        class_names=tuple(metadata["class_names"]),
        skipped_files=len(skipped),
    )
