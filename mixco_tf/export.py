"""Exports a backbone as a SavedModel in TensorFlow Serving layout.

    export_backbone(backbone, "exports/mixco", image_size=32, mean=..., std=...)
    # -> exports/mixco/1/saved_model.pb, variables/, backbone.keras,
    #    assets.extra/mixco_export.json, assets.extra/tf_serving_warmup_requests
    export_backbone_onnx(backbone, "exports/mixco_onnx", image_size=32, mean=..., std=...)
    # -> exports/mixco_onnx/1/model.onnx, mixco_export.json

The SavedModel has two signatures, both returning `{"features": float32 [batch, dim]}`:

- `serving_default`: `images`, uint8 `[batch, height, width, 3]` of any height and width.
  The graph resizes them to `image_size` and normalizes them with the training mean and
  std (`mixco_tf.preprocess.resize_and_normalize`), so clients send raw pixels.
- `serving_normalized`: `images`, float32 `[batch, image_size, image_size, 3]` that the
  client has already resized and normalized.

It loads with `tf.saved_model.load` or `keras.layers.TFSMLayer` in a process that has
never imported `mixco_tf`, and TensorFlow Serving picks it up from the base folder.
`backbone.keras` is the same backbone as a Keras model file, for fine-tuning with
`keras.saving.load_model`.

The ONNX export (`--format=onnx`) holds the backbone alone: `images`, float32
`[batch, image_size, image_size, 3]`, already resized and normalized, to `features`. Its
`NAME/VERSION/model.onnx` layout is the one NVIDIA Triton's ONNX Runtime backend reads.
"""

import json
import logging
import numbers
import os
import shutil
import typing
import uuid
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags
from absl import logging as absl_logging

from mixco_tf import warmup
from mixco_tf.preprocess import resize_and_normalize

logger = logging.getLogger(__name__)

METADATA_FILENAME = "mixco_export.json"
KERAS_FILENAME = "backbone.keras"
ONNX_FILENAME = "model.onnx"
FORMATS = ("saved_model", "onnx")

# Largest absolute difference between ONNX Runtime's and Keras's features that the ONNX
# export accepts; float32 reorderings of a ResNet stay near 1e-5.
ONNX_TOLERANCE = 1e-4


def export_backbone(
    backbone: keras.Model,
    export_dir: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    version: int = 1,
    overwrite: bool = False,
    warmup_requests: bool = True,
    keras_file: bool = True,
) -> str:
    """Writes `backbone` as the SavedModel `export_dir/VERSION/`.

    The SavedModel is first written to a hidden folder `export_dir/.tmp-VERSION-*` and
    then renamed to `export_dir/VERSION`. TensorFlow Serving skips child folders whose
    name is not an integer, so it never loads a half-written version. If writing raises,
    the hidden folder is removed and no version folder appears. A process killed while
    writing leaves the hidden folder behind, which is safe to delete.

    Only the backbone's variables are saved: no optimizer slots, projection head or key
    encoder, because the endpoints use nothing else. The version folder also contains
    `backbone.keras` (the same weights, no optimizer) and TensorFlow Serving's warm-up
    requests in `assets.extra/tf_serving_warmup_requests` (see `mixco_tf.warmup`).

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
        warmup_requests: write TensorFlow Serving warm-up requests. Skipped with a
            warning when `tensorflow-serving-api` is not installed.
        keras_file: write `backbone.keras`.

    Returns:
        Path of the written version folder.

    Raises:
        ValueError: on invalid arguments, a backbone whose output is not
            `[batch, feature_dim]`, or an existing version folder when `overwrite` is
            False.
    """
    _check_arguments(image_size, mean, std, version)
    image_size, version = int(image_size), int(version)
    feature_dim = _feature_dim(backbone, image_size)

    def write(temporary_dir):
        archive = _build_archive(backbone, image_size, mean, std)
        archive.write_out(temporary_dir, verbose=False)
        _write_metadata(temporary_dir, image_size, mean, std, feature_dim)
        if warmup_requests:
            warmup.write_warmup_requests(temporary_dir, image_size)
        if keras_file:
            _save_keras_file(backbone, os.path.join(temporary_dir, KERAS_FILENAME))

    version_dir = _write_version_atomically(export_dir, version, overwrite, write)
    logger.info(
        "Exported the backbone (%d-dimensional features, %dx%d inputs) to %s",
        feature_dim, image_size, image_size, version_dir,
    )
    return version_dir


def export_backbone_onnx(
    backbone: keras.Model,
    export_dir: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    version: int = 1,
    overwrite: bool = False,
) -> str:
    """Writes `backbone` as `export_dir/VERSION/model.onnx` with Keras's ONNX export.

    The ONNX graph maps `images`, float32 `[batch, image_size, image_size, 3]` resized
    and normalized with `mean` and `std` (recorded in `mixco_export.json` beside it), to
    `features`, float32 `[batch, feature_dim]`. The batch dimension is dynamic. Before
    the version folder appears, ONNX Runtime runs the file on two random images and its
    features must equal the Keras backbone's within `ONNX_TOLERANCE`. The folder is
    written and renamed into place like `export_backbone`'s.

    Args:
        backbone, export_dir, image_size, mean, std, version, overwrite: as in
            `export_backbone`.

    Returns:
        Path of the written version folder.

    Raises:
        ImportError: if `tf2onnx`, `onnx` or `onnxruntime` is missing
            (`pip install mixco_tf[onnx]`).
        ValueError: on the errors of `export_backbone`, or when ONNX Runtime's features
            differ from the backbone's by more than `ONNX_TOLERANCE`.
    """
    _check_arguments(image_size, mean, std, version)
    image_size, version = int(image_size), int(version)
    feature_dim = _feature_dim(backbone, image_size)
    _check_onnx_packages()

    def write(temporary_dir):
        onnx_path = os.path.join(temporary_dir, ONNX_FILENAME)
        backbone.export(
            onnx_path,
            format="onnx",
            verbose=False,
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")],
        )
        _rename_onnx_output(onnx_path, "features")
        _check_onnx_features(backbone, onnx_path, image_size)
        _write_metadata(temporary_dir, image_size, mean, std, feature_dim, onnx=True, nested=False)

    version_dir = _write_version_atomically(export_dir, version, overwrite, write)
    logger.info("Exported the backbone as ONNX (%d-dimensional features) to %s", feature_dim, version_dir)
    return version_dir


def _write_version_atomically(export_dir, version, overwrite, write):
    """Runs `write(temporary_dir)` and renames the folder to `export_dir/VERSION`.

    The temporary folder `export_dir/.tmp-VERSION-*` has a name that is not an integer,
    so TensorFlow Serving and Triton never load it. Any exception, KeyboardInterrupt
    included, removes it and leaves the existing version folders as they were.
    """
    version_dir = os.path.join(export_dir, str(version))
    if os.path.exists(version_dir) and not overwrite:
        raise ValueError(
            f"Export folder {version_dir} already exists. Pass overwrite=True (--overwrite on the command line) to replace it "
            "or choose another version."
        )
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(f"Export folder {export_dir} is a file. Choose a folder path for the export.")
    os.makedirs(export_dir, exist_ok=True)
    # os.mkdir honours the umask, unlike tempfile.mkdtemp (mode 0700), so a server
    # running as another user can read the renamed folder.
    temporary_dir = os.path.join(export_dir, f".tmp-{version}-{uuid.uuid4().hex[:12]}")
    os.mkdir(temporary_dir)
    try:
        write(temporary_dir)
        if os.path.exists(version_dir):
            logger.info("Replacing the existing export %s", version_dir)
            shutil.rmtree(version_dir)
        os.replace(temporary_dir, version_dir)
    except BaseException:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        raise
    return version_dir


def _save_keras_file(backbone, path):
    # A fresh functional model over the same layers carries no compile state, so the
    # file contains no optimizer variables even when `backbone` itself was compiled.
    uncompiled = keras.Model(backbone.inputs, backbone.outputs, name=backbone.name)
    uncompiled.save(path)


def _check_onnx_packages():
    missing = []
    for module in ("tf2onnx", "onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f"The ONNX export needs {', '.join(missing)}. Install them with "
            "`pip install tf2onnx onnx onnxruntime` (the `onnx` extra of mixco_tf)."
        )


def _rename_onnx_output(path, name):
    """Renames the graph's single output to `name` and its batch dimensions to `batch`."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    old_name = graph.output[0].name
    for node in graph.node:
        for names in (node.input, node.output):
            for index, value in enumerate(names):
                if value == old_name:
                    names[index] = name
    graph.output[0].name = name
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _check_onnx_features(backbone, path, image_size):
    import onnxruntime

    images = np.random.default_rng(0).normal(size=(2, image_size, image_size, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], {"images": images})
    expected = keras.ops.convert_to_numpy(backbone(images, training=False))
    difference = float(np.max(np.abs(features - expected)))
    if difference > ONNX_TOLERANCE:
        raise ValueError(
            f"ONNX Runtime's features differ from the Keras backbone's by up to {difference:.2e} "
            f"(tolerance {ONNX_TOLERANCE}), so the ONNX file is not written. An operation of the "
            "backbone probably has no exact ONNX equivalent; use the SavedModel export."
        )
    logger.info("ONNX Runtime reproduces the backbone's features (largest difference %.2e).", difference)


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


def _write_metadata(saved_model_dir, image_size, mean, std, feature_dim, onnx=False, nested=True):
    # Loaders of the SavedModel do not read assets.extra/. TensorFlow Serving reads only
    # its warm-up file `tf_serving_warmup_requests` from there. An ONNX export has no
    # assets.extra, so its metadata sits beside model.onnx (nested=False).
    extra_dir = os.path.join(saved_model_dir, "assets.extra") if nested else saved_model_dir
    os.makedirs(extra_dir, exist_ok=True)
    if onnx:
        signature = f"images: float32 [batch, {image_size}, {image_size}, 3], resized and normalized with mean and std"
    else:
        signature = "serving_default: uint8 images [batch, height, width, 3], any height and width"
    metadata = {
        "image_size": int(image_size),
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "feature_dim": int(feature_dim),
        "input": signature,
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


class RunBackbone(typing.NamedTuple):
    """The backbone of a training run and the preprocessing it was trained with."""

    backbone: keras.Model
    config: typing.Any  # mixco_tf.config.Config of the run
    image_size: int
    mean: tuple
    std: tuple


def load_run_backbone(model_dir):
    """Rebuilds the backbone of a finished or interrupted training run.

    Rebuilds the model from `MODEL_DIR/config.yaml` and loads the weights of the last
    completed epoch from `MODEL_DIR/checkpoints/mixco.weights.h5`. The mean and std come
    from the run's export metadata when the run exported its backbone, else from its
    data set's loader.

    Returns:
        A `RunBackbone`.

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
    model = experiment.build_model(config)
    try:
        model.load_weights(checkpoint_path)
    except ValueError as error:
        raise ValueError(
            f"The checkpoint {checkpoint_path} does not match the model of {config_path} "
            f"({config.backbone}, width {config.width_multiplier}, projection {config.projection_dim}): {error}"
        ) from error

    metadata_path = os.path.join(model_dir, "export", "backbone", "1", "assets.extra", METADATA_FILENAME)
    if os.path.isfile(metadata_path):
        with open(metadata_path, encoding="utf-8") as stream:
            metadata = json.load(stream)
        mean, std = tuple(metadata["mean"]), tuple(metadata["std"])
    else:
        splits = load_dataset(config.dataset, config.data_dir)
        mean, std = tuple(splits.mean), tuple(splits.std)
    return RunBackbone(model.backbone, config, config.image_size, mean, std)


def export_run(model_dir, export_dir, *, version=1, overwrite=False, export_format="saved_model"):
    """Exports the backbone of a finished or interrupted training run.

    Args:
        model_dir: run directory of `python -m mixco_tf.train`.
        export_dir: base folder of the export.
        version: version folder name, a positive integer.
        overwrite: replace an existing version folder.
        export_format: `"saved_model"` (`export_backbone`) or `"onnx"`
            (`export_backbone_onnx`).

    Returns:
        Path of the written version folder.

    Raises:
        ValueError: on an unknown format and the errors of `load_run_backbone`.
    """
    if export_format not in FORMATS:
        raise ValueError(f"Invalid export format {export_format!r}. Valid formats: {', '.join(FORMATS)}.")
    run = load_run_backbone(model_dir)
    write = export_backbone if export_format == "saved_model" else export_backbone_onnx
    return write(
        run.backbone,
        export_dir,
        image_size=run.image_size,
        mean=run.mean,
        std=run.std,
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
    flags.DEFINE_enum(
        "format",
        "saved_model",
        list(FORMATS),
        "saved_model: TF Serving SavedModel with backbone.keras and warm-up requests; "
        "onnx: EXPORT_DIR/VERSION/model.onnx, checked with ONNX Runtime.",
    )


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
            export_format=flags.FLAGS.format,
        )
    except (ValueError, ImportError) as error:
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
