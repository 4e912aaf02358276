"""Hyperparameter search helpers built on keras-tuner.

- `split_train_validation`: a stratified held-out part of the training split. Every
  search here scores trials on it, never on the test split.
- `tune_linear_probe`: searches the learning rate and weight decay of
  `mixco_tf.evaluation.linear_probe` on cached features.
- `check_search_space`: records a search's space in its directory and rejects a rerun
  whose space differs, because keras-tuner would silently mix the two searches.
"""

import json
import logging
import os
import tempfile

import numpy as np
from sklearn.model_selection import train_test_split

from mixco_tf import checkpointing, evaluation

logger = logging.getLogger(__name__)

SEARCH_SPACE_FILE = "search_space.json"

# Search space of the linear probe: AdamW learning rate (log-uniform) and decoupled
# weight decay, around linear_probe's defaults of 0.01 and 0.
PROBE_LEARNING_RATE_RANGE = (1e-3, 1.0)
PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


class SearchSpaceMismatch(ValueError):
    """A tuning directory contains a search made with another space."""


def split_train_validation(labels, validation_fraction=0.2, seed=0):
    """Splits training indices into a fitting part and a stratified validation part.

    Args:
        labels: integers `[num_train]`, the labels of the training split.
        validation_fraction: share of the training split held out, in (0, 1).
        seed: seed of the split.

    Returns:
        `(fit_indices, validation_indices)`: sorted int64 arrays that partition
        `range(num_train)`.

    Raises:
        ValueError: if `validation_fraction` is outside (0, 1) or a class is too small
            to appear in both parts.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    indices = np.arange(len(labels))
    fit_indices, validation_indices = train_test_split(
        indices, test_size=validation_fraction, stratify=labels, random_state=seed
    )
    return np.sort(fit_indices).astype(np.int64), np.sort(validation_indices).astype(np.int64)


def check_search_space(directory, space):
    """Stores `space` in `directory/search_space.json`, or checks it against the stored one.

    Args:
        directory: the tuning directory; created when missing.
        space: JSON-serializable description of everything that defines the search.

    Raises:
        SearchSpaceMismatch: if the directory already contains a different space; the
            message lists the differing keys and explains how to start a new search.
    """
    path = os.path.join(directory, SEARCH_SPACE_FILE)
    space = json.loads(json.dumps(space))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as stream:
            stored = json.load(stream)
        if stored != space:
            keys = sorted(set(stored) | set(space))
            changes = "; ".join(
                f"{key}: {stored.get(key)!r} -> {space.get(key)!r}" for key in keys if stored.get(key) != space.get(key)
            )
            raise SearchSpaceMismatch(
                f"The tuning directory {directory} contains a search with another search space ({changes}). "
                "Its finished trials do not fit the new space. Pass a new --tune_dir for the new space, "
                "or rerun with the old values to resume that search."
            )
        return
    os.makedirs(directory, exist_ok=True)
    checkpointing.write_text_atomically(path, json.dumps(space, indent=2, sort_keys=True))


def tune_linear_probe(
    train_features,
    train_labels,
    num_classes,
    *,
    max_trials=10,
    epochs=100,
    validation_fraction=0.2,
    seed=0,
    directory=None,
):
    """Searches the linear probe's learning rate and weight decay on held-out training data.

    The function receives only the training split. It holds out a stratified
    `validation_fraction` of it, trains `linear_probe` on the rest with each trial's
    values and scores top-1 on the held-out part. keras-tuner's `RandomSearch` draws the
    learning rate log-uniformly from `PROBE_LEARNING_RATE_RANGE` and the weight decay
    from `PROBE_WEIGHT_DECAYS`.

    Args:
        train_features: float `[num_train, dim]`.
        train_labels: integers `[num_train]`.
        num_classes: number of classes.
        max_trials: hyperparameter combinations to try.
        epochs: epochs of each trial's probe.
        validation_fraction: share of the training split held out for scoring.
        seed: seed of the split, the search and the probes.
        directory: keras-tuner directory. A rerun with the same directory resumes and
            skips finished trials. None searches in a temporary folder.

    Returns:
        Dict with the chosen `learning_rate` and `weight_decay`, its
        `validation_top1`, `num_fit` and `num_validation` examples and `trials`, a
        list of `{"learning_rate", "weight_decay", "validation_top1"}`.

    Raises:
        ImportError: if keras-tuner is not installed.
        SearchSpaceMismatch: if `directory` contains a search with another space.
    """
    import keras_tuner

    fit_indices, validation_indices = split_train_validation(train_labels, validation_fraction, seed)
    fit = (train_features[fit_indices], train_labels[fit_indices])
    validation = (train_features[validation_indices], train_labels[validation_indices])

    hyperparameters = keras_tuner.HyperParameters()
    hyperparameters.Float("learning_rate", *PROBE_LEARNING_RATE_RANGE, sampling="log")
    hyperparameters.Choice("weight_decay", list(PROBE_WEIGHT_DECAYS))

    class ProbeTuner(keras_tuner.RandomSearch):
        def run_trial(self, trial, *args, **kwargs):
            values = trial.hyperparameters
            result = evaluation.linear_probe(
                *fit,
                *validation,
                num_classes,
                epochs=epochs,
                learning_rate=values.get("learning_rate"),
                weight_decay=values.get("weight_decay"),
                seed=seed,
            )
            logger.info(
                "Probe trial %s: learning_rate=%.4g, weight_decay=%g, validation top-1 %.4f",
                trial.trial_id, values.get("learning_rate"), values.get("weight_decay"), result["top1"],
            )
            return {"validation_top1": result["top1"]}

    with tempfile.TemporaryDirectory(prefix="mixco-probe-tuner-") as temporary:
        directory = directory or temporary
        check_search_space(
            directory,
            {
                "learning_rate": list(PROBE_LEARNING_RATE_RANGE),
                "weight_decay": list(PROBE_WEIGHT_DECAYS),
                "epochs": epochs,
                "validation_fraction": validation_fraction,
                "seed": seed,
                "num_train": len(train_labels),
                "feature_dim": int(train_features.shape[1]),
            },
        )
        tuner = ProbeTuner(
            hyperparameters=hyperparameters,
            objective=keras_tuner.Objective("validation_top1", direction="max"),
            max_trials=max_trials,
            seed=seed,
            directory=directory,
            project_name="linear_probe",
            overwrite=False,
        )
        tuner.search(verbose=0)
        trials = [
            {
                "learning_rate": trial.hyperparameters.get("learning_rate"),
                "weight_decay": trial.hyperparameters.get("weight_decay"),
                "validation_top1": float(trial.score),
            }
            # Sorted by id, because a reloaded oracle lists trials in file-system order.
            for _, trial in sorted(tuner.oracle.trials.items())
            if trial.score is not None
        ]
        best = tuner.get_best_hyperparameters(1)[0]
    best_score = max(trial["validation_top1"] for trial in trials)
    choice = {
        "learning_rate": float(best.get("learning_rate")),
        "weight_decay": float(best.get("weight_decay")),
        "validation_top1": best_score,
        "num_fit": len(fit_indices),
        "num_validation": len(validation_indices),
        "trials": trials,
    }
    logger.info(
        "Linear probe tuning over %d trials chose learning_rate=%.4g, weight_decay=%g (validation top-1 %.4f)",
        len(trials), choice["learning_rate"], choice["weight_decay"], best_score,
    )
    return choice
