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


def test_export_writes_keras_file(backbone, exported):
    _, version_dir = exported
    restored = keras.saving.load_model(os.path.join(version_dir, export.KERAS_FILENAME))
    images = np.random.default_rng(1).normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(
        restored(images, training=False).numpy(), backbone(images, training=False).numpy(), atol=1e-6
    )
    assert getattr(restored, "optimizer", None) is None
    assert len(restored.weights) == len(backbone.weights)


def test_warmup_file_parses_as_prediction_logs(exported):
    prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    _, version_dir = exported
    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        assert log.WhichOneof("log_type") == "predict_log"
        requests.append(log.predict_log.request)
    signatures = [request.model_spec.signature_name for request in requests]
    assert signatures == ["serving_default", "serving_default", "serving_normalized"]

    # Every request must run against the signature it names, as TF Serving replays it.
    loaded = tf.saved_model.load(version_dir)
    for request in requests:
        images = tf.make_ndarray(request.inputs["images"])
        assert list(request.inputs) == ["images"]
        features = loaded.signatures[request.model_spec.signature_name](images=tf.constant(images))["features"]
        assert features.shape == (images.shape[0], FEATURE_DIM)
    assert tf.make_ndarray(requests[0].inputs["images"]).dtype == np.uint8
    assert [tf.make_ndarray(request.inputs["images"]).shape[0] for request in requests] == [1, 8, 1]


def test_interrupt_inside_saved_model_write(backbone, tmp_path, monkeypatch):
    build_archive = export._build_archive

    def build_interrupting_archive(*args):
        archive = build_archive(*args)
        write_out = archive.write_out

        def write_then_interrupt(filepath, **kwargs):
            # The variables and saved_model.pb are on disk when the exception arrives.
            write_out(filepath, **kwargs)
            assert os.path.isfile(os.path.join(filepath, "saved_model.pb"))
            raise KeyboardInterrupt

        archive.write_out = write_then_interrupt
        return archive

    monkeypatch.setattr(export, "_build_archive", build_interrupting_archive)
    export_dir = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        export_to(backbone, export_dir, version=4)
    assert os.listdir(export_dir) == []


def test_export_without_extras(backbone, tmp_path):
    version_dir = export_to(backbone, tmp_path / "model", warmup_requests=False, keras_file=False)
    assert not os.path.exists(os.path.join(version_dir, export.KERAS_FILENAME))
    assert sorted(os.listdir(os.path.join(version_dir, "assets.extra"))) == [export.METADATA_FILENAME]


def run_saved_model_cli(*args):
    # saved_model_cli is TensorFlow's own command, so it never imports mixco_tf.
    command = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    completed = subprocess.run(
        [command, *args],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_saved_model_cli_show(exported):
    _, version_dir = exported
    output = run_saved_model_cli("show", "--dir", version_dir, "--all")
    default = output[output.index("signature_def['serving_default']") :]
    default = default[: default.index("Method name")]
    assert "inputs['images'] tensor_info:" in default
    assert "dtype: DT_UINT8" in default
    assert "shape: (-1, -1, -1, 3)" in default
    assert "outputs['features'] tensor_info:" in default
    assert "dtype: DT_FLOAT" in default
    assert f"shape: (-1, {FEATURE_DIM})" in default
    normalized = output[output.index("signature_def['serving_normalized']") :]
    assert f"shape: (-1, {IMAGE_SIZE}, {IMAGE_SIZE}, 3)" in normalized


@pytest.mark.parametrize("batch", [1, 7])
def test_saved_model_cli_run(backbone, exported, tmp_path, batch):
    _, version_dir = exported
    images = np.random.default_rng(batch).integers(0, 256, size=(batch, 23, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    run_saved_model_cli(
        "run", "--dir", version_dir, "--tag_set", "serve", "--signature_def", "serving_default",
        "--inputs", f"images={tmp_path / 'images.npy'}", "--outdir", str(tmp_path / "out"),
    )
    features = np.load(tmp_path / "out" / "features.npy")
    expected = backbone(resize_and_normalize(images, IMAGE_SIZE, MEAN, STD), training=False).numpy()
    assert features.shape == (batch, FEATURE_DIM)
    np.testing.assert_allclose(features, expected, atol=1e-4)


def test_onnx_export_matches_saved_model(backbone, exported, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    _, saved_model_dir = exported
    version_dir = export.export_backbone_onnx(
        backbone, str(tmp_path / "onnx"), image_size=IMAGE_SIZE, mean=MEAN, std=STD
    )
    assert sorted(os.listdir(version_dir)) == [export.METADATA_FILENAME, export.ONNX_FILENAME]
    assert os.listdir(tmp_path / "onnx") == ["1"]

    session = onnxruntime.InferenceSession(
        os.path.join(version_dir, export.ONNX_FILENAME), providers=["CPUExecutionProvider"]
    )
    assert [(value.name, value.shape) for value in session.get_inputs()] == [
        ("images", ["batch", IMAGE_SIZE, IMAGE_SIZE, 3])
    ]
    assert [(value.name, value.shape) for value in session.get_outputs()] == [("features", ["batch", FEATURE_DIM])]

    serving_normalized = tf.saved_model.load(saved_model_dir).signatures["serving_normalized"]
    for batch in (1, 7):
        images = resize_and_normalize(
            np.random.default_rng(batch).integers(0, 256, size=(batch, 20, 20, 3), dtype=np.uint8),
            IMAGE_SIZE, MEAN, STD,
        ).numpy()
        (onnx_features,) = session.run(["features"], {"images": images})
        saved_model_features = serving_normalized(images=tf.constant(images))["features"].numpy()
        np.testing.assert_allclose(onnx_features, saved_model_features, atol=1e-4)


def test_onnx_export_rejects_existing_version(backbone, tmp_path):
    pytest.importorskip("tf2onnx")
    base = tmp_path / "onnx"
    export.export_backbone_onnx(backbone, str(base), image_size=IMAGE_SIZE, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="already exists"):
        export.export_backbone_onnx(backbone, str(base), image_size=IMAGE_SIZE, mean=MEAN, std=STD)
