"""The augmentation benchmark's command line, as a subprocess on digits with a small batch."""

import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_augment_benchmark_prints_ratio():
    completed = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.augment",
            "--settings=digits", "--batch_size=32", "--steps=1", "--repeats=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPOSITORY,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| digits |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[3] == "32"
    for rate in cells[4:]:
        assert float(rate) > 0
