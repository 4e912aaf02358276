"""Pretrains MixCo (or MoCo-v2), exports the backbone and evaluates it.

    python -m mixco_tf.train                                  # digits, configs/digits.yaml settings
    python -m mixco_tf.train --config=configs/NAME.yaml --epochs=5 --model_dir=runs/try

Settings come from the built-in defaults (the digits setting), then `--config`, then
individual flags: every key of `mixco_tf.config.Config` is a flag of the same name.

A run directory contains `config.yaml`, `checkpoints/`, `backup/` (the training state
of the last completed epoch), `logs/` (TensorBoard), `history.csv`, `plots/` (PNGs,
when matplotlib is installed), `export/backbone/1/` (SavedModel) and `results.json`.

Rerunning a command with the same `--model_dir` resumes an interrupted run after its
last completed epoch, and returns at once for a finished one. Exit codes: 2 for an
invalid config, a `--model_dir` of another config or an unreadable backup, 3 when the
loss became NaN or infinite, 130 after Ctrl-C (SIGINT) and 143 after SIGTERM.
"""

import sys

from absl import app, flags, logging

from mixco_tf import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("config", None, "YAML file of config keys; flags given on the command line override it.")
flags.DEFINE_boolean("evaluate", True, "Evaluate the exported backbone and a random-init copy at the end of the run.")
flags.DEFINE_boolean(
    "overwrite",
    False,
    "Delete the outputs of a previous run in --model_dir (config.yaml, backup/, checkpoints/, "
    "history.csv, logs/, plots/, export/, results.json) and train from scratch. Without it, a "
    "--model_dir with a backup resumes that run.",
)

# Exit codes besides 0 and absl's 1 for an uncaught exception.
EXIT_INVALID_CONFIG = 2
EXIT_NON_FINITE_LOSS = 3


def _define_config_flags():
    """Defines one flag per config key, defaulting to None so that unset flags are visible."""
    definers = {
        str: flags.DEFINE_string,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        bool: flags.DEFINE_boolean,
    }
    defaults = config_lib.Config()
    for name, kind in config_lib.field_types().items():
        help_text = f"{config_lib.HELP.get(name, name)} (default: {getattr(defaults, name)!r})"
        definers[kind](name, None, help_text)


_define_config_flags()


def resolve_config():
    """Merges defaults, the --config YAML file and command-line flags, then validates."""
    values, source = {}, "built-in defaults (the settings of configs/digits.yaml)"
    if FLAGS.config:
        values, source = config_lib.load_yaml(FLAGS.config), FLAGS.config
    overrides = {name: FLAGS[name].value for name in config_lib.field_types() if FLAGS[name].present}
    config = config_lib.from_dict({**values, **overrides}, source=source)
    logging.info("Config from %s%s", source, f", overridden by flags {sorted(overrides)}" if overrides else "")
    return config.validate()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}. Config values are flags: --key=value.")
    try:
        config = resolve_config()
    except ValueError as error:
        logging.error("%s", error)
        sys.exit(EXIT_INVALID_CONFIG)

    # Imported after validation, so a bad config fails before TensorFlow loads.
    from mixco_tf import checkpointing, experiment

    resume_hint = (
        f"Rerun the same command with --model_dir={config.model_dir} to resume from the last completed epoch."
        if config.model_dir
        else "Rerun with --model_dir=<the run directory logged above> to resume from the last completed epoch."
    )
    try:
        results = experiment.run_experiment(config, evaluate=FLAGS.evaluate, overwrite=FLAGS.overwrite)
    except (config_lib.ConfigError, checkpointing.CheckpointError) as error:
        logging.error("%s", error)
        sys.exit(EXIT_INVALID_CONFIG)
    except checkpointing.NonFiniteLossError as error:
        logging.error("Training stopped: %s", error)
        sys.exit(EXIT_NON_FINITE_LOSS)
    except checkpointing.TrainingInterrupted as error:
        logging.warning("%s %s", error, resume_hint)
        sys.exit(128 + error.signal_number)
    except KeyboardInterrupt:
        logging.warning("Interrupted. %s", resume_hint)
        sys.exit(130)
    experiment.print_summary(results)


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
