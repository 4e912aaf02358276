"""Runs a benchmark's measurement in a fresh Python process and reads its JSON result."""

import json
import subprocess
import sys

from benchmarks import flags


def run_worker(module, payload, onednn, timeout):
    """Runs `python -m MODULE --worker PAYLOAD` and returns the JSON on its last stdout line.

    Args:
        module: the benchmark module, e.g. "benchmarks.step".
        payload: JSON-serializable settings of the worker.
        onednn: True or False to set TF_ENABLE_ONEDNN_OPTS, None to leave it unset.
            TensorFlow reads it when it loads, so each worker process gets its own.
        timeout: seconds before subprocess.TimeoutExpired.

    Raises:
        RuntimeError: if the worker exits non-zero, with the end of its stderr.
    """
    command = [sys.executable, "-m", module, "--worker", json.dumps(payload)]
    env = flags.switch_environment("TF_ENABLE_ONEDNN_OPTS", onednn)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{module} worker failed for {payload} with exit code {completed.returncode}:\n"
            f"{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])
