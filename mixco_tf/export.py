"""Exports a backbone as a SavedModel in TensorFlow Serving layout.

    export_backbone(backbone, "exports/mixco", image_size=32, mean=..., std=...)
    # -> exports/mixco/1/saved_model.pb, variables/, assets.extra/mixco_export.json

The SavedModel has two signatures, both returning `{"features": float32 [batch, dim]}`:

- `serving_default`: `images`, uint8 `[batch, height, width, 3]` of any height and width.
  The graph resizes them to `image_size` and normalizes them with the training mean and
  std (`mixco_tf.preprocess.resize_and_normalize`), so clients send raw pixels.
- `serving_normalized`: `images`, float32 `[batch, image_size, image_size, 3]` that the
  client has already resized and normalized.

It loads with `tf.saved_model.load` or `keras.layers.TFSMLayer` in a process that has
never imported `mixco_tf`, and TensorFlow Serving picks it up from the base folder.
"""

import json
import logging
import numbers
import os
import shutil
import uuid
from typing import Sequence

import keras
import tensorflow as tf
from absl import app, flags
from absl import logging as absl_logging

from mixco_tf.preprocess import resize_and_normalize

logger = logging.getLogger(__name__)

METADATA_FILENAME = "mixco_export.json"


def export_backbone(
    backbone: keras.Model,
    export_dir: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    version: int = 1,
    overwrite: bool = False,
) -> str:
    """Writes `backbone` as the SavedModel `export_dir/VERSION/`.

    The SavedModel is first written to a hidden folder `export_dir/.tmp-VERSION-*` and
    then renamed to `export_dir/VERSION`. TensorFlow Serving skips child folders whose
    name is not an integer, so it never loads a half-written version. If writing raises,
    the hidden folder is removed and no version folder appears. A process killed while
    writing leaves the hidden folder behind, which is safe to delete.

    Only the backbone's variables are saved: no optimizer slots, projection head or key
    encoder, because the endpoints use nothing else.

    Args:
        backbone: Keras model mapping normalized float32
            `[batch, image_size, image_size, 3]` to `[batch, feature_dim]`.
        export_dir: base folder of the model (TensorFlow Serving's `base_path`). Created
            when missing.
        image_size: side of the backbone's input images, in pixels.
        mean: per-channel mean in [0, 1] units used in training, 3 floats.
        std: per-channel standard deviation in [0, 1] units used in training, 3 floats.
        version: positive integer, the name of the version folder.
        overwrite: replace an existing `export_dir/VERSION`. The old version is removed
            just before the new one is renamed into place, so a server polling
            `export_dir` may briefly see no such version.

    Returns:
        Path of the written version folder.

    Raises:
        ValueError: on invalid arguments, a backbone whose output is not
            `[batch, feature_dim]`, or an existing version folder when `overwrite` is
            False.
    """
    _check_arguments(image_size, mean, std, version)
    image_size, version = int(image_size), int(version)
    version_dir = os.path.join(export_dir, str(version))
    if os.path.exists(version_dir) and not overwrite:
        raise ValueError(
            f"Export folder {version_dir} already exists. Pass overwrite=True (--overwrite on the command line) to replace it "
            "or choose another version."
        )
    feature_dim = _feature_dim(backbone, image_size)

    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(f"Export folder {export_dir} is a file. Choose a folder path for the export.")
    os.makedirs(export_dir, exist_ok=True)
    # os.mkdir honours the umask, unlike tempfile.mkdtemp (mode 0700), so a server
    # running as another user can read the renamed folder.
    temporary_dir = os.path.join(export_dir, f".tmp-{version}-{uuid.uuid4().hex[:12]}")
    os.mkdir(temporary_dir)
    try:
        archive = _build_archive(backbone, image_size, mean, std)
        archive.write_out(temporary_dir, verbose=False)
        _write_metadata(temporary_dir, image_size, mean, std, feature_dim)
        if os.path.exists(version_dir):
            logger.info("Replacing the existing export %s", version_dir)
            shutil.rmtree(version_dir)
        os.replace(temporary_dir, version_dir)
    except BaseException:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise

    logger.info(
        "Exported the backbone (%d-dimensional features, %dx%d inputs) to %s",
        feature_dim, image_size, image_size, version_dir,
    )
    return version_dir


def _build_archive(backbone, image_size, mean, std):
    archive = keras.export.ExportArchive()
    archive.track(backbone)

    def serve_uint8(images):
        normalized = resize_and_normalize(images, image_size, mean, std)
        return {"features": tf.cast(backbone(normalized, training=False), tf.float32)}

    def serve_normalized(images):
        return {"features": tf.cast(backbone(images, training=False), tf.float32)}

    archive.add_endpoint(
        "serving_default",
        serve_uint8,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serving_normalized",
        serve_normalized,
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")],
    )
    return archive


def _write_metadata(saved_model_dir, image_size, mean, std, feature_dim):
    # Loaders of the SavedModel do not read assets.extra/. TensorFlow Serving reads only
    # its warm-up file `tf_serving_warmup_requests` from there.
    extra_dir = os.path.join(saved_model_dir, "assets.extra")
    os.makedirs(extra_dir, exist_ok=True)
    metadata = {
        "image_size": int(image_size),
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "feature_dim": int(feature_dim),
        "input": "serving_default: uint8 images [batch, height, width, 3], any height and width",
        "output": "features: float32 [batch, feature_dim]",
    }
    with open(os.path.join(extra_dir, METADATA_FILENAME), "w", encoding="utf-8") as stream:
        json.dump(metadata, stream, indent=2)


def _feature_dim(backbone, image_size):
    features = backbone(tf.zeros([1, image_size, image_size, 3], tf.float32), training=False)
    if len(features.shape) != 2:
        raise ValueError(
            f"The backbone returns shape {tuple(features.shape)} for a [1, {image_size}, {image_size}, 3] "
            "input, expected [batch, feature_dim]. Export a backbone that ends in global pooling."
        )
    return int(features.shape[1])


def _check_arguments(image_size, mean, std, version):
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer number of pixels, got {image_size!r}.")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise ValueError(f"{name} must have 3 values (R, G, B), got {values!r}.")
    if min(std) <= 0:
        raise ValueError(f"std values must be > 0, got {std!r}.")
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 1:
        raise ValueError(
            f"version must be a positive integer (TensorFlow Serving loads integer-named folders), got {version!r}."
        )


def export_run(model_dir, export_dir, *, version=1, overwrite=False):
    """Exports the backbone of a finished or interrupted training run.

    Rebuilds the model from `MODEL_DIR/config.yaml`, loads the weights of the last
    completed epoch from `MODEL_DIR/checkpoints/mixco.weights.h5` and calls
    `export_backbone` with the run's image size and the data set's mean and std.

    Returns:
        Path of the written version folder.

    Raises:
        ValueError: if the run directory lacks its config or checkpoint, or the
            checkpoint does not match the config's model.
    """
    # Imported here because mixco_tf.experiment imports this module.
    from mixco_tf import config as config_lib
    from mixco_tf import experiment
    from mixco_tf.data import load_dataset

    config_path = os.path.join(model_dir, "config.yaml")
    checkpoint_path = os.path.join(model_dir, "checkpoints", "mixco.weights.h5")
    for path in (config_path, checkpoint_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} not found. Pass --model_dir=a run directory of `python -m mixco_tf.train` "
                "that completed at least one epoch."
            )
    config = config_lib.from_dict(config_lib.load_yaml(config_path), source=config_path).validate()
    splits = load_dataset(config.dataset, config.data_dir)
    model = experiment.build_model(config)
    try:
        model.load_weights(checkpoint_path)
    except ValueError as error:
        raise ValueError(
            f"The checkpoint {checkpoint_path} does not match the model of {config_path} "
            f"({config.backbone}, width {config.width_multiplier}, projection {config.projection_dim}): {error}"
        ) from error
    return export_backbone(
        model.backbone,
        export_dir,
        image_size=config.image_size,
        mean=splits.mean,
        std=splits.std,
        version=version,
        overwrite=overwrite,
    )


def define_flags():
    """Defines this command's flags; `model_dir` is also a flag of mixco_tf.train, so not at import."""
    flags.DEFINE_string("model_dir", None, "Run directory of `python -m mixco_tf.train` (config.yaml, checkpoints/).")
    flags.DEFINE_string(
        "export_dir", None, "Base folder of the export (TF Serving base_path); the SavedModel goes to EXPORT_DIR/VERSION."
    )
    flags.DEFINE_integer("version", 1, "Version folder name, a positive integer.", lower_bound=1)
    flags.DEFINE_boolean("overwrite", False, "Replace an existing version folder.")


def main(argv):
    """Exports the backbone of --model_dir to --export_dir/--version."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}. Pass options as flags: --key=value.")
    if not flags.FLAGS.model_dir or not flags.FLAGS.export_dir:
        absl_logging.error("Both --model_dir=RUN_DIR and --export_dir=BASE/NAME are required.")
        return 2
    try:
        version_dir = export_run(
            flags.FLAGS.model_dir,
            flags.FLAGS.export_dir,
            version=flags.FLAGS.version,
            overwrite=flags.FLAGS.overwrite,
        )
    except ValueError as error:
        absl_logging.error("%s", error)
        return 2
    print(version_dir)
    return 0


def run():
    """Console-script entry point of `mixco-export`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
