"""Runs MixCo on 2 logical CPU devices and prints the measured values as JSON.

TensorFlow splits the CPU into logical devices only before its runtime starts, so
`tests/test_distribute.py` runs this file in a fresh process:

    python tests/replica_checks.py CHECK

and reads the JSON object on the last line of stdout. CHECK is one of `CHECKS`.
"""

import json
import sys

import tensorflow as tf

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from mixco_tf.models import MixCo  # noqa: E402

BATCH = 8
IMAGE = 8
STEPS = 3
DEVICES = ["/cpu:0", "/cpu:1"]


def _model(**overrides):
    settings = dict(
        backbone="resnet18",
        stem="cifar",
        width_multiplier=0.0625,
        projection_dim=8,
        queue_size=32,
        moco_momentum=0.9,
        key_bn_splits=2,
        weight_decay=1e-4,
        seed=3,
    )
    settings.update(overrides)
    keras.utils.set_random_seed(0)
    model = MixCo(**settings)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.optimizer.build(model.trainable_variables)
    return model


def _views(seed=0):
    rng = np.random.default_rng(seed)
    view_q = rng.normal(size=(STEPS * BATCH, IMAGE, IMAGE, 3)).astype("float32")
    view_k = rng.normal(size=(STEPS * BATCH, IMAGE, IMAGE, 3)).astype("float32")
    return view_q, view_k


def _dataset(view_q, view_k):
    return tf.data.Dataset.from_tensor_slices((view_q, view_k)).batch(BATCH, drop_remainder=True)


def _replica_values(variable):
    """Returns the value of `variable` on each replica, as NumPy arrays."""
    return [component.numpy() for component in variable.value.values]


def check_queue(batch_norm):
    """Trains 3 steps on 2 replicas; returns per-replica queue, pointer and key weights."""
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    with strategy.scope():
        model = _model(batch_norm=batch_norm)
    view_q, view_k = _views()
    model.fit(_dataset(view_q, view_k), epochs=1, verbose=0)

    queues = _replica_values(model.queue)
    pointers = [int(p) for p in _replica_values(model.queue_pointer)]
    key_weights = [_replica_values(k) for _, k in model.key_encoder_pairs]
    key_differences = [float(np.abs(w[0] - w[1]).max()) for w in key_weights]
    query_differences = [
        float(np.abs(a - b).max()) for a, b in (_replica_values(v) for v in model.trainable_weights)
    ]
    result = {
        "queue_difference": float(np.abs(queues[0] - queues[1]).max()),
        "pointers": pointers,
        "key_weight_difference": max(key_differences),
        "query_weight_difference": max(query_differences),
    }
    if batch_norm == "none":
        # Without BatchNorm a key depends on its own image only, so the last step's keys
        # can be recomputed on one device with the final key encoder, which the step
        # does not change after encoding them.
        last_keys = view_k[(STEPS - 1) * BATCH :]
        projections = model.key_projection_head(model.key_backbone(last_keys, training=True), training=True)
        expected = tf.math.l2_normalize(projections, axis=-1).numpy()
        start = ((STEPS - 1) * BATCH) % model.queue_size
        result["last_keys_difference"] = float(np.abs(queues[0][start : start + BATCH] - expected).max())
    return result


def check_replicas_match_one_device():
    """Trains a BN-free MoCo-v2 (beta = 0) 3 steps on 2 replicas and on one device."""
    view_q, view_k = _views()
    results = {}
    for name, strategy in (
        ("one_device", tf.distribute.get_strategy()),
        ("mirrored", tf.distribute.MirroredStrategy(DEVICES)),
    ):
        with strategy.scope():
            # A large weight decay makes a wrong decay scaling visible in 3 steps.
            model = _model(batch_norm="none", mix_weight=0.0, weight_decay=1e-2)
        initial = [w.numpy() for w in model.weights]
        history = model.fit(_dataset(view_q, view_k), epochs=1, verbose=0)
        results[name] = {
            "loss": history.history["loss"][-1],
            "initial": initial,
            "final": [w.numpy() for w in model.weights],
            "names": [f"{i}:{w.path}" for i, w in enumerate(model.weights)],
            "float": [w.dtype == "float32" for w in model.weights],
        }
    single, mirrored = results["one_device"], results["mirrored"]
    return {
        "loss_one_device": single["loss"],
        "loss_mirrored": mirrored["loss"],
        "initial_difference": max(
            float(np.abs(a - b).max()) for a, b in zip(single["initial"], mirrored["initial"])
        ),
        "final_difference": {
            name: float(np.abs(a.astype(np.float64) - b).max())
            for name, a, b in zip(single["names"], single["final"], mirrored["final"])
        },
        "largest_update": max(
            float(np.abs(a.astype(np.float64) - b).max())
            for a, b, is_float in zip(single["initial"], single["final"], single["float"])
            if is_float
        ),
    }


def check_positives_aligned():
    """Encodes the same images as queries and keys on 2 replicas through Shuffle-BN."""
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    with strategy.scope():
        model = _model(batch_norm="none", key_bn_splits=1)
    images, _ = _views()
    images = images[: 2 * BATCH]
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(images).batch(2 * BATCH, drop_remainder=True)
    )

    @tf.function
    def positives(batch):
        def replica_fn(x):
            q = model.encode_queries(x)
            k = model.encode_keys(x)
            return tf.reduce_sum(q * k, axis=-1) / model.temperature

        return strategy.run(replica_fn, args=(batch,))

    per_replica = positives(next(iter(dataset)))
    logits = np.concatenate([t.numpy() for t in per_replica.values])
    return {"positive_logits": logits.tolist(), "temperature": model.temperature}


CHECKS = {
    "queue_shuffle": lambda: check_queue("shuffle"),
    "queue_none": lambda: check_queue("none"),
    "replicas_match_one_device": check_replicas_match_one_device,
    "positives_aligned": check_positives_aligned,
}

if __name__ == "__main__":
    print(json.dumps(CHECKS[sys.argv[1]]()))
