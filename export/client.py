"""Sends images to a TensorFlow Serving model of the exported backbone and prints the features' shape.

    python export/client.py --images=a.png,b.jpg                        # REST, localhost:8501
    python export/client.py --images=batch.npy --rest_url=http://host:8501 --output=features.npy
    python export/client.py --images=a.png --grpc_target=localhost:8500  # gRPC

Images are PNG or JPEG files (read with Pillow, or TensorFlow when Pillow is missing) or
`.npy` files of uint8 `[height, width, 3]` or `[batch, height, width, 3]`. All images of
one call must have the same height and width, because they travel as one batch.
`serving_default` resizes them to the training size on the server.

REST sends TF Serving's row format to `POST /v1/models/NAME[/versions/N]:predict`:

    {"signature_name": "serving_default", "instances": [{"images": [[[r, g, b], ...], ...]}, ...]}

and reads `{"predictions": [[f_1, ..., f_dim], ...]}`, one feature vector per image
(TF Serving drops the output name because the signature has a single output). gRPC
sends a `tensorflow.serving.PredictRequest` through `tensorflow-serving-api`.

This file imports nothing from mixco_tf, so it runs on any machine that has NumPy and
requests (REST) or tensorflow-serving-api (gRPC).
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

logger = logging.getLogger("mixco_client")


def load_images(paths):
    """Reads image files into one uint8 batch.

    Args:
        paths: PNG or JPEG files, or `.npy` files of uint8 `[h, w, 3]` or `[b, h, w, 3]`.

    Returns:
        uint8 `[batch, height, width, 3]`.

    Raises:
        ValueError: if a file is missing, not uint8 RGB, or the sizes differ.
    """
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"Image file {path} not found.")
        if path.endswith(".npy"):
            array = np.load(path)
        else:
            array = _decode_image(path)
        if array.ndim == 3:
            array = array[np.newaxis]
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(
                f"{path} contains {array.dtype} {array.shape}, expected uint8 [height, width, 3] or "
                "[batch, height, width, 3] RGB pixels."
            )
        images.extend(array)
    if not images:
        raise ValueError("No images given. Pass --images=FILE[,FILE...].")
    sizes = sorted({image.shape[:2] for image in images})
    if len(sizes) > 1:
        raise ValueError(
            f"The images have different sizes {sizes}; one request carries one batch of a "
            "single size. Resize them first or send one request per size."
        )
    return np.stack(images)


def _decode_image(path):
    try:
        from PIL import Image
    except ImportError:
        import tensorflow as tf

        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def rest_url(base_url, model_name, version=None):
    """Returns the REST predict URL of a model, optionally of one version."""
    version_part = f"/versions/{version}" if version else ""
    return f"{base_url.rstrip('/')}/v1/models/{model_name}{version_part}:predict"


def predict_rest(images, url, signature_name="serving_default", timeout=60.0):
    """Requests features through TF Serving's REST predict API.

    Args:
        images: uint8 `[batch, height, width, 3]`.
        url: the predict URL, see `rest_url`.
        signature_name: signature of the SavedModel to call.
        timeout: seconds to wait for the response.

    Returns:
        float32 `[batch, feature_dim]`.

    Raises:
        RuntimeError: if the server returns an HTTP error or a body without
            `predictions`; the message contains the server's `error` text.
    """
    import requests

    body = {"signature_name": signature_name, "instances": [{"images": image.tolist()} for image in images]}
    response = requests.post(url, json=body, timeout=timeout)
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text[:500]}
    if response.status_code != 200 or "predictions" not in payload:
        raise RuntimeError(
            f"Predict request to {url} failed with HTTP {response.status_code}: {payload.get('error', payload)}"
        )
    return np.asarray(payload["predictions"], dtype=np.float32)


def predict_grpc(images, target, model_name, signature_name="serving_default", version=None, timeout=60.0):
    """Requests features through TF Serving's gRPC PredictionService.

    Args:
        images: uint8 `[batch, height, width, 3]`.
        target: `host:port` of the gRPC endpoint (TF Serving's `--port`, 8500 by default).
        model_name: the served model's name.
        signature_name: signature of the SavedModel to call.
        version: version to call, or None for the latest.
        timeout: seconds to wait for the response.

    Returns:
        float32 `[batch, feature_dim]`.

    Raises:
        grpc.RpcError: when the server rejects or misses the request.
    """
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version:
        request.model_spec.version.value = int(version)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    return tf.make_ndarray(response.outputs["features"]).astype(np.float32)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="Comma-separated PNG, JPEG or .npy files.")
    parser.add_argument("--model_name", default="mixco", help="Served model name (TF Serving's --model_name).")
    parser.add_argument("--version", type=int, default=None, help="Model version to call; default: the latest.")
    parser.add_argument("--signature_name", default="serving_default", help="Signature to call.")
    parser.add_argument("--rest_url", default="http://localhost:8501", help="Base URL of the REST API.")
    parser.add_argument(
        "--grpc_target", default=None, help="host:port of the gRPC API; when given, gRPC is used instead of REST."
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds to wait for the response.")
    parser.add_argument("--output", default=None, help="Optional .npy file for the features.")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        images = load_images([path for path in args.images.split(",") if path])
    except ValueError as error:
        logger.error("%s", error)
        return 2

    if args.grpc_target:
        logger.info("Sending %d images %s over gRPC to %s", len(images), images.shape[1:3], args.grpc_target)
        import grpc

        try:
            features = predict_grpc(
                images, args.grpc_target, args.model_name, args.signature_name, args.version, args.timeout
            )
        except grpc.RpcError as error:
            logger.error("Predict request to %s failed: %s %s", args.grpc_target, error.code(), error.details())
            return 1
    else:
        url = rest_url(args.rest_url, args.model_name, args.version)
        logger.info("Sending %d images %s to %s", len(images), images.shape[1:3], url)
        try:
            features = predict_rest(images, url, args.signature_name, args.timeout)
        except RuntimeError as error:
            logger.error("%s", error)
            return 1

    if args.output:
        np.save(args.output, features)
        logger.info("Wrote %s", args.output)
    print(json.dumps({"features_shape": list(features.shape), "dtype": str(features.dtype)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
