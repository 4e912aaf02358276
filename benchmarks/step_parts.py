"""Time split of a MixCo training step: each part compiled and timed alone.

    TF_ENABLE_ONEDNN_OPTS=1 python -m benchmarks.step_parts --image_size=64 --batch_size=128

For MixCo (beta = 1) and MoCo-v2 (beta = 0), ResNet-18 with the imagenet stem and a
queue of 16,384, it times the compiled train function, then the query encoder's
forward + backward + SGD on the query batch (B images, plus B / 2 mixed ones for
MixCo), its forward pass alone, the key encoder's forward pass (split BatchNorm), the
query backbone's forward pass on the key batch (Keras's fused BatchNorm) and the
momentum update. "rest" is the step minus the query pass, the key pass and the
momentum update: mixing, logits against the queue, losses and enqueue.
"""

import argparse
import os
import statistics
import sys
import time


def _median_seconds(function, repeats):
    import tensorflow as tf

    function()
    function()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda value: value.numpy(), function())
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def measure(method, image_size, batch_size, repeats, width_multiplier=1.0):
    """Returns part name -> median seconds for one method ("mixco" or "moco")."""
    import keras
    import tensorflow as tf

    from mixco_tf.models import MixCo

    images = tf.random.normal([batch_size, image_size, image_size, 3])
    model = MixCo(
        backbone="resnet18",
        stem="imagenet",
        width_multiplier=width_multiplier,
        queue_size=16384,
        mix_weight=1.0 if method == "mixco" else 0.0,
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
    views = tf.data.Dataset.from_tensors((images, images)).repeat()
    model.fit(views, steps_per_epoch=1, epochs=1, verbose=0)
    iterator = iter(views)

    num_queries = batch_size + (batch_size // 2 if method == "mixco" else 0)
    queries = tf.random.normal([num_queries, image_size, image_size, 3])
    variables = model.backbone.trainable_variables + model.projection_head.trainable_variables
    optimizer = keras.optimizers.SGD(0.03, momentum=0.9)
    optimizer.build(variables)

    @tf.function
    def query_pass():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model.encode_queries(queries)[:, 0])
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    @tf.function
    def query_forward():
        return tf.reduce_sum(model.encode_queries(queries))

    @tf.function
    def key_forward():
        return tf.reduce_sum(model.encode_keys(images))

    @tf.function
    def fused_batch_norm_forward():
        return tf.reduce_sum(model.backbone(images, training=True))

    @tf.function
    def momentum_update():
        model.update_key_encoder()
        return tf.constant(0.0)

    parts = {
        "whole step": _median_seconds(lambda: model.train_function(iterator)["loss"], repeats),
        "query forward + backward + SGD": _median_seconds(query_pass, repeats),
        "query forward": _median_seconds(query_forward, repeats),
        "key forward (split BatchNorm)": _median_seconds(key_forward, repeats),
        "backbone forward, fused BatchNorm, key batch": _median_seconds(fused_batch_norm_forward, repeats),
        "momentum update": _median_seconds(momentum_update, repeats),
    }
    parts["rest"] = (
        parts["whole step"]
        - parts["query forward + backward + SGD"]
        - parts["key forward (split BatchNorm)"]
        - parts["momentum update"]
    )
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_parts", description=__doc__.split("\n")[0])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    if args.batch_size < 8 or args.batch_size % 8:
        parser.error(f"invalid --batch_size={args.batch_size}: use a multiple of 8 (the key encoder's 8 BatchNorm groups)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mixco_tf import runtime

    results = {
        method: measure(method, args.image_size, args.batch_size, args.repeats, args.width_multiplier)
        for method in ("mixco", "moco")
    }
    print(f"oneDNN: {runtime.onednn_enabled()}, {args.image_size} px, batch {args.batch_size}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'part':46} {'mixco (s)':>9} {'moco (s)':>9}")
    for part in results["mixco"]:
        print(f"{part:46} {results['mixco'][part]:9.3f} {results['moco'][part]:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
