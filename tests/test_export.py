"""Tests of mixco_tf.export: layout, signatures, atomic writes and loading without mixco_tf."""

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import export
from mixco_tf.preprocess import resize_and_normalize

IMAGE_SIZE = 16
FEATURE_DIM = 12
MEAN = (0.45, 0.40, 0.35)
STD = (0.25, 0.22, 0.20)


def make_backbone(seed):
    """Conv2D + BatchNormalization + ReLU + global pooling, trained one step with SGD.

    The training step gives the BatchNormalization layer non-trivial moving statistics
    (so training=False matters) and creates optimizer variables that must not be exported.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(FEATURE_DIM, 3, strides=2, padding="same")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.0)(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    backbone = keras.Model(inputs, outputs)
    backbone.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    rng = np.random.default_rng(seed)
    backbone.fit(
        rng.normal(1.0, 2.0, size=(8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
        rng.normal(size=(8, FEATURE_DIM)).astype(np.float32),
        epochs=1,
        verbose=0,
    )
    return backbone


def export_to(backbone, export_dir, **kwargs):
    return export.export_backbone(backbone, str(export_dir), image_size=IMAGE_SIZE, mean=MEAN, std=STD, **kwargs)


def hidden_entries(folder):
    return [name for name in os.listdir(folder) if name.startswith(".")]


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(seed=0)


@pytest.fixture(scope="module")
def exported(backbone, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export") / "backbone"
    return export_dir, export_to(backbone, export_dir)


def test_export_layout(exported):
    export_dir, version_dir = exported
    assert version_dir == os.path.join(str(export_dir), "1")
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(version_dir, "variables"))
    assert sorted(os.listdir(export_dir)) == ["1"]


def test_export_metadata(exported):
    _, version_dir = exported
    with open(os.path.join(version_dir, "assets.extra", export.METADATA_FILENAME), encoding="utf-8") as stream:
        metadata = json.load(stream)
    assert metadata["image_size"] == IMAGE_SIZE
    assert metadata["feature_dim"] == FEATURE_DIM
    assert metadata["mean"] == pytest.approx(MEAN)
    assert metadata["std"] == pytest.approx(STD)


def test_export_signatures(exported):
    _, version_dir = exported
    loaded = tf.saved_model.load(version_dir)
    assert set(loaded.signatures) == {"serving_default", "serving_normalized"}

    default = loaded.signatures["serving_default"]
    _, inputs = default.structured_input_signature
    assert list(inputs) == ["images"]
    assert inputs["images"].dtype == tf.uint8
    assert inputs["images"].shape.as_list() == [None, None, None, 3]
    assert list(default.structured_outputs) == ["features"]
    assert default.structured_outputs["features"].dtype == tf.float32
    assert default.structured_outputs["features"].shape.as_list() == [None, FEATURE_DIM]

    normalized = loaded.signatures["serving_normalized"]
    _, inputs = normalized.structured_input_signature
    assert inputs["images"].dtype == tf.float32
    assert inputs["images"].shape.as_list() == [None, IMAGE_SIZE, IMAGE_SIZE, 3]
    assert list(normalized.structured_outputs) == ["features"]


def test_export_saves_only_backbone_variables(backbone, exported):
    _, version_dir = exported
    checkpoint = os.path.join(version_dir, "variables", "variables")
    saved_shapes = sorted(
        tuple(shape) for name, shape in tf.train.list_variables(checkpoint) if name.startswith("variables/")
    )
    backbone_shapes = sorted(tuple(weight.shape) for weight in backbone.weights)
    assert saved_shapes == backbone_shapes
    assert backbone.optimizer.variables, "the fixture must have optimizer variables to leave out"


def test_existing_version_raises(backbone, exported):
    export_dir, _ = exported
    with pytest.raises(ValueError, match="already exists"):
        export_to(backbone, export_dir)


def test_overwrite_replaces_version(backbone, tmp_path):
    export_dir = tmp_path / "model"
    export_to(backbone, export_dir, version=3)
    other_backbone = make_backbone(seed=1)
    version_dir = export_to(other_backbone, export_dir, version=3, overwrite=True)

    images = np.random.default_rng(0).integers(0, 256, size=(2, 20, 20, 3), dtype=np.uint8)
    served = tf.saved_model.load(version_dir).signatures["serving_default"](images=tf.constant(images))
    expected = other_backbone(resize_and_normalize(images, IMAGE_SIZE, MEAN, STD), training=False)
    np.testing.assert_allclose(served["features"].numpy(), expected.numpy(), atol=1e-4)
    assert sorted(os.listdir(export_dir)) == ["3"]


def test_failure_leaves_no_folders(backbone, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    # The SavedModel is complete on disk when the metadata is written, so a failure there
    # leaves the most files to clean up.
    monkeypatch.setattr(export, "_write_metadata", fail)
    export_dir = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        export_to(backbone, export_dir)
    assert os.listdir(export_dir) == []


def test_failed_overwrite_keeps_old_version(backbone, tmp_path, monkeypatch):
    export_dir = tmp_path / "model"
    version_dir = export_to(backbone, export_dir)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_metadata", fail)
    with pytest.raises(RuntimeError):
        export_to(backbone, export_dir, overwrite=True)
    assert sorted(os.listdir(export_dir)) == ["1"]
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert hidden_entries(export_dir) == []


@pytest.mark.parametrize("version", [0, -1, "1", True])
def test_invalid_version_raises(backbone, tmp_path, version):
    with pytest.raises(ValueError, match="version must be a positive integer"):
        export_to(backbone, tmp_path / "model", version=version)


def test_unpooled_backbone_raises(tmp_path):
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    feature_map = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    with pytest.raises(ValueError, match=r"expected \[batch, feature_dim\]"):
        export_to(feature_map, tmp_path / "model")


LOAD_WITHOUT_MIXCO = textwrap.dedent(
    """
    import os
    import sys

    import keras
    import numpy as np
    import tensorflow as tf

    version_dir, data_dir = sys.argv[1], sys.argv[2]
    images = np.load(os.path.join(data_dir, "images.npy"))
    normalized = np.load(os.path.join(data_dir, "normalized.npy"))

    loaded = tf.saved_model.load(version_dir)
    serving_default = loaded.signatures["serving_default"]
    serving_normalized = loaded.signatures["serving_normalized"]
    layer = keras.layers.TFSMLayer(version_dir, call_endpoint="serving_default")

    outputs = {
        "saved_model_batch7": serving_default(images=tf.constant(images))["features"],
        "saved_model_batch1": serving_default(images=tf.constant(images[:1]))["features"],
        "tfsm_layer_batch7": layer(images)["features"],
        "tfsm_layer_batch1": layer(images[:1])["features"],
        "normalized_batch7": serving_normalized(images=tf.constant(normalized))["features"],
    }
    for name, features in outputs.items():
        np.save(os.path.join(data_dir, name + ".npy"), keras.ops.convert_to_numpy(features))

    if "mixco_tf" in sys.modules:
        sys.exit("mixco_tf was imported while loading the export")
    """
)


def test_export_loads_without_mixco_tf(backbone, exported, tmp_path):
    _, version_dir = exported
    # 45x37 differs from the 16x16 training size in both directions and aspect ratio.
    images = np.random.default_rng(0).integers(0, 256, size=(7, 45, 37, 3), dtype=np.uint8)
    normalized = resize_and_normalize(images, IMAGE_SIZE, MEAN, STD)
    expected = backbone(normalized, training=False).numpy()
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "normalized.npy", normalized.numpy())

    completed = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_MIXCO, version_dir, str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    for name in ("saved_model_batch7", "tfsm_layer_batch7", "normalized_batch7"):
        features = np.load(tmp_path / f"{name}.npy")
        assert features.dtype == np.float32, name
        np.testing.assert_allclose(features, expected, atol=1e-4, err_msg=name)
    for name in ("saved_model_batch1", "tfsm_layer_batch1"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected[:1], atol=1e-4, err_msg=name)


def test_export_dir_that_is_a_file_raises(backbone, tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        export.export_backbone(backbone, str(path), image_size=IMAGE_SIZE, mean=MEAN, std=STD)
