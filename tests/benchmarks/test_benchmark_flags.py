"""Bad flag values of the benchmark CLIs fail at once, naming the value and the fix."""

import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "module, flag, message",
    [
        ("benchmarks.pipeline", "--num_images=100", "--num_images must be at least --batch_size"),
        ("benchmarks.pipeline", "--batch_size=12", "multiple of 8"),
        ("benchmarks.pipeline", "--epochs=1", "the first epoch fills the cache"),
        ("benchmarks.augment", "--settings=foo", "invalid setting 'foo'"),
        ("benchmarks.augment", "--batch_size=12", "invalid --batch_size=12"),
    ],
)
def test_benchmark_rejects_bad_value(module, flag, message):
    completed = subprocess.run(
        [sys.executable, "-m", module, flag], cwd=REPOSITORY, capture_output=True, text=True, timeout=120
    )

    assert completed.returncode != 0
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
