"""The `cifar10` and `cifar100` datasets, through TFDS's own CIFAR builders.

Each loads `train` (50,000 images) and `test` (10,000) as uint8 `[32, 32, 3]` with
`tfds.load` from `data_dir` (default: `$TFDS_DATA_DIR` or ~/tensorflow_datasets).
CIFAR-100 uses the 100 fine labels.

Where the data comes from, first match wins, and none of the first two touches the
network:

1. a copy prepared by TFDS in `<data_dir>/cifar10/3.0.2/` (or `cifar100/`), e.g. made
   on another machine and copied over;
2. the archive TFDS downloads (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`) in
   `data_dir` or in TFDS's manual folder `<data_dir>/downloads/manual/`;
3. TFDS's download, after a check that the URL is reachable. Without network this fails
   within seconds with instructions to build the data elsewhere.
"""

import logging
import os
from typing import Optional

import tensorflow_datasets as tfds

from mixco_tf.data import tfds_sources
from mixco_tf.data.registry import DatasetSplits, register_dataset

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32

# Per-channel mean and population standard deviation of the 50,000 training images in
# [0, 1] units, over all pixels, as computed and published by many CIFAR codebases.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "cifar-10-binary.tar.gz"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "cifar-100-binary.tar.gz"),
}


def _manual_dir(data_dir: str, archive_name: str) -> Optional[str]:
    for folder in (data_dir, os.path.join(data_dir, "downloads", "manual")):
        if os.path.isfile(os.path.join(folder, archive_name)):
            return folder
    return None


def prepare(name: str, data_dir: Optional[str] = None, verify_checksums: bool = True):
    """Returns the prepared TFDS builder of `name`, preparing it from disk or a download first.

    Args:
        name: "cifar10" or "cifar100".
        data_dir: the TFDS data folder; None for TFDS's default.
        verify_checksums: compare a manually placed archive with TFDS's registered
            checksum. Pass False for an archive re-packed with the same format.

    Raises:
        mixco_tf.data.tfds_sources.DataNotFoundError: within seconds, when the data is
            neither prepared, nor on disk, nor downloadable.
    """
    data_dir = tfds_sources.resolve_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    url, archive_name = ARCHIVES[name]
    manual_dir = _manual_dir(data_dir, archive_name)
    if manual_dir is None:
        tfds_sources.check_download_reachable(
            url,
            f"{name} is not prepared in {data_dir} and {archive_name} is not there. On a machine "
            f"with network access run: python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\", then copy "
            f"DIR/{name}/ to {data_dir}/{name}/. Or copy {archive_name} from {url} to "
            f"{data_dir}. Then rerun with --data_dir={data_dir}.",
        )
    if manual_dir is not None and not verify_checksums:
        builder = _builder_trusting_archive(name, data_dir, os.path.join(manual_dir, archive_name))
    logger.info("Preparing %s in %s%s", name, data_dir, f" from {manual_dir}" if manual_dir else "")
    builder.download_and_prepare(download_config=tfds_sources.offline_download_config(manual_dir))
    return builder


def _builder_trusting_archive(name: str, data_dir: str, archive_path: str):
    """Returns TFDS's builder of `name` that expects the checksum of `archive_path`.

    TFDS checks a manually placed archive against the checksum registered for its URL.
    This subclass registers the local file's checksum instead and changes nothing else,
    so TFDS's own extraction and record parsing run, and the prepared data lands in the
    same `<data_dir>/<name>/<version>/` folder.
    """
    base = type(tfds.builder(name, data_dir=data_dir))
    url_info = tfds.download.checksums.compute_url_info(archive_path)
    trusted = type(
        f"{base.__name__}TrustingLocalArchive",
        (base,),
        {"name": base.name, "url_infos": {ARCHIVES[name][0]: url_info}, "__module__": base.__module__},
        skip_registration=True,
    )
    logger.warning("Not verifying %s against TFDS's registered checksum (verify_checksums=False).", archive_path)
    return trusted(data_dir=data_dir)


def load_cifar(name: str, data_dir: Optional[str] = None, verify_checksums: bool = True) -> DatasetSplits:
    """Loads CIFAR-10 or CIFAR-100 (fine labels); see `prepare` for where from."""
    builder = prepare(name, data_dir, verify_checksums)
    # download=False: the data is prepared, and tfds.load must not look for it online.
    train, test = tfds.load(
        name,
        split=["train", "test"],
        data_dir=tfds_sources.resolve_data_dir(data_dir),
        download=False,
        as_supervised=True,
        shuffle_files=False,
    )
    info = builder.info
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        num_train=info.splits["train"].num_examples,
        num_test=info.splits["test"].num_examples,
        num_classes=info.features["label"].num_classes,
        image_size=IMAGE_SIZE,
        mean=mean,
        std=std,
        class_names=tuple(info.features["label"].names),
    )


# CIFAR's fixed-size binary records contain no image files, so skip_bad_files has
# nothing to skip.
@register_dataset("cifar10")
def load_cifar10(data_dir=None, skip_bad_files=False) -> DatasetSplits:
    """Loads CIFAR-10; see `load_cifar`."""
    del skip_bad_files
    return load_cifar("cifar10", data_dir)


@register_dataset("cifar100")
def load_cifar100(data_dir=None, skip_bad_files=False) -> DatasetSplits:
    """Loads CIFAR-100 with its 100 fine labels; see `load_cifar`."""
    del skip_bad_files
    return load_cifar("cifar100", data_dir)
