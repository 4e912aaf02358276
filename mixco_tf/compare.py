"""Trains several methods and backbones on equal terms and tabulates mean ± std over seeds.

    python -m mixco_tf.compare --output_dir=runs/compare --set=epochs=15
    python -m mixco_tf.compare --output_dir=runs/sweep --methods=moco,mixco \\
        --width_multipliers=0.0625,0.125,0.25 --set=epochs=15

Every run is one `mixco_tf.experiment.run_experiment` in `OUTPUT_DIR/<method>-<backbone>-
w<width>-seed<seed>`. Runs of the same seed share the weight initialisation seed, the
data order and the augmented views, because the data pipeline is seeded with the run
seed alone. All runs share one budget (epochs, batch size, optimizer schedule) and are
evaluated with the same linear, 5-shot and kNN protocols on the exported backbone.

A run that already finished is read from its results.json, so a rerun, or a sweep that
contains runs of an earlier table, trains only what is missing. The command writes
`OUTPUT_DIR/comparison.json`, `OUTPUT_DIR/comparison.md` and, with more than one width
or backbone and matplotlib installed (`pip install mixco-tf[plots]`),
`OUTPUT_DIR/capacity.png`: MixCo's gain over its base method against model size.

Settings shared by all runs come from the built-in defaults, `--config` and `--set`.
Some keys have method defaults (`mixco_tf.config.METHOD_DEFAULTS`): SimCLR's
temperatures and the base methods' mix_weight of 0. Each method uses its own default
unless `--config` or `--set` gives the key, and then that value applies to every method.
"""

import json
import logging
import math
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from mixco_tf import config as config_lib

logger = logging.getLogger(__name__)

METRICS = ("linear_top1", "linear_5shot_top1", "knn_top1")
RANDOM_INIT = "random init"


def define_flags():
    """Defines this command's flags when it runs, because `config` is also a flag of mixco_tf.train."""
    flags.DEFINE_list("methods", list(config_lib.METHODS), f"Methods to train, from {list(config_lib.METHODS)}.")
    flags.DEFINE_list("backbones", None, "Backbones to train (default: the config's backbone).")
    flags.DEFINE_list(
        "width_multipliers", None, "Width multipliers to train, e.g. 0.0625,0.125,0.25 (default: the config's)."
    )
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each method trains once per seed.")
    flags.DEFINE_string("config", None, "YAML file of config keys shared by every run.")
    flags.DEFINE_multi_string(
        "set", [], "KEY=VALUE config override shared by every run, e.g. --set=epochs=15; repeatable."
    )
    flags.DEFINE_string("output_dir", None, "Folder of the run directories and the comparison files (required).")
    flags.DEFINE_list("metrics", list(METRICS), f"Evaluation keys to tabulate, from {list(METRICS)}.")


# ---------------------------------------------------------------------- run plan


def run_name(method, backbone, width_multiplier, seed):
    """Returns the run directory name, e.g. `mixco-resnet18-w0.125-seed0`."""
    return f"{method}-{backbone}-w{width_multiplier:g}-seed{seed}"


def plan_runs(base_values, methods, backbones, width_multipliers, seeds, output_dir):
    """Builds and validates the config of every run before any training starts.

    Args:
        base_values: config keys shared by every run (YAML values and overrides).
        methods, backbones: names; None for backbones keeps the base config's.
        width_multipliers: floats; None keeps the base config's.
        seeds: integers.
        output_dir: parent folder of the run directories.

    Returns:
        A list of validated `Config`s, ordered by backbone, width, seed, then method, so
        that an interrupted comparison has complete method sets for the first seeds.

    Raises:
        ValueError: naming the run and the invalid value.
    """
    shared = config_lib.from_dict(base_values, source="the shared settings")
    backbones = backbones or [shared.backbone]
    width_multipliers = width_multipliers or [shared.width_multiplier]
    for name, values in (("methods", methods), ("backbones", backbones), ("seeds", seeds)):
        if not values:
            raise ValueError(f"--{name} is empty; give at least one value.")
    for method in methods:
        if method not in config_lib.METHODS:
            raise ValueError(f"Invalid method {method!r} in --methods: expected values from {list(config_lib.METHODS)}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods={methods} lists a method twice; list each once.")

    configs = []
    for backbone in backbones:
        for width in width_multipliers:
            for seed in seeds:
                for method in methods:
                    name = run_name(method, backbone, width, seed)
                    values = {
                        **base_values,
                        "method": method,
                        "backbone": backbone,
                        "width_multiplier": width,
                        "seed": seed,
                        "model_dir": os.path.join(output_dir, name),
                    }
                    try:
                        configs.append(config_lib.from_dict(values, source=name).validate())
                    except ValueError as error:
                        raise ValueError(f"Run {name}: {error}") from error
    return configs


def parse_overrides(pairs):
    """Parses `KEY=VALUE` strings into a dict with YAML-typed values (`15` -> 15, `true` -> True)."""
    import yaml

    values = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"Invalid --set={pair!r}: expected KEY=VALUE, e.g. --set=epochs=15.")
        values[key.strip()] = yaml.safe_load(text)
    return values


# ---------------------------------------------------------------------- summaries


def summarize(records, metrics=METRICS):
    """Aggregates run results into mean ± std per model and MixCo's gain over each base.

    Args:
        records: dicts with `method`, `backbone`, `width_multiplier`, `seed`,
            `evaluation` and `random_init_evaluation` (metric -> accuracy in [0, 1]).
        metrics: evaluation keys to aggregate.

    Returns:
        `{"rows": [...], "gains": [...]}`. A row has `method` (or "random init"),
        `backbone`, `width_multiplier`, `num_seeds` and per metric `{"mean", "std",
        "values"}`. A gain row has `method`, `base`, `backbone`, `width_multiplier`,
        `num_seeds` and per metric the mean and std of the per-seed differences
        `method - base`, paired by seed. The std is the sample standard deviation
        (ddof = 1), 0 for one seed.
    """
    groups = {}
    for record in records:
        model = (record["backbone"], record["width_multiplier"])
        groups.setdefault((*model, record["method"]), {})[record["seed"]] = record["evaluation"]
        if record.get("random_init_evaluation"):
            groups.setdefault((*model, RANDOM_INIT), {})[record["seed"]] = record["random_init_evaluation"]

    rows = []
    for (backbone, width, method), by_seed in sorted(groups.items(), key=lambda item: _row_order(item[0])):
        row = {"method": method, "backbone": backbone, "width_multiplier": width, "num_seeds": len(by_seed)}
        for metric in metrics:
            values = [by_seed[seed][metric] for seed in sorted(by_seed)]
            row[metric] = {"mean": _mean(values), "std": _std(values), "values": values}
        rows.append(row)

    gains = []
    for (backbone, width, method), by_seed in sorted(groups.items(), key=lambda item: _row_order(item[0])):
        base = config_lib.BASE_METHODS.get(method)
        base_by_seed = groups.get((backbone, width, base))
        if base_by_seed is None:
            continue
        seeds = sorted(set(by_seed) & set(base_by_seed))
        gain = {"method": method, "base": base, "backbone": backbone, "width_multiplier": width, "num_seeds": len(seeds)}
        for metric in metrics:
            differences = [by_seed[seed][metric] - base_by_seed[seed][metric] for seed in seeds]
            gain[metric] = {"mean": _mean(differences), "std": _std(differences), "values": differences}
        gains.append(gain)
    return {"rows": rows, "gains": gains}


def format_markdown(summary, metrics=METRICS):
    """Formats a `summarize` result as two Markdown tables, accuracies in percent."""
    header = ["method", "backbone", "width", "seeds", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in summary["rows"]:
        cells = [row["method"], row["backbone"], f"{row['width_multiplier']:g}", str(row["num_seeds"])]
        cells += [_format_percent(row[metric]) for metric in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["gains"]:
        header = ["MixCo variant − base (points)", "backbone", "width", "seeds", *metrics]
        lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for gain in summary["gains"]:
            cells = [f"{gain['method']} − {gain['base']}", gain["backbone"], f"{gain['width_multiplier']:g}", str(gain["num_seeds"])]
            cells += [_format_percent(gain[metric], signed=True) for metric in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_capacity(summary, path, metrics=METRICS):
    """Writes MixCo's gain over its base against the width multiplier as a PNG.

    One panel per metric, one line per (MixCo variant, backbone), error bars of one
    standard deviation of the per-seed gains.

    Returns:
        `path`, or None when matplotlib is not installed (a warning is logged).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        logger.warning("matplotlib is not installed, so %s is not written; pip install mixco-tf[plots].", path)
        return None

    figure, axes = pyplot.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    series = {}
    for gain in summary["gains"]:
        series.setdefault((gain["method"], gain["base"], gain["backbone"]), []).append(gain)
    for axis, metric in zip(axes[0], metrics):
        for (method, base, backbone), gains in sorted(series.items()):
            gains = sorted(gains, key=lambda gain: gain["width_multiplier"])
            widths = [gain["width_multiplier"] for gain in gains]
            means = [100 * gain[metric]["mean"] for gain in gains]
            stds = [100 * gain[metric]["std"] for gain in gains]
            axis.errorbar(widths, means, yerr=stds, marker="o", capsize=3, label=f"{method} − {base} ({backbone})")
        axis.axhline(0.0, color="gray", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("width multiplier")
        axis.set_ylabel("gain (points)")
        axis.set_title(metric)
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def _row_order(key):
    backbone, width, method = key
    order = list(config_lib.METHODS) + [RANDOM_INIT]
    return (backbone, width, order.index(method) if method in order else len(order), method)


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def _std(values):
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def _format_percent(stats, signed=False):
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} ± {100 * stats['std']:.1f}"


# ---------------------------------------------------------------------- the command


def run_comparison(configs, output_dir, metrics=METRICS):
    """Trains (or reads) every run, then writes comparison.json, comparison.md and the plot.

    Returns:
        The dict written to comparison.json: the runs, their summary and the wall time.
    """
    from mixco_tf import experiment  # TensorFlow loads only after the plan is valid.
    import keras

    started = time.time()
    records = []
    baselines = set()
    for index, config in enumerate(configs, start=1):
        logger.info("Run %d of %d: %s", index, len(configs), config.model_dir)
        run_started = time.time()
        keras.backend.clear_session()
        # Runs of one seed and architecture share the random-init backbone, so only the
        # first of them evaluates it.
        architecture = (config.backbone, config.stem, config.width_multiplier, config.image_size, config.seed)
        results = experiment.run_experiment(
            config, evaluate=True, evaluate_random_init=architecture not in baselines
        )
        baselines.add(architecture)
        records.append(
            {
                "method": config.method,
                "backbone": config.backbone,
                "width_multiplier": config.width_multiplier,
                "seed": config.seed,
                "model_dir": config.model_dir,
                "pretrain_seconds": results.get("pretrain_seconds"),
                "total_seconds": results.get("total_seconds"),
                "seconds_in_this_command": round(time.time() - run_started, 1),
                "evaluation": results["evaluation"],
                "random_init_evaluation": results.get("random_init_evaluation"),
            }
        )

    summary = summarize(records, metrics)
    comparison = {
        "runs": records,
        "summary": summary,
        "wall_seconds": round(time.time() - started, 1),
        "command": " ".join(sys.argv),
    }
    with open(os.path.join(output_dir, "comparison.json"), "w", encoding="utf-8") as stream:
        json.dump(comparison, stream, indent=2)
    table = format_markdown(summary, metrics)
    with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as stream:
        stream.write(table)
    sizes = {(config.backbone, config.width_multiplier) for config in configs}
    if len(sizes) > 1 and summary["gains"]:
        plot_capacity(summary, os.path.join(output_dir, "capacity.png"), metrics)
    print(table, end="")
    return comparison


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}. Pass options as flags: --key=value.")
    FLAGS = flags.FLAGS
    if not FLAGS.output_dir:
        absl_logging.error("--output_dir is required: the folder of the run directories and the comparison files.")
        return 2
    try:
        unknown = sorted(set(FLAGS.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"Invalid --metrics {unknown}: expected values from {list(METRICS)}.")
        base_values = config_lib.load_yaml(FLAGS.config) if FLAGS.config else {}
        base_values.update(parse_overrides(FLAGS.set))
        widths = [_parse_number(text, float, "width_multipliers") for text in FLAGS.width_multipliers or []]
        seeds = [_parse_number(text, int, "seeds") for text in FLAGS.seeds]
        configs = plan_runs(base_values, FLAGS.methods, FLAGS.backbones, widths or None, seeds, FLAGS.output_dir)
    except ValueError as error:
        absl_logging.error("%s", error)
        return 2
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    absl_logging.info("Comparing %d runs in %s.", len(configs), FLAGS.output_dir)

    from mixco_tf import checkpointing

    try:
        comparison = run_comparison(configs, FLAGS.output_dir, tuple(FLAGS.metrics))
    except (config_lib.ConfigError, checkpointing.CheckpointError, checkpointing.NonFiniteLossError) as error:
        absl_logging.error("%s", error)
        return 2 if not isinstance(error, checkpointing.NonFiniteLossError) else 3
    except checkpointing.TrainingInterrupted as error:
        absl_logging.warning("%s Rerun the same command to continue; finished runs are reused.", error)
        return 128 + error.signal_number
    absl_logging.info("Comparison finished in %.1f s; wrote %s.", comparison["wall_seconds"], FLAGS.output_dir)
    return 0


def _parse_number(text, kind, flag):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"Invalid --{flag} value {text!r}: expected a {kind.__name__}.") from None


def run():
    """Console-script entry point of `mixco-compare`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
