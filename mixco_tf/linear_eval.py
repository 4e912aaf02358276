"""Evaluates a pretrained backbone on a labelled data set: linear probes, k-NN and tuning.

    python -m mixco_tf.linear_eval --saved_model=runs/r1/export/backbone/1 --dataset=digits
    python -m mixco_tf.linear_eval --model_dir=runs/r1 --protocol=cached,paper,knn --output=eval.json
    python -m mixco_tf.linear_eval --saved_model=DIR --protocol=cached --tune --output=tuned.json

The backbone comes from an exported SavedModel (`--saved_model`, loaded with
`keras.layers.TFSMLayer`) or from a training run directory (`--model_dir`, rebuilt
from its config and last checkpoint). `--dataset` may differ from the data set the
backbone was pretrained on (transfer evaluation). Images are resized to the backbone's
training size and normalized with its training mean and std either way.

Protocols (`--protocol`, comma-separated):

- `cached` (alias `linear`): frozen features of every image are computed once, without
  augmentation, and a linear classifier is trained on them (`evaluation.linear_probe`).
  Writes `linear_top1` and `linear_top5`.
- `paper`: the MixCo authors' protocol (`mixco_tf.paper_linear`): SGD at learning rate
  3.0 for 100 epochs on random-resized-crop and flip views through the frozen backbone.
  Writes `paper_top1` and `paper_top5`.
- `knn`: weighted k-NN on L2-normalized features, k=200 and temperature 0.1 by default.
  Writes `knn_top1`.
- `5shot`: the cached probe on 5 labels per class, mean over 5 draws. Writes
  `linear_5shot_top1`.

`--tune` first searches the cached probe's learning rate and weight decay with
keras-tuner on a held-out part of the training split (`mixco_tf.tuning`), then trains
on the whole training split with the chosen values. The test split is used only for
the final numbers. The results are logged, printed to stdout as one JSON line and
written to `--output`.
"""

import json
import os

from absl import app, flags, logging

from mixco_tf import data, evaluation

FLAGS = flags.FLAGS

PROTOCOLS = ("cached", "paper", "knn", "5shot")
# Older command lines name the cached protocol `linear`.
PROTOCOL_ALIASES = {"linear": "cached"}


def define_flags():
    """Defines the flags of this command; called by `run()`.

    The flags are not defined at import time because `dataset`, `batch_size`, `seed`,
    `epochs`, `model_dir` and `data_dir` are also flags of `mixco_tf.train`, and absl
    rejects a flag name defined twice in one process.
    """
    flags.DEFINE_string(
        "saved_model", None, "Version folder of an exported backbone, the folder that contains saved_model.pb."
    )
    flags.DEFINE_string(
        "model_dir", None, "Run directory of `python -m mixco_tf.train` to evaluate instead of --saved_model."
    )
    flags.DEFINE_string("dataset", "digits", "Registered dataset whose train split trains the probe and test split scores it.")
    flags.DEFINE_string("data_dir", None, "Folder where the dataset loader finds or downloads its files.")
    flags.DEFINE_string(
        "output",
        None,
        "JSON file for the results. Default: linear_eval_<dataset>_v<version>.json in the folder "
        "above --saved_model, or linear_eval_<dataset>.json in --model_dir.",
    )
    flags.DEFINE_integer("batch_size", 256, "Images per batch of feature extraction.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of the probes, the few-shot draws and the tuner.")
    flags.DEFINE_list(
        "protocol",
        ["cached"],
        "Comma-separated protocols: cached (linear probe on frozen features computed once), "
        "paper (the authors' protocol with augmentation, 100 epochs), knn (weighted k-NN), "
        "5shot (5 labels per class, mean top-1 over 5 draws).",
    )
    flags.DEFINE_alias("protocols", "protocol")
    flags.DEFINE_integer("paper_epochs", 100, "Epochs of the paper protocol.", lower_bound=1)
    flags.DEFINE_integer("knn_k", evaluation.KNN_K, "Neighbours of the knn protocol.", lower_bound=1)
    flags.DEFINE_float("knn_temperature", evaluation.KNN_TEMPERATURE, "Temperature of the knn vote weights.")
    flags.DEFINE_boolean(
        "tune", False, "Search the cached probe's learning rate and weight decay on held-out training data first."
    )
    flags.DEFINE_integer("tune_trials", 10, "Trials of --tune.", lower_bound=1)
    flags.DEFINE_integer("tune_epochs", 100, "Probe epochs per trial of --tune.", lower_bound=1)
    flags.DEFINE_float("validation_fraction", 0.2, "Share of the training split that --tune holds out for scoring.")
    flags.DEFINE_string("tune_dir", None, "keras-tuner folder of --tune; a rerun resumes it. Default: a temporary folder.")


def default_output_path(saved_model_dir, dataset):
    """Returns the default `--output`: a file beside the version folder of the export."""
    saved_model_dir = os.path.abspath(saved_model_dir)
    version = os.path.basename(saved_model_dir)
    return os.path.join(os.path.dirname(saved_model_dir), f"linear_eval_{dataset}_v{version}.json")


def check_saved_model_dir(path):
    """Returns an error message when `path` is not a SavedModel folder, else None."""
    if not path:
        return "Missing --saved_model. Pass the version folder of an export, e.g. --saved_model=EXPORT_BASE/1."
    if os.path.isfile(path):
        return f"{path} is a file, not a SavedModel folder. Pass the version folder written by the export, e.g. EXPORT_BASE/1."
    if not os.path.isdir(path):
        return f"SavedModel folder {path} not found. Pass the version folder written by the export, e.g. EXPORT_BASE/1."
    run_export = os.path.join(path, "export", "backbone", "1")
    if os.path.isfile(os.path.join(run_export, "saved_model.pb")):
        return (
            f"{path} is a training run directory. Pass --model_dir={path}, or its exported backbone: "
            f"--saved_model={run_export}."
        )
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        return (
            f"{path} contains no saved_model.pb, so it is not a SavedModel. If it is the export base "
            "folder, pass one of its version folders, e.g. " + os.path.join(path, "1") + "."
        )
    return None


def normalize_protocols(protocols):
    """Maps aliases to protocol names; returns (names, error message or None)."""
    names = [PROTOCOL_ALIASES.get(name, name) for name in protocols]
    unknown = [name for name in names if name not in PROTOCOLS]
    if not names or unknown:
        return names, f"Invalid --protocol={','.join(protocols)}. Pass one or more of {','.join(PROTOCOLS)}."
    return list(dict.fromkeys(names)), None


def evaluate(
    splits,
    *,
    saved_model=None,
    model_dir=None,
    protocols=("cached",),
    batch_size=256,
    seed=0,
    paper_epochs=100,
    knn_k=evaluation.KNN_K,
    knn_temperature=evaluation.KNN_TEMPERATURE,
    tune=False,
    tune_trials=10,
    tune_epochs=100,
    validation_fraction=0.2,
    tune_dir=None,
):
    """Runs the protocols on a backbone from a SavedModel or a run directory.

    Args:
        splits: the `mixco_tf.data.DatasetSplits` to evaluate on; it may differ from the
            backbone's pretraining data set.
        saved_model: a version folder of `mixco_tf.export.export_backbone`.
        model_dir: a run directory of `mixco_tf.train`; exactly one of the two is given.
        protocols: names from `PROTOCOLS`.
        batch_size: images per feature-extraction batch.
        seed: seed of the probes, draws and tuner.
        paper_epochs: epochs of the paper protocol.
        knn_k: neighbours of the knn protocol, at most the training split's size.
        knn_temperature: temperature of the knn vote weights.
        tune: search the cached probe's learning rate and weight decay first.
        tune_trials, tune_epochs, validation_fraction, tune_dir: settings of the search,
            see `mixco_tf.tuning.tune_linear_probe`.

    Returns:
        Dict of the metrics of each protocol (see the module docstring) plus the
        backbone's `image_size`, `feature_dim` and, with `tune`, the `tuning` record.

    Raises:
        ValueError: on an invalid source or protocol.
    """
    from mixco_tf import paper_linear, tuning

    if (saved_model is None) == (model_dir is None):
        raise ValueError("Pass exactly one of saved_model (an export's version folder) and model_dir (a run directory).")
    source = _load_source(saved_model, model_dir)
    results = {"image_size": source["image_size"]}

    if {"cached", "knn", "5shot"} & set(protocols):
        train_features, train_labels, test_features, test_labels = _cached_features(source, splits, batch_size)
        results["feature_dim"] = int(train_features.shape[1])
        test = (test_features, test_labels)
        if "cached" in protocols:
            probe_settings = {}
            if tune:
                choice = tuning.tune_linear_probe(
                    train_features, train_labels, splits.num_classes, max_trials=tune_trials, epochs=tune_epochs,
                    validation_fraction=validation_fraction, seed=seed, directory=tune_dir,
                )
                results["tuning"] = choice
                probe_settings = {"learning_rate": choice["learning_rate"], "weight_decay": choice["weight_decay"]}
            linear = evaluation.linear_probe(
                train_features, train_labels, *test, splits.num_classes, seed=seed, **probe_settings
            )
            results["linear_top1"], results["linear_top5"] = linear["top1"], linear["top5"]
        if "knn" in protocols:
            if knn_k > len(train_features):
                logging.warning("knn_k=%d exceeds the %d training images; using k=%d.", knn_k, len(train_features), len(train_features))
                knn_k = len(train_features)
            results["knn_top1"] = evaluation.knn_top1(
                train_features, train_labels, *test, splits.num_classes, k=knn_k, temperature=knn_temperature
            )
            results["knn_k"], results["knn_temperature"] = knn_k, knn_temperature
        if "5shot" in protocols:
            results["linear_5shot_top1"] = evaluation.few_shot_linear(
                train_features, train_labels, *test, splits.num_classes, shots=5, draws=5, seed=seed
            )

    if "paper" in protocols:
        paper = paper_linear.paper_linear_eval(
            source["normalized_layer"](), splits, image_size=source["image_size"], mean=source["mean"],
            std=source["std"], epochs=paper_epochs, seed=seed,
        )
        results["paper_top1"], results["paper_top5"] = paper["top1"], paper["top5"]
        results["paper"] = {key: paper[key] for key in ("epochs", "seconds", "trainable_weights", "backbone_unchanged")}
    return results


def _load_source(saved_model, model_dir):
    """Returns the backbone's preprocessing and functions that build its feature layers."""
    from mixco_tf import export

    if model_dir is not None:
        run = export.load_run_backbone(model_dir)
        return {
            "image_size": run.image_size,
            "mean": run.mean,
            "std": run.std,
            "keras_backbone": run.backbone,
            "normalized_layer": lambda: run.backbone,
        }

    import keras

    metadata_path = os.path.join(saved_model, "assets.extra", export.METADATA_FILENAME)
    if not os.path.isfile(metadata_path):
        raise ValueError(
            f"{metadata_path} not found, so the image size, mean and std of the export are unknown. "
            "Pass a version folder written by mixco_tf.export."
        )
    with open(metadata_path, encoding="utf-8") as stream:
        metadata = json.load(stream)
    serving_layer = evaluation.load_serving_layer(saved_model)
    return {
        "image_size": int(metadata["image_size"]),
        "mean": tuple(metadata["mean"]),
        "std": tuple(metadata["std"]),
        "serving_layer": serving_layer,
        "normalized_layer": lambda: keras.layers.TFSMLayer(
            saved_model, call_endpoint="serving_normalized", trainable=False
        ),
    }


def _cached_features(source, splits, batch_size):
    """Returns `(train_features, train_labels, test_features, test_labels)` of the frozen backbone."""
    from mixco_tf import augment

    features = []
    for dataset in (splits.train, splits.test):
        if "serving_layer" in source:
            # serving_default resizes and normalizes uint8 images inside the graph, so
            # this measures exactly what a server would return.
            batches = evaluation._batch_uint8_images(dataset, batch_size)
            features.extend(evaluation.extract_features(source["serving_layer"], batches))
        else:
            batches = augment.eval_dataset(
                dataset, image_size=source["image_size"], mean=source["mean"], std=source["std"], batch_size=batch_size
            )
            features.extend(evaluation.extract_features(source["keras_backbone"], batches))
    return tuple(features)


def main(argv):
    """Loads the backbone and the data set, runs the protocols and writes the results."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}. Pass options as flags: --key=value.")
    protocols, error = normalize_protocols(FLAGS.protocol)
    if FLAGS.saved_model and FLAGS.model_dir:
        error = error or "Pass either --saved_model or --model_dir, not both."
    elif FLAGS.model_dir:
        if not os.path.isdir(FLAGS.model_dir):
            error = error or f"Run directory {FLAGS.model_dir} not found. Pass --model_dir=a run directory of mixco_tf.train."
    else:
        error = error or check_saved_model_dir(FLAGS.saved_model)
    if FLAGS.tune and "cached" not in protocols:
        error = error or "--tune tunes the cached protocol; add cached to --protocol."
    if error:
        logging.error("%s", error)
        return 2

    source = {"saved_model": os.path.abspath(FLAGS.saved_model)} if FLAGS.saved_model else {
        "model_dir": os.path.abspath(FLAGS.model_dir)
    }
    try:
        splits = data.load_dataset(FLAGS.dataset, FLAGS.data_dir)
        logging.info("Evaluating %s on %s with protocols %s", source, FLAGS.dataset, protocols)
        metrics = evaluate(
            splits,
            **source,
            protocols=protocols,
            batch_size=FLAGS.batch_size,
            seed=FLAGS.seed,
            paper_epochs=FLAGS.paper_epochs,
            knn_k=FLAGS.knn_k,
            knn_temperature=FLAGS.knn_temperature,
            tune=FLAGS.tune,
            tune_trials=FLAGS.tune_trials,
            tune_epochs=FLAGS.tune_epochs,
            validation_fraction=FLAGS.validation_fraction,
            tune_dir=FLAGS.tune_dir,
        )
    except (ValueError, ImportError) as error:
        logging.error("%s", error)
        return 2
    for key, value in metrics.items():
        if isinstance(value, float):
            logging.info("%s: %.4f", key, value)
    results = {
        **source,
        "dataset": FLAGS.dataset,
        "protocols": protocols,
        **metrics,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
        "num_classes": splits.num_classes,
        "seed": FLAGS.seed,
    }

    if FLAGS.output:
        output = FLAGS.output
    elif FLAGS.saved_model:
        output = default_output_path(FLAGS.saved_model, FLAGS.dataset)
    else:
        output = os.path.join(FLAGS.model_dir, f"linear_eval_{FLAGS.dataset}.json")
    _write_json_atomically(output, results)
    logging.info("Wrote %s", output)
    print(json.dumps(results))
    return 0


def _write_json_atomically(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2)
    os.replace(temporary, path)


def run():
    """Console-script entry point of `mixco-linear-eval`."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
