"""Tests of `python -m mixco_tf.tune`, the pretraining hyperparameter search."""

import json
import os
import subprocess
import sys

import pytest

TINY = [
    "--epochs=1",
    "--batch_size=64",
    "--queue_size=128",
    "--key_bn_splits=4",
    "--width_multiplier=0.0625",
    "--image_size=8",
    "--warmup_epochs=0",
]


def run_tune(*args):
    return subprocess.run(
        [sys.executable, "-m", "mixco_tf.tune", *args],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_parse_range_errors():
    from mixco_tf import tune

    assert tune.parse_range("learning_rate_range", ["0.01", "0.1"]) == (0.01, 0.1)
    assert tune.parse_range("mix_weight_range", ["0", "2"], positive=False) == (0.0, 2.0)
    for values in (["0.1"], ["a", "b"], ["0.2", "0.1"], ["0", "1"]):
        with pytest.raises(ValueError, match="learning_rate_range"):
            tune.parse_range("learning_rate_range", values)


def test_search_space_ignores_trial_and_resumable_keys():
    from mixco_tf import config as config_lib
    from mixco_tf import tune

    ranges = {"mix_weight": (0.0, 1.0)}
    first = tune.search_space_record(config_lib.Config(model_dir="a", epochs=3), ranges, "knn", 0.2, 0)
    second = tune.search_space_record(config_lib.Config(model_dir="b", epochs=5, mix_weight=2.0), ranges, "knn", 0.2, 0)
    assert first == second
    changed = tune.search_space_record(config_lib.Config(temperature=0.3), ranges, "knn", 0.2, 0)
    assert changed["base_config"]["temperature"] == 0.3
    assert changed != first


def test_moco_method_rejected(tmp_path):
    completed = run_tune(f"--tune_dir={tmp_path / 'tune'}", "--method=moco")
    assert completed.returncode == 2
    assert "use --method=mixco" in completed.stderr


@pytest.mark.slow
def test_search_resumes_and_rejects_new_space(tmp_path):
    tune_dir = tmp_path / "tune"
    first = run_tune(f"--tune_dir={tune_dir}", "--max_trials=2", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tune_dir / "tuning_results.json").read_text())
    assert json.loads(first.stdout.strip().splitlines()[-1]) == results
    trials = results["trials"]
    assert len(trials) == 2
    model_dirs = [trial["model_dir"] for trial in trials]
    assert len(set(model_dirs)) == 2
    for model_dir in model_dirs:
        assert os.path.isfile(os.path.join(model_dir, "checkpoints", "mixco.weights.h5"))
    assert 0.0 <= results["best_validation_knn_top1"] <= 1.0
    assert set(results["best"]) == {"mix_weight", "mix_temperature", "learning_rate"}
    assert 0.0 <= results["best_test"]["knn_top1"] <= 1.0
    checkpoint_times = [os.path.getmtime(os.path.join(d, "checkpoints", "mixco.weights.h5")) for d in model_dirs]

    # A larger budget reruns nothing and adds one trial.
    more = run_tune(f"--tune_dir={tune_dir}", "--max_trials=3", *TINY)
    assert more.returncode == 0, more.stderr[-3000:]
    trials_after = json.loads((tune_dir / "tuning_results.json").read_text())["trials"]
    assert trials_after[:2] == trials
    assert len(trials_after) == 3
    assert trials_after[2]["model_dir"] not in model_dirs
    assert [os.path.getmtime(os.path.join(d, "checkpoints", "mixco.weights.h5")) for d in model_dirs] == checkpoint_times

    changed = run_tune(f"--tune_dir={tune_dir}", "--max_trials=3", "--mix_weight_range=0.5,1.5", *TINY)
    assert changed.returncode == 2
    assert "another search space" in changed.stderr
    assert "Pass a new --tune_dir" in changed.stderr
