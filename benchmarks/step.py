"""Throughput of the real `MixCo.train_step`, with its FLOP count and utilization.

    python -m benchmarks.step --methods=mixco,moco --image_size=32,64 --output=step.jsonl

Every combination of the comma-separated flag values except --methods runs in its own
subprocess, so the precision policy and the matmul reference of one setting do not leak
into the next. Each subprocess:

1. measures the dense matmul rate (a 2048 x 2048 float matmul, 2 n^3 FLOP) at float32
   and at the configuration's compute dtype;
2. builds one `MixCo` per method (`mix_weight=0` for moco) and trains each through
   `model.fit` on one synthetic batch repeated, after a warm-up that traces the step;
3. times `--repeats` runs of `--steps` calls of the train function that `fit` compiled,
   per method, alternating the methods, and reports the median step time.
   `peak_rss_mb` is the process's peak resident memory while that method trains, with
   every method's model resident.

FLOP count of one step: F is the forward FLOP per image of the query encoder (backbone
and projection head), counted from the traced graph as 2 x multiply-adds of every
Conv2D and MatMul. A backward pass costs 2 F, so with B images per batch:

    moco:  3 F B (queries, forward + backward) + F B (keys, forward)
    mixco: 3 F (B + B / 2) + F B, because the B / 2 mixed images share the query pass.

The logits against the queue add 2 B K d FLOP forward (and the mixed queries' B K d);
they are counted too. Element-wise work (BatchNorm, ReLU, the momentum update) is not.

`utilization` divides the achieved FLOP/s by the matmul rate at the configuration's
precision; `utilization_fp32` by the float32 matmul rate. The figures are ratios measured
in one process, so a shared machine moves both sides together.
"""

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks import flags, workers

FIELDS = (
    "method",
    "backbone",
    "width_multiplier",
    "stem",
    "image_size",
    "batch_size",
    "precision",
    "jit_compile",
    "onednn",
    "images_per_second",
    "step_seconds_median",
    "peak_rss_mb",
    "step_gflop",
    "utilization",
    "utilization_fp32",
    "matmul_gflops",
    "matmul_gflops_fp32",
)
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
COMPUTE_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", type=flags.list_of(str), default=["mixco", "moco"])
    parser.add_argument("--backbone", type=flags.list_of(str), default=["resnet18"])
    parser.add_argument("--width_multiplier", type=flags.list_of(float), default=[1.0])
    parser.add_argument("--stem", type=flags.list_of(str), default=["imagenet"])
    parser.add_argument("--image_size", type=flags.list_of(int), default=[64])
    parser.add_argument("--batch_size", type=flags.list_of(int), default=[128])
    parser.add_argument("--precision", type=flags.list_of(str), default=["float32"])
    parser.add_argument("--jit_compile", type=flags.list_of(flags.parse_bool), default=[False])
    parser.add_argument(
        "--onednn",
        type=flags.list_of(flags.parse_switch),
        default=[None],
        help="TF_ENABLE_ONEDNN_OPTS of the worker: true, false, or default (TensorFlow's choice for this CPU)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queue_size", type=int, default=16384)
    parser.add_argument("--steps_per_execution", type=int, default=1)
    parser.add_argument("--output", default=None, help="JSON-lines file, one record per configuration")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def settings(args):
    """Yields one setting dict per combination of the list-valued flags except --methods."""
    for values in itertools.product(
        args.backbone,
        args.width_multiplier,
        args.stem,
        args.image_size,
        args.batch_size,
        args.precision,
        args.jit_compile,
        args.onednn,
    ):
        backbone, width, stem, size, batch, precision, jit, onednn = values
        yield {
            "backbone": backbone,
            "width_multiplier": width,
            "stem": stem,
            "image_size": size,
            "batch_size": batch,
            "precision": precision,
            "jit_compile": jit,
            "onednn": onednn,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "repeats": args.repeats,
            "queue_size": args.queue_size,
            "steps_per_execution": args.steps_per_execution,
        }


def validate(methods, config):
    from mixco_tf.models.resnet import BLOCKS, STEMS

    if config["backbone"] not in BLOCKS:
        raise ValueError(f"invalid backbone {config['backbone']!r}: use one of {', '.join(sorted(BLOCKS))}")
    if config["stem"] not in STEMS:
        raise ValueError(f"invalid stem {config['stem']!r}: use one of {', '.join(STEMS)}")
    for name in ("steps", "repeats", "warmup_steps"):
        if config[name] < 1:
            raise ValueError(f"invalid --{name}={config[name]}: use 1 or more")
    for method in methods:
        if method not in ("mixco", "moco"):
            raise ValueError(f"invalid method {method!r} in --methods: use mixco or moco")
    if config["precision"] not in PRECISIONS:
        raise ValueError(f"invalid precision {config['precision']!r}: use one of {', '.join(PRECISIONS)}")
    if config["batch_size"] < 2 or config["batch_size"] % 8:
        raise ValueError(
            f"invalid batch_size {config['batch_size']}: use a multiple of 8 (the key encoder's 8 BatchNorm groups)"
        )
    if config["queue_size"] < config["batch_size"]:
        raise ValueError(f"invalid queue_size {config['queue_size']}: use at least batch_size {config['batch_size']}")


# ---------------------------------------------------------------------- in the worker


def matmul_gflops(dtype, size=2048, repeats=10):
    """Measures the dense matmul rate in GFLOP/s: the median of `repeats` timed matmuls."""
    import tensorflow as tf

    a = tf.random.normal([size, size], dtype=tf.float32)
    a = tf.cast(a, dtype)
    b = tf.cast(tf.random.normal([size, size], dtype=tf.float32), dtype)

    @tf.function
    def product(x, y):
        # A reduction forces the whole product to be computed inside the call.
        return tf.reduce_sum(tf.cast(tf.matmul(x, y), tf.float32))

    product(a, b).numpy()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).numpy()
        durations.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(durations) / 1e9


def encoder_forward_flops(model, image_size):
    """Returns F: the Conv2D and MatMul FLOP (2 x multiply-adds) of one image's query pass."""
    import tensorflow as tf

    @tf.function
    def forward(images):
        return model.projection_head(model.backbone(images, training=False), training=False)

    graph = forward.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            output = op.outputs[0].shape  # [1, h, w, out]
            kernel = op.inputs[1].shape  # [kh, kw, in, out]
            total += 2 * output[1] * output[2] * kernel[0] * kernel[1] * kernel[2] * kernel[3]
        elif op.type == "MatMul":
            a_shape, b_shape = op.inputs[0].shape, op.inputs[1].shape
            transpose_a = op.get_attr("transpose_a")
            transpose_b = op.get_attr("transpose_b")
            m = a_shape[1] if transpose_a else a_shape[0]
            k = a_shape[0] if transpose_a else a_shape[1]
            n = b_shape[0] if transpose_b else b_shape[1]
            total += 2 * m * k * n
    return total


def step_flops(forward_flops, batch_size, method, queue_size, projection_dim):
    """Returns the FLOP of one training step; see the module docstring."""
    mixed = batch_size // 2 if method == "mixco" else 0
    network = 3 * forward_flops * (batch_size + mixed) + forward_flops * batch_size
    # Forward logits against the queue; the backward pass to the queries costs the same.
    logits = 2 * (batch_size + mixed) * queue_size * projection_dim * 2
    return network + logits


def _reset_peak_rss():
    """Resets the kernel's peak resident set size of this process (Linux `clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as stream:
            stream.write("5")
    except OSError:
        pass


def _peak_rss_mb():
    """Returns the peak resident set size since the last reset, in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(group):
    """Measures every method of one setting in one process; returns one record per method.

    The methods' timed calls alternate (mixco, moco, mixco, ...), so a change of load on
    a shared machine affects both sides of the MixCo / MoCo ratio alike.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from mixco_tf import runtime
    from mixco_tf.models import MixCo

    setting = group["setting"]
    if setting["onednn"] is not None and runtime.onednn_enabled() != setting["onednn"]:
        raise RuntimeError(
            f"the worker requested onednn={setting['onednn']} but TensorFlow reports "
            f"{runtime.onednn_enabled()}: this TensorFlow build ignores {runtime.ONEDNN_VARIABLE}"
        )

    matmul_fp32 = matmul_gflops(tf.float32)
    compute_dtype = COMPUTE_DTYPES[setting["precision"]]
    matmul_same = matmul_fp32 if compute_dtype == "float32" else matmul_gflops(getattr(tf, compute_dtype))

    keras.mixed_precision.set_global_policy(setting["precision"])
    projection_dim = 128
    size, batch = setting["image_size"], setting["batch_size"]
    rng = np.random.default_rng(0)
    view_q = rng.normal(size=(batch, size, size, 3)).astype("float32")
    view_k = rng.normal(size=(batch, size, size, 3)).astype("float32")
    views = tf.data.Dataset.from_tensors((view_q, view_k)).repeat().prefetch(2)

    models, peaks, step_seconds, losses = {}, {}, {}, {}
    for method in group["methods"]:
        _reset_peak_rss()
        model = MixCo(
            backbone=setting["backbone"],
            stem=setting["stem"],
            width_multiplier=setting["width_multiplier"],
            projection_dim=projection_dim,
            queue_size=setting["queue_size"],
            mix_weight=1.0 if method == "mixco" else 0.0,
            seed=0,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.03, momentum=0.9),
            jit_compile=setting["jit_compile"],
            steps_per_execution=setting["steps_per_execution"],
        )
        model.fit(views, steps_per_epoch=setting["warmup_steps"], epochs=1, verbose=0)
        models[method], peaks[method], step_seconds[method] = model, _peak_rss_mb(), []

    # `fit` costs about 2 s per call here (data adapter, iterator, callbacks), so the timed
    # steps call the compiled train function that `fit` built, on one iterator.
    iterators = {method: iter(views) for method in models}
    for _ in range(setting["repeats"]):
        for method, model in models.items():
            _reset_peak_rss()
            start = time.perf_counter()
            for _ in range(setting["steps"]):
                logs = model.train_function(iterators[method])
            # Reading the loss waits for the last step to finish.
            losses[method] = float(logs["loss"])
            step_seconds[method].append((time.perf_counter() - start) / setting["steps"])
            peaks[method] = max(peaks[method], _peak_rss_mb())

    records = []
    for method, model in models.items():
        if not np.isfinite(losses[method]):
            raise FloatingPointError(f"non-finite loss {losses[method]} for {method} at {setting}")
        median = statistics.median(step_seconds[method])
        forward = encoder_forward_flops(model, size)
        flops = step_flops(forward, batch, method, setting["queue_size"], projection_dim)
        achieved = flops / median / 1e9
        record = {"method": method, **{key: setting[key] for key in FIELDS if key in setting}}
        record["onednn"] = runtime.onednn_enabled()  # what ran, also for "default"
        record.update(
            images_per_second=batch / median,
            step_seconds_median=median,
            step_seconds=step_seconds[method],
            peak_rss_mb=peaks[method],
            forward_gflop_per_image=forward / 1e9,
            step_gflop=flops / 1e9,
            utilization=achieved / matmul_same,
            utilization_fp32=achieved / matmul_fp32,
            matmul_gflops=matmul_same,
            matmul_gflops_fp32=matmul_fp32,
            final_loss=losses[method],
            steps=setting["steps"],
            repeats=setting["repeats"],
            queue_size=setting["queue_size"],
            cpu_count=os.cpu_count(),
            load_average=os.getloadavg()[0],
            tensorflow=tf.__version__,
            keras=keras.__version__,
        )
        records.append(record)
    return records


# ---------------------------------------------------------------------- the driver


def _ratio_lines(records):
    """Returns 'MixCo / MoCo step time' lines for configurations measured with both methods."""
    by_key = {}
    for record in records:
        key = tuple(record[name] for name in FIELDS[1:9])
        by_key.setdefault(key, {})[record["method"]] = record
    lines = []
    for key, methods in by_key.items():
        if {"mixco", "moco"} <= methods.keys():
            ratio = methods["mixco"]["step_seconds_median"] / methods["moco"]["step_seconds_median"]
            flop_ratio = methods["mixco"]["step_gflop"] / methods["moco"]["step_gflop"]
            described = ", ".join(f"{name}={value}" for name, value in zip(FIELDS[1:9], key))
            lines.append(f"MixCo / MoCo step time {ratio:.3f} (FLOP ratio {flop_ratio:.3f}) at {described}")
    return lines


def _format_row(record):
    return (
        f"{record['method']:6} {record['backbone']:8} {record['width_multiplier']:5.2f} {record['stem']:8} "
        f"{record['image_size']:4d} {record['batch_size']:5d} {record['precision']:14} "
        f"{'on' if record['jit_compile'] else 'off':3} {'on' if record['onednn'] else 'off':6} "
        f"{record['images_per_second']:7.1f} "
        f"{record['step_seconds_median']:7.3f} {record['step_gflop']:7.1f} {record['utilization']:5.2f} "
        f"{record['utilization_fp32']:6.2f} {record['peak_rss_mb']:7.0f}"
    )


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.error(f"invalid --output={args.output!r}: its folder does not exist; create it first")
    groups = [{"methods": args.methods, "setting": setting} for setting in settings(args)]
    for group in groups:
        try:
            validate(args.methods, group["setting"])
        except ValueError as error:
            parser.error(str(error))
    print(
        f"{'method':6} {'backbone':8} {'width':>5} {'stem':8} {'size':>4} {'batch':>5} {'precision':14} "
        f"{'xla':3} {'onednn':6} {'img/s':>7} {'step s':>7} {'GFLOP':>7} {'util':>5} {'util32':>6} {'RSS MB':>7}"
    )
    records, failures = [], 0
    for group in groups:
        try:
            group_records = workers.run_worker("benchmarks.step", group, group["setting"]["onednn"], args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            # One failed or slow setting must not cost the measurements of the others.
            failures += 1
            print(f"FAILED {group['setting']}: {str(error)[-1500:]}", file=sys.stderr, flush=True)
            continue
        for record in group_records:
            records.append(record)
            print(_format_row(record), flush=True)
            if args.output:
                with open(args.output, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record) + "\n")
    for line in _ratio_lines(records):
        print(line)
    if failures:
        print(f"{failures} of {len(groups)} settings failed; see FAILED lines above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
