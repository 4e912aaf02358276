"""Evaluates an exported backbone SavedModel with a linear probe on frozen features.

    python -m mixco_tf.linear_eval --saved_model=runs/r1/export/backbone/1 --dataset=digits
    python -m mixco_tf.linear_eval --saved_model=DIR --protocols=linear,5shot,knn --output=eval.json

The SavedModel's `serving_default` signature receives the dataset's uint8 images and
resizes and normalizes them itself, so this evaluates exactly what a server would load.
Features of the train and test splits are computed once. The linear probe, the 5-shot
probe and the k-NN vote of `mixco_tf.evaluation` then run on them.

The result is logged, printed to stdout as JSON and written to `--output`.
"""

import json
import os

from absl import app, flags, logging

from mixco_tf import data, evaluation

FLAGS = flags.FLAGS


def define_flags():
    """Defines the flags of this command; called by `run()`.

    The flags are not defined at import time because `dataset`, `batch_size`, `seed`
    and `data_dir` are also flags of `mixco_tf.train`, and absl rejects a flag name
    defined twice in one process.
    """
    flags.DEFINE_string(
        "saved_model", None, "Version folder of an exported backbone, the folder that contains saved_model.pb."
    )
    flags.DEFINE_string("dataset", "digits", "Registered dataset whose train split trains the probe and test split scores it.")
    flags.DEFINE_string("data_dir", None, "Folder where the dataset loader finds or downloads its files.")
    flags.DEFINE_string(
        "output",
        None,
        "JSON file for the results. Default: linear_eval_<dataset>_v<version>.json in the folder "
        "above --saved_model, next to the version folders, which TensorFlow Serving ignores.",
    )
    flags.DEFINE_integer("batch_size", 256, "Images per batch of feature extraction.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of the linear probes and the few-shot draws.")
    flags.DEFINE_list(
        "protocols",
        ["linear"],
        "Comma-separated protocols: linear (all labels, top-1 and top-5), 5shot (5 labels per "
        "class, mean top-1 over 5 draws), knn (k=20, temperature 0.1).",
    )


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
        return f"{path} is a training run directory. Pass its exported backbone: --saved_model={run_export}."
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        return (
            f"{path} contains no saved_model.pb, so it is not a SavedModel. If it is the export base "
            "folder, pass one of its version folders, e.g. " + os.path.join(path, "1") + "."
        )
    return None


def _check_protocols(protocols):
    if not protocols or set(protocols) - set(evaluation.PROTOCOLS):
        return f"Invalid --protocols={','.join(protocols)}. Pass one or more of {','.join(evaluation.PROTOCOLS)}."
    return None


def main(argv):
    """Extracts features with the SavedModel, runs the protocols and writes the results."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}. Pass options as flags: --key=value.")
    error = check_saved_model_dir(FLAGS.saved_model) or _check_protocols(FLAGS.protocols)
    if error:
        logging.error("%s", error)
        return 2
    try:
        splits = data.load_dataset(FLAGS.dataset, FLAGS.data_dir)
        serving_layer = evaluation.load_serving_layer(FLAGS.saved_model)
    except ValueError as error:
        logging.error("%s", error)
        return 2

    logging.info("Evaluating %s on %s with protocols %s", FLAGS.saved_model, FLAGS.dataset, FLAGS.protocols)
    metrics = evaluation.evaluate_saved_model(
        serving_layer, splits, batch_size=FLAGS.batch_size, seed=FLAGS.seed, protocols=FLAGS.protocols
    )
    for key, value in metrics.items():
        logging.info("%s: %.4f", key, value)
    results = {
        "saved_model": os.path.abspath(FLAGS.saved_model),
        "dataset": FLAGS.dataset,
        **metrics,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
        "num_classes": splits.num_classes,
        "seed": FLAGS.seed,
    }

    output = FLAGS.output or default_output_path(FLAGS.saved_model, FLAGS.dataset)
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
