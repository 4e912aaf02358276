"""Shared helpers of the TFDS-backed data sets: where the data lives and a fast offline check.

TFDS 4.9 retries a failed download request up to 10 times with growing pauses, and by
default first looks for a prepared copy on Google Cloud Storage. On a machine without
network the error can therefore take long to appear. `check_download_reachable` sends one HEAD request with a
short timeout first, so such a run fails within seconds with instructions.
"""

import logging
import os
from typing import Optional

import requests
import tensorflow_datasets as tfds

logger = logging.getLogger(__name__)

# Seconds to wait for the server's first response before declaring it unreachable.
REACHABILITY_TIMEOUT_S = 10


class DataNotFoundError(ValueError):
    """A data set that is neither prepared, nor on disk, nor downloadable from here."""


def resolve_data_dir(data_dir: Optional[str]) -> str:
    """Returns `data_dir`, or TFDS's default folder (`$TFDS_DATA_DIR` or ~/tensorflow_datasets)."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR)


def check_download_reachable(url: str, instructions: str) -> None:
    """Raises DataNotFoundError within `REACHABILITY_TIMEOUT_S` seconds if `url` cannot be reached.

    Proxies from the `HTTP_PROXY`/`HTTPS_PROXY` environment variables apply, as they do
    to TFDS's own download.

    Args:
        url: the file that a download would fetch.
        instructions: what to do instead, appended to the message.
    """
    try:
        response = requests.head(url, timeout=REACHABILITY_TIMEOUT_S, allow_redirects=True)
    except requests.RequestException as error:
        raise DataNotFoundError(
            f"Cannot download {url}: {type(error).__name__} ({error}). {instructions}"
        ) from error
    if response.status_code >= 400:
        raise DataNotFoundError(f"Cannot download {url}: HTTP status {response.status_code}. {instructions}")
    logger.info("%s is reachable; downloading it through TFDS.", url)


def offline_download_config(manual_dir: Optional[str]):
    """Returns the TFDS `DownloadConfig` of a prepare step that never looks for a copy on GCS.

    Args:
        manual_dir: where manually placed archives are; None for TFDS's default
            `<data_dir>/downloads/manual`.
    """
    return tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
