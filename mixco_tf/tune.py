"""Searches MixCo's pretraining hyperparameters with keras-tuner.

    python -m mixco_tf.tune --tune_dir=runs/tune --max_trials=8 --epochs=20
    python -m mixco_tf.tune --tune_dir=runs/tune --objective=linear --mix_weight_range=0.5,2

Each trial pretrains one run (`mixco_tf.experiment.run_experiment`) with its own values
of `mix_weight` (beta), `mix_temperature` (T_mix) and `learning_rate`, in its own run
directory `TUNE_DIR/mixco_pretraining/trial_ID/run`. Every other setting comes from the
built-in defaults, `--config` and the config-key flags of `mixco_tf.train`.

The objective is measured on a stratified held-out part of the training split
(`--validation_fraction`): the rest of the training split is the k-NN memory bank
(`--objective=knn`, k=200, temperature 0.1) or trains the cached linear probe
(`--objective=linear`). Pretraining itself reads all training images without labels,
and no search step reads the test split. After the search, the best trial's backbone is
evaluated once on the test split for the report.

Rerunning the command with the same `--tune_dir` skips finished trials and resumes an
interrupted one from its last completed epoch; a larger `--max_trials` adds trials. A
different search space, objective or base config in the same `--tune_dir` is an
error. The report goes to `TUNE_DIR/tuning_results.json` and to stdout as JSON.
"""

import dataclasses
import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging

from mixco_tf import config as config_lib
from mixco_tf import train  # noqa: F401  (defines --config and the config-key flags)

FLAGS = flags.FLAGS

OBJECTIVES = ("knn", "linear")
PROJECT_NAME = "mixco_pretraining"
RESULTS_FILE = "tuning_results.json"

flags.DEFINE_string("tune_dir", None, "Folder of the search: keras-tuner state, one run directory per trial, results.")
flags.DEFINE_enum("objective", "knn", list(OBJECTIVES), "Held-out accuracy to maximize: knn or linear (cached probe).")
flags.DEFINE_integer("max_trials", 8, "Total number of trials, finished ones included.", lower_bound=1)
flags.DEFINE_list("mix_weight_range", ["0.25", "2.0"], "min,max of beta (mix_weight), sampled uniformly.")
flags.DEFINE_list("mix_temperature_range", ["0.02", "0.2"], "min,max of T_mix, sampled log-uniformly.")
flags.DEFINE_list("learning_rate_range", ["0.03", "0.3"], "min,max of the peak learning rate, sampled log-uniformly.")
flags.DEFINE_float("validation_fraction", 0.2, "Share of the training split held out to score trials.")
flags.DEFINE_integer("tune_seed", 0, "Seed of the search and the held-out split.")


def parse_range(name, values, positive=True):
    """Parses a `min,max` flag into two floats; raises ValueError naming the flag."""
    try:
        low, high = (float(value) for value in values)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}={','.join(values)} must be two numbers min,max, e.g. --{name}=0.1,1.0.") from None
    if not low < high or (positive and low <= 0) or low < 0:
        raise ValueError(
            f"--{name}={low},{high} must satisfy {'0 < ' if positive else '0 <= '}min < max."
        )
    return low, high


def search_space_record(base_config, ranges, objective, validation_fraction, seed):
    """Describes everything that makes two searches comparable, for `check_search_space`."""
    fixed = {
        key: value
        for key, value in base_config.to_dict().items()
        if key not in ("model_dir", "mix_weight", "mix_temperature", "learning_rate")
        and key not in config_lib.RESUMABLE_KEYS
    }
    return {
        "ranges": {name: list(bounds) for name, bounds in ranges.items()},
        "objective": objective,
        "validation_fraction": validation_fraction,
        "seed": seed,
        "base_config": fixed,
    }


def held_out_accuracy(export_dir, splits, objective, validation_fraction, seed, batch_size):
    """Scores a trial's exported backbone on the held-out part of the training split.

    Returns:
        Top-1 in [0, 1] of the k-NN vote or the cached linear probe.
    """
    from mixco_tf import evaluation, tuning

    layer = evaluation.load_serving_layer(export_dir)
    features, labels = evaluation.extract_features(layer, evaluation._batch_uint8_images(splits.train, batch_size))
    fit, validation = tuning.split_train_validation(labels, validation_fraction, seed)
    arrays = (features[fit], labels[fit], features[validation], labels[validation], splits.num_classes)
    if objective == "knn":
        return evaluation.knn_top1(*arrays, k=min(evaluation.KNN_K, len(fit)), temperature=evaluation.KNN_TEMPERATURE)
    return evaluation.linear_probe(*arrays, seed=seed)["top1"]


def run_search(base_config, tune_dir, *, ranges, objective="knn", max_trials=8, validation_fraction=0.2, seed=0):
    """Runs or resumes the search and writes `TUNE_DIR/tuning_results.json`.

    Args:
        base_config: validated `Config` whose other keys every trial uses.
        tune_dir: folder of the search.
        ranges: `{"mix_weight": (min, max), "mix_temperature": (min, max),
            "learning_rate": (min, max)}`.
        objective: `"knn"` or `"linear"`.
        max_trials: total trials, finished ones included.
        validation_fraction: share of the training split held out for scoring.
        seed: seed of the search and the held-out split.

    Returns:
        The results dict: best values, best held-out score, every trial with its run
        directory, and the best trial's test-split evaluation.

    Raises:
        mixco_tf.tuning.SearchSpaceMismatch: if `tune_dir` contains another search.
        ValueError: on an invalid method or objective.
    """
    import keras_tuner

    from mixco_tf import evaluation, experiment, tuning
    from mixco_tf.data import load_dataset

    if base_config.method != "mixco":
        raise ValueError(f"method={base_config.method!r} has no mix loss to tune; use --method=mixco.")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r}. Valid objectives: {', '.join(OBJECTIVES)}.")
    tuning.check_search_space(
        tune_dir, search_space_record(base_config, ranges, objective, validation_fraction, seed)
    )
    splits = load_dataset(base_config.dataset, base_config.data_dir)

    hyperparameters = keras_tuner.HyperParameters()
    hyperparameters.Float("mix_weight", *ranges["mix_weight"])
    hyperparameters.Float("mix_temperature", *ranges["mix_temperature"], sampling="log")
    hyperparameters.Float("learning_rate", *ranges["learning_rate"], sampling="log")
    objective_name = f"validation_{objective}_top1"

    class PretrainingTuner(keras_tuner.RandomSearch):
        def trial_config(self, trial):
            # One run directory per trial id, so no two trials share a checkpoint.
            values = trial.hyperparameters
            return dataclasses.replace(
                base_config,
                mix_weight=values.get("mix_weight"),
                mix_temperature=values.get("mix_temperature"),
                learning_rate=values.get("learning_rate"),
                model_dir=os.path.join(self.get_trial_dir(trial.trial_id), "run"),
            ).validate()

        def run_trial(self, trial, *args, **kwargs):
            config = self.trial_config(trial)
            logging.info(
                "Trial %s: mix_weight=%.4g, mix_temperature=%.4g, learning_rate=%.4g in %s",
                trial.trial_id, config.mix_weight, config.mix_temperature, config.learning_rate, config.model_dir,
            )
            try:
                results = experiment.run_experiment(config, evaluate=False)
                score = held_out_accuracy(
                    results["export_dir"], splits, objective, validation_fraction, seed, config.eval_batch_size
                )
            except Exception as error:
                # keras-tuner records the trial as failed and continues with the next.
                logging.error("Trial %s failed: %s", trial.trial_id, error)
                raise
            logging.info("Trial %s: %s %.4f", trial.trial_id, objective_name, score)
            return {objective_name: score}

    tuner = PretrainingTuner(
        hyperparameters=hyperparameters,
        objective=keras_tuner.Objective(objective_name, direction="max"),
        max_trials=max_trials,
        seed=seed,
        directory=tune_dir,
        project_name=PROJECT_NAME,
        overwrite=False,
    )
    tuner.search(verbose=0)

    trials = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        trials.append(
            {
                "trial_id": trial_id,
                "status": str(trial.status),
                **{name: trial.hyperparameters.get(name) for name in ranges},
                objective_name: None if trial.score is None else float(trial.score),
                "model_dir": tuner.trial_config(trial).model_dir,
            }
        )
    scored = [trial for trial in trials if trial[objective_name] is not None]
    if not scored:
        raise RuntimeError(f"No trial in {tune_dir} finished; see the errors logged above.")
    best = max(scored, key=lambda trial: trial[objective_name])

    # Reported once, after the choice; the search never read these numbers.
    export_dir = os.path.join(best["model_dir"], experiment.EXPORT_NAME, str(experiment.EXPORT_VERSION))
    test_metrics = evaluation.evaluate_saved_model(
        export_dir, splits, batch_size=base_config.eval_batch_size, seed=seed, protocols=("linear", "knn")
    )
    results = {
        "objective": objective_name,
        "best": {name: best[name] for name in ranges},
        "best_trial": best["trial_id"],
        f"best_{objective_name}": best[objective_name],
        "best_test": test_metrics,
        "trials": trials,
        "ranges": {name: list(bounds) for name, bounds in ranges.items()},
        "dataset": base_config.dataset,
        "epochs": base_config.epochs,
    }
    path = os.path.join(tune_dir, RESULTS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as stream:
        json.dump(results, stream, indent=2)
    os.replace(path + ".tmp", path)
    logging.info("Best of %d trials: %s (%s %.4f). Wrote %s", len(scored), best["trial_id"], objective_name, best[objective_name], path)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}. Pass options as flags: --key=value.")
    if not FLAGS.tune_dir:
        logging.error("Missing --tune_dir. Pass a folder for the search, e.g. --tune_dir=runs/tune.")
        return 2
    from mixco_tf import tuning

    try:
        base_config = train.resolve_config()
        ranges = {
            "mix_weight": parse_range("mix_weight_range", FLAGS.mix_weight_range, positive=False),
            "mix_temperature": parse_range("mix_temperature_range", FLAGS.mix_temperature_range),
            "learning_rate": parse_range("learning_rate_range", FLAGS.learning_rate_range),
        }
        if not 0.0 < FLAGS.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction={FLAGS.validation_fraction} must be in (0, 1).")
        results = run_search(
            base_config,
            FLAGS.tune_dir,
            ranges=ranges,
            objective=FLAGS.objective,
            max_trials=FLAGS.max_trials,
            validation_fraction=FLAGS.validation_fraction,
            seed=FLAGS.tune_seed,
        )
    except (ValueError, ImportError, RuntimeError, tuning.SearchSpaceMismatch) as error:
        logging.error("%s", error)
        return 2
    print(json.dumps(results))
    return 0


def run():
    """Console-script entry point of `mixco-tune`."""
    std_logging.getLogger("mixco_tf").setLevel(std_logging.INFO)
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
