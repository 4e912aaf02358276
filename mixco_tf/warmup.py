"""TensorFlow Serving warm-up records for an exported backbone.

TensorFlow Serving replays the requests in `VERSION/assets.extra/tf_serving_warmup_requests`
(a TFRecord file of `tensorflow.serving.PredictionLog` protos) when it loads a version,
before the version receives traffic, so the first user request does not pay for graph
initialization. The protos come from the optional package `tensorflow-serving-api`
(`pip install mixco_tf[serving]`, or `pip install --no-deps tensorflow-serving-api` next
to tensorflow-cpu, because that package requires the `tensorflow` distribution).
"""

import logging
import os

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

WARMUP_FILENAME = "tf_serving_warmup_requests"

# Batch sizes of the warm-up requests of `serving_default`: a single image, as most
# online clients send, and a small batch, so both shapes are traced before traffic.
WARMUP_BATCH_SIZES = (1, 8)


def serving_api_available():
    """Returns whether `tensorflow_serving.apis` can be imported."""
    try:
        from tensorflow_serving.apis import prediction_log_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def build_warmup_requests(image_size, model_name="mixco"):
    """Builds one PredictionLog per warm-up request.

    Args:
        image_size: side of the backbone's input images, in pixels.
        model_name: `model_spec.name` of the requests. TensorFlow Serving replays
            warm-up records against the version it is loading, whatever this name is.

    Returns:
        List of `tensorflow.serving.PredictionLog`: `serving_default` with uint8 mid-gray
        images `[b, image_size, image_size, 3]` for each b in `WARMUP_BATCH_SIZES`, and
        `serving_normalized` with float32 zeros `[1, image_size, image_size, 3]`.

    Raises:
        ImportError: if `tensorflow-serving-api` is not installed.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    inputs = [
        ("serving_default", np.full((batch, image_size, image_size, 3), 128, np.uint8))
        for batch in WARMUP_BATCH_SIZES
    ]
    inputs.append(("serving_normalized", np.zeros((1, image_size, image_size, 3), np.float32)))

    records = []
    for signature_name, images in inputs:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature_name
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return records


def write_warmup_requests(saved_model_dir, image_size):
    """Writes `saved_model_dir/assets.extra/tf_serving_warmup_requests`.

    Args:
        saved_model_dir: a SavedModel folder (a version folder or its temporary twin).
        image_size: side of the backbone's input images, in pixels.

    Returns:
        Path of the written file, or None when `tensorflow-serving-api` is missing, in
        which case the logged warning gives the install command.
    """
    if not serving_api_available():
        logger.warning(
            "tensorflow-serving-api is not installed, so the export has no TF Serving warm-up "
            "requests and the first request to a new version is slower. Install it with "
            "`pip install --no-deps tensorflow-serving-api` (with tensorflow-cpu) or "
            "`pip install tensorflow-serving-api` (with tensorflow)."
        )
        return None
    extra_dir = os.path.join(saved_model_dir, "assets.extra")
    os.makedirs(extra_dir, exist_ok=True)
    path = os.path.join(extra_dir, WARMUP_FILENAME)
    with tf.io.TFRecordWriter(path) as writer:
        for record in build_warmup_requests(image_size):
            writer.write(record.SerializeToString())
    return path
