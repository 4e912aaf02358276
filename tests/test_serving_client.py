"""Protocol tests of export/client.py against loopback servers that the tests start.

The servers implement TensorFlow Serving's documented REST predict API
(https://www.tensorflow.org/tfx/serving/api_rest) and gRPC PredictionService over the
exported SavedModel, because the tensorflow_model_server binary cannot be installed on
the test machines. They listen on 127.0.0.1 at a port the OS picks.
"""

import http.server
import json
import os
import re
import subprocess
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import export
from mixco_tf.data import load_dataset
from mixco_tf.preprocess import resize_and_normalize

CLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export", "client.py")
IMAGE_SIZE = 16
MODEL_NAME = "mixco"
PREDICT_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict$")


class ServedModel:
    """The versions of one TF Serving base folder, loaded with tf.saved_model.load."""

    def __init__(self, base_path):
        self.versions = {
            int(name): tf.saved_model.load(os.path.join(base_path, name))
            for name in os.listdir(base_path)
            if name.isdigit()
        }

    def predict(self, version, signature_name, inputs):
        """Runs a signature on named NumPy inputs; raises LookupError or ValueError like the server."""
        version = max(self.versions) if version is None else int(version)
        if version not in self.versions:
            raise LookupError(f"Servable not found for request: Specific({MODEL_NAME}, {version})")
        signatures = self.versions[version].signatures
        if signature_name not in signatures:
            raise ValueError(f"Serving signature name: \"{signature_name}\" not found in signature def")
        _, specs = signatures[signature_name].structured_input_signature
        if set(inputs) != set(specs):
            raise ValueError(f"Expected inputs {sorted(specs)}, got {sorted(inputs)}")
        tensors = {}
        for name, spec in specs.items():
            value = np.asarray(inputs[name])
            if spec.dtype == tf.uint8 and (value.min() < 0 or value.max() > 255 or value.dtype.kind == "f"):
                raise ValueError(f"Input {name} must be uint8 values in [0, 255]")
            tensors[name] = tf.constant(value, dtype=spec.dtype)
        return {name: output.numpy() for name, output in signatures[signature_name](**tensors).items()}


class RestHandler(http.server.BaseHTTPRequestHandler):
    """POST /v1/models/NAME[/versions/N]:predict with the row ("instances") or columnar ("inputs") format."""

    served = None  # set on the subclass a test creates

    def do_POST(self):
        match = PREDICT_PATH.match(self.path)
        if not match or match["name"] != MODEL_NAME:
            return self._reply(404, {"error": f"Servable not found for request: {self.path}"})
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            signature_name = body.get("signature_name", "serving_default")
            if "instances" in body:
                instances = body["instances"]
                # A list of dicts carries named inputs; a bare list is the single input.
                if isinstance(instances[0], dict):
                    inputs = {name: [instance[name] for instance in instances] for name in instances[0]}
                else:
                    inputs = {"images": instances}
                outputs = self.served.predict(match["version"], signature_name, inputs)
                # Row format: one entry per instance; a single output is not named.
                if len(outputs) == 1:
                    payload = {"predictions": next(iter(outputs.values())).tolist()}
                else:
                    payload = {"predictions": [dict(zip(outputs, row)) for row in zip(*outputs.values())]}
            elif "inputs" in body:
                outputs = self.served.predict(match["version"], signature_name, body["inputs"])
                payload = {"outputs": {name: value.tolist() for name, value in outputs.items()}}
                if len(outputs) == 1:
                    payload = {"outputs": next(iter(outputs.values())).tolist()}
            else:
                raise ValueError("Missing 'instances' or 'inputs' key")
        except LookupError as error:
            return self._reply(404, {"error": str(error)})
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
            return self._reply(400, {"error": str(error)})
        self._reply(200, payload)

    def _reply(self, status, payload):
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def backbone():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(24, 3, strides=2, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


@pytest.fixture(scope="module")
def base_path(backbone, tmp_path_factory):
    splits = load_dataset("digits")
    base = tmp_path_factory.mktemp("serving") / MODEL_NAME
    export.export_backbone(backbone, str(base), image_size=IMAGE_SIZE, mean=splits.mean, std=splits.std)
    return str(base)


@pytest.fixture(scope="module")
def rest_server(base_path):
    handler = type("Handler", (RestHandler,), {"served": ServedModel(base_path)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory):
    images = load_dataset("digits").test_numpy[0][:5]
    path = tmp_path_factory.mktemp("images") / "digits.npy"
    np.save(path, images)
    return np.asarray(images), str(path)


def expected_features(backbone, images):
    splits = load_dataset("digits")
    return backbone(resize_and_normalize(images, IMAGE_SIZE, splits.mean, splits.std), training=False).numpy()


def run_client(*args):
    return subprocess.run(
        [sys.executable, CLIENT, *args],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_rest_client_prints_feature_shape(backbone, rest_server, digit_images, tmp_path):
    images, path = digit_images
    output = tmp_path / "features.npy"
    completed = run_client(f"--images={path}", f"--rest_url={rest_server}", f"--output={output}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = json.loads(completed.stdout.strip().splitlines()[-1])
    assert printed == {"features_shape": [5, 24], "dtype": "float32"}
    np.testing.assert_allclose(np.load(output), expected_features(backbone, images), atol=1e-4)


def test_rest_client_png_and_version(backbone, rest_server, digit_images, tmp_path):
    images, _ = digit_images
    path = tmp_path / "digit.png"
    tf.io.write_file(str(path), tf.io.encode_png(images[0]))
    completed = run_client(f"--images={path}", f"--rest_url={rest_server}", "--version=1", f"--output={tmp_path / 'f.npy'}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), expected_features(backbone, images[:1]), atol=1e-4)


def test_rest_client_reports_server_error(rest_server, digit_images):
    _, path = digit_images
    completed = run_client(f"--images={path}", f"--rest_url={rest_server}", "--signature_name=serving_nothing")
    assert completed.returncode == 1
    assert "HTTP 400" in completed.stderr
    assert "serving_nothing" in completed.stderr


def test_rest_client_missing_version(rest_server, digit_images):
    _, path = digit_images
    completed = run_client(f"--images={path}", f"--rest_url={rest_server}", "--version=7")
    assert completed.returncode == 1
    assert "HTTP 404" in completed.stderr


def test_columnar_request_format(backbone, rest_server, digit_images):
    # The documented columnar format, as the README's curl example sends it.
    requests = pytest.importorskip("requests")
    images, _ = digit_images
    response = requests.post(
        f"{rest_server}/v1/models/{MODEL_NAME}:predict",
        json={"signature_name": "serving_default", "inputs": {"images": images[:2].tolist()}},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        np.asarray(response.json()["outputs"]), expected_features(backbone, images[:2]), atol=1e-4
    )


def test_client_rejects_mixed_sizes(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((8, 8, 3), np.uint8))
    np.save(tmp_path / "b.npy", np.zeros((9, 8, 3), np.uint8))
    completed = run_client(f"--images={tmp_path / 'a.npy'},{tmp_path / 'b.npy'}", "--rest_url=http://127.0.0.1:9")
    assert completed.returncode == 2
    assert "different sizes" in completed.stderr


def test_grpc_client(backbone, base_path, digit_images, tmp_path):
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tensorflow_serving.apis")
    from concurrent import futures

    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    served = ServedModel(base_path)

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            version = request.model_spec.version.value if request.model_spec.HasField("version") else None
            inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
            try:
                outputs = served.predict(version, request.model_spec.signature_name or "serving_default", inputs)
            except ValueError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            response = predict_pb2.PredictResponse()
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        images, path = digit_images
        completed = run_client(f"--images={path}", f"--grpc_target=127.0.0.1:{port}", f"--output={tmp_path / 'g.npy'}")
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert json.loads(completed.stdout.strip().splitlines()[-1])["features_shape"] == [5, 24]
        np.testing.assert_allclose(np.load(tmp_path / "g.npy"), expected_features(backbone, images), atol=1e-4)

        failed = run_client(f"--images={path}", f"--grpc_target=127.0.0.1:{port}", "--signature_name=nope")
        assert failed.returncode == 1
        assert "INVALID_ARGUMENT" in failed.stderr
    finally:
        server.stop(grace=None)
