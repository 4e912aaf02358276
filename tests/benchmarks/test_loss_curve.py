"""benchmarks/loss_curve.py: its curve comparison against NumPy, and its CLI as a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import loss_curve

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_compare_matches_cumulative_sums():
    rng = np.random.default_rng(0)
    reference, other = rng.normal(size=30), rng.normal(size=30)

    gap_max, gap_mean = loss_curve.compare(reference, other)

    # Moving averages from cumulative sums, independent of np.convolve.
    def averages(values):
        sums = np.concatenate([[0.0], np.cumsum(values)])
        return (sums[loss_curve.WINDOW :] - sums[: -loss_curve.WINDOW]) / loss_curve.WINDOW

    expected = np.abs(averages(reference) - averages(other))
    assert len(expected) == 30 - loss_curve.WINDOW + 1
    assert gap_max == pytest.approx(expected.max())
    assert gap_mean == pytest.approx(expected.mean())


@pytest.mark.slow
def test_cli_compares_runs(tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("dataset: digits\nimage_size: 16\nwidth_multiplier: 0.125\nbatch_size: 64\nqueue_size: 256\n")
    output = tmp_path / "curves.json"
    command = [
        sys.executable, "-m", "benchmarks.loss_curve", f"--config={config}", "--steps=11",
        "--precision=float32", f"--output={output}",
    ]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=900)

    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    runs = report["runs"]
    # The reference, then the reference again with the next seed as the yardstick.
    assert [run["seed"] for run in runs] == [0, 1]
    for run in runs:
        assert len(run["losses"]) == 11
        assert np.all(np.isfinite(run["losses"]))
    gap_max, gap_mean = loss_curve.compare(runs[0]["losses"], runs[1]["losses"])
    assert report["yardstick"] == [gap_max, gap_mean]
    assert gap_max > 0
    assert report["comparisons"] == []
    assert "(yardstick)" in completed.stdout


def test_cli_rejects_too_few_steps():
    command = [sys.executable, "-m", "benchmarks.loss_curve", "--steps=5"]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 2
    assert "--steps=5" in completed.stderr

