"""README's Python example runs as written."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_one_python_example():
    assert len(_python_blocks()) == 1


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _python_blocks()[0]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "notebook" / "backbone" / "1" / "saved_model.pb").is_file()
