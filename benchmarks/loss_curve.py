"""Loss curves of one training run under several numerics settings, compared step by step.

    python -m benchmarks.loss_curve --steps=100 --precision=float32,mixed_bfloat16 --onednn=true,false

A speed-up is kept only if it trains the same model. Each combination of `--precision`
and `--onednn` trains the same config for `--steps` steps in its own process and records
the loss of every step. The default config is `configs/digits.yaml`: real digits images
through the real two-view pipeline, with the same seed, so the same batches, mixing
weights and key shuffles. The first combination is the reference. One more run of the reference
with `seed + 1` measures how far two float32 runs drift apart for reasons that do not
matter (other batches, weights and lam draws); a setting matches float32 when its
curve stays as close to the reference as that run does.

The curves are compared after a 10-step moving average, because single-step losses of
contrastive training move by several tenths from batch to batch.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import flags, workers

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
WINDOW = 10


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loss_curve", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml", help="YAML config to train")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--precision", type=flags.list_of(str), default=["float32", "mixed_bfloat16"])
    parser.add_argument(
        "--onednn",
        type=flags.list_of(flags.parse_switch),
        default=[None],
        help="TF_ENABLE_ONEDNN_OPTS of each run: true, false, or default (TensorFlow's choice)",
    )
    parser.add_argument("--output", default=None, help="JSON file with every curve and the comparison")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def run_worker(run):
    """Trains `run["steps"]` steps and returns the loss of each, in a fresh process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mixco_tf import augment, experiment, runtime
    from mixco_tf import config as config_lib

    import keras

    values = config_lib.load_yaml(run["config"])
    config = config_lib.from_dict({**values, "seed": run["seed"], "precision": run["precision"]}, source=run["config"])
    keras.mixed_precision.set_global_policy(config.precision)
    keras.utils.set_random_seed(config.seed)
    splits = experiment._load_data(config)  # pylint: disable=protected-access
    steps_per_epoch = splits.num_train // config.batch_size
    views = augment.two_view_dataset(
        splits.train, image_size=config.image_size, mean=splits.mean, std=splits.std,
        batch_size=config.batch_size, config=experiment.augment_config(config), seed=config.seed,
    ).repeat()
    model = experiment.build_model(config)
    model.compile(optimizer=experiment.build_optimizer(config, steps_per_epoch))

    # One `fit` step builds and compiles the train function; the rest call it directly,
    # resetting the metrics so each logged loss is that step's alone.
    losses = [float(model.fit(views, steps_per_epoch=1, epochs=1, verbose=0).history["loss"][0])]
    iterator = iter(views)
    next(iterator)  # the batch that `fit` trained on
    started = time.perf_counter()
    for _ in range(run["steps"] - 1):
        model.reset_metrics()
        losses.append(float(model.train_function(iterator)["loss"]))
    return {
        **run,
        "onednn_reported": runtime.onednn_enabled(),
        "losses": losses,
        "seconds_per_step": (time.perf_counter() - started) / max(1, run["steps"] - 1),
    }


def moving_average(values, window=WINDOW):
    """Returns the means of every `window` consecutive values `[len(values) - window + 1]`."""
    values = np.asarray(values, dtype=np.float64)
    return np.convolve(values, np.ones(window) / window, mode="valid")


def compare(reference, other):
    """Returns the largest and the mean absolute gap between two curves' moving averages."""
    gap = np.abs(moving_average(reference) - moving_average(other))
    return float(gap.max()), float(gap.mean())


def _label(run):
    onednn = {None: "default", True: "on", False: "off"}[run["onednn"]]
    return f"{run['precision']}, oneDNN {onednn}, seed {run['seed']}"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    for precision in args.precision:
        if precision not in PRECISIONS:
            parser.error(f"invalid precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if args.steps <= WINDOW:
        parser.error(f"invalid --steps={args.steps}: use more than {WINDOW} (the moving-average window)")
    if not os.path.isfile(args.config):
        parser.error(f"--config={args.config!r} is not a file: pass a YAML config such as configs/digits.yaml")
    from mixco_tf import config as config_lib

    seed = config_lib.from_dict(config_lib.load_yaml(args.config), source=args.config).seed
    runs = [
        {"config": args.config, "steps": args.steps, "precision": precision, "onednn": onednn, "seed": seed}
        for precision in args.precision
        for onednn in args.onednn
    ]
    runs.append({**runs[0], "seed": seed + 1})
    results = []
    for run in runs:
        result = workers.run_worker("benchmarks.loss_curve", run, run["onednn"], args.timeout)
        results.append(result)
        print(f"{_label(run):40} {result['seconds_per_step']:.3f} s/step, final loss {result['losses'][-1]:.4f}", flush=True)

    reference, other_seed = results[0], results[-1]
    noise_max, noise_mean = compare(reference["losses"], other_seed["losses"])
    print(f"\nagainst {_label(reference)}, {WINDOW}-step moving average of the loss:")
    print(f"{'run':40} {'max gap':>8} {'mean gap':>8}  matches")
    print(f"{_label(other_seed):40} {noise_max:8.4f} {noise_mean:8.4f}  (yardstick)")
    comparisons = []
    for result in results[1:-1]:
        gap_max, gap_mean = compare(reference["losses"], result["losses"])
        matches = gap_max <= noise_max
        comparisons.append({"run": _label(result), "max_gap": gap_max, "mean_gap": gap_mean, "matches": matches})
        print(f"{_label(result):40} {gap_max:8.4f} {gap_mean:8.4f}  {'yes' if matches else 'NO'}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as stream:
            json.dump({"runs": results, "yardstick": [noise_max, noise_mean], "comparisons": comparisons}, stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
