"""MixCo under tf.distribute: 2 replicas on logical CPU devices, and multi-worker runs.

The replica checks run `tests/replica_checks.py` in a fresh process, because TensorFlow
splits the CPU into logical devices only before its runtime starts.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from mixco_tf import distribute

TESTS = pathlib.Path(__file__).parent
REPOSITORY = TESTS.parent


def _run_check(name):
    completed = subprocess.run(
        [sys.executable, str(TESTS / "replica_checks.py"), name],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPOSITORY,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def queue_shuffle():
    return _run_check("queue_shuffle")


@pytest.fixture(scope="module")
def queue_none():
    return _run_check("queue_none")


def test_queue_identical_on_replicas(queue_shuffle):
    assert queue_shuffle["queue_difference"] == 0.0


def test_pointer_advances_by_global_batch(queue_shuffle):
    # 3 steps of the global batch 8 (4 per replica) into a queue of 32.
    assert queue_shuffle["pointers"] == [24, 24]


def test_key_encoder_identical_on_replicas(queue_shuffle):
    assert queue_shuffle["key_weight_difference"] == 0.0
    assert queue_shuffle["query_weight_difference"] == 0.0


def test_queue_holds_gathered_keys_in_replica_order(queue_none):
    """The last step's 8 queue rows are replica 0's 4 keys, then replica 1's.

    The expected keys come from one device, a different reduction order than the
    replicas' convolutions, so float32 rounding allows a few ulps of unit vectors.
    """
    assert queue_none["queue_difference"] == 0.0
    assert queue_none["last_keys_difference"] < 1e-6


@pytest.mark.slow
def test_two_replicas_match_one_device():
    """BN-free MoCo-v2 (beta = 0): 2 replicas at global batch 8 == one device at batch 8.

    Tolerance 1e-6: the replicas sum two per-replica gradients where one device reduces
    over the whole batch at once, so float32 rounding differs by a few ulps (measured:
    at most 3e-7 on the unit-vector queue, 3e-8 on weights). A wrong scaling is far
    larger: summing unscaled replica losses doubles every step, and counting the weight
    decay (1e-2 here) once per replica moves weights by about lr * decay * |w| = 2e-4.
    """
    result = _run_check("replicas_match_one_device")

    assert result["initial_difference"] == 0.0
    assert result["loss_mirrored"] == pytest.approx(result["loss_one_device"], abs=1e-5)
    worst = max(result["final_difference"].items(), key=lambda item: item[1])
    assert worst[1] < 1e-6, worst
    assert result["largest_update"] > 1e-3


def test_shuffled_keys_stay_aligned():
    """Identical query and key images give q . k = 1, i.e. positive logits of 1 / T.

    The keys went through the cross-replica shuffle and unshuffle; a misaligned key
    belongs to another random image, whose similarity is far below 1.
    """
    result = _run_check("positives_aligned")

    np.testing.assert_allclose(
        result["positive_logits"], 1.0 / result["temperature"], rtol=1e-6
    )


# ---------------------------------------------------------------------- config checks


def test_global_batch_splits_per_replica():
    assert distribute.check_global_batch(128, 4, key_bn_splits=8) == 32


def test_odd_per_replica_batch_names_both_numbers():
    with pytest.raises(ValueError, match=r"batch_size=12: with 4 replicas each replica gets 3 images"):
        distribute.check_global_batch(12, 4)


def test_indivisible_batch_is_rejected():
    with pytest.raises(ValueError, match=r"batch_size=10: it does not divide among 4 replicas"):
        distribute.check_global_batch(10, 4)


def test_key_splits_checked_per_replica():
    with pytest.raises(ValueError, match=r"key_bn_splits=32: with batch_size=32 on 2 replicas"):
        distribute.check_global_batch(32, 2, key_bn_splits=32)


def test_unknown_strategy_is_rejected():
    with pytest.raises(distribute.StrategyError, match="Invalid strategy='gpus'"):
        distribute.create_strategy("gpus")


# ---------------------------------------------------------------------- multi-worker


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_workers(tmp_path, model_dir, epochs, name):
    """Runs the train CLI as two MultiWorkerMirroredStrategy workers; returns their logs."""
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    arguments = [
        sys.executable, "-m", "mixco_tf.train", f"--model_dir={model_dir}",
        "--strategy=multi_worker", f"--epochs={epochs}", "--batch_size=32", "--queue_size=64",
        "--key_bn_splits=2", "--width_multiplier=0.0625", "--evaluate=false",
    ]
    workers = []
    for index in range(2):
        environment = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = open(tmp_path / f"{name}{index}.log", "w")
        workers.append((subprocess.Popen(arguments, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=REPOSITORY), log))
    for process, log in workers:
        try:
            process.wait(timeout=900)
        finally:
            process.kill()
            log.close()
    logs = [(tmp_path / f"{name}{index}.log").read_text() for index in range(2)]
    for index, (process, _) in enumerate(workers):
        assert process.returncode == 0, logs[index][-4000:]
    return logs


def _final_digests(logs):
    return [line.rsplit("SHA-256 ", 1)[1] for log in logs for line in log.splitlines() if "Final weights of" in line]


@pytest.mark.slow
def test_two_workers_train_with_cli(tmp_path):
    """Two MultiWorkerMirroredStrategy workers on loopback ports run the real CLI, then resume."""
    model_dir = tmp_path / "run"
    logs = _run_two_workers(tmp_path, model_dir, epochs=1, name="first")

    results = json.loads((model_dir / "results.json").read_text())
    assert results["num_replicas"] == 2
    assert results["strategy"] == "multi_worker"
    assert list(tmp_path.glob("**/results.json")) == [model_dir / "results.json"]
    digests = _final_digests(logs)
    assert len(digests) == 2
    assert digests[0] == digests[1]

    # A longer rerun resumes both workers from the chief's backup of epoch 1.
    logs = _run_two_workers(tmp_path, model_dir, epochs=2, name="resumed")

    for log in logs:
        assert "(end of epoch 1)" in log
        assert "epochs 2 to 2" in log
    results = json.loads((model_dir / "results.json").read_text())
    assert results["resumed_from_epoch"] == 1
    assert results["epochs_completed"] == 2
    digests = _final_digests(logs)
    assert len(digests) == 2
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_mirrored_run_resumes(tmp_path):
    """Two replicas on logical CPU devices: a longer rerun continues from the backup."""
    model_dir = tmp_path / "run"
    arguments = [
        sys.executable, "-m", "mixco_tf.train", f"--model_dir={model_dir}", "--strategy=mirrored",
        "--cpu_devices=2", "--batch_size=32", "--queue_size=96", "--key_bn_splits=2",
        "--width_multiplier=0.0625", "--image_size=16", "--evaluate=false",
    ]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.run([*arguments, "--epochs=1"], capture_output=True, text=True, timeout=900, env=environment, cwd=REPOSITORY)
    assert first.returncode == 0, first.stderr[-4000:]
    state = json.loads((model_dir / "backup" / "training_state.json").read_text())

    second = subprocess.run([*arguments, "--epochs=2"], capture_output=True, text=True, timeout=900, env=environment, cwd=REPOSITORY)

    assert second.returncode == 0, second.stderr[-4000:]
    iterations = state["optimizer_iterations"]
    assert (
        f"(end of epoch 1): optimizer iterations {iterations}, queue pointer {state['queue_pointer']}."
        in second.stderr
    )
    results = json.loads((model_dir / "results.json").read_text())
    assert results["strategy"] == "mirrored"
    assert results["num_replicas"] == 2
    assert results["resumed_from_epoch"] == 1
    final = json.loads((model_dir / "backup" / "training_state.json").read_text())
    # Iterations continued from the restored count, and the pointer moved by the global batch.
    assert final["optimizer_iterations"] == 2 * iterations
    assert final["queue_pointer"] == (2 * iterations * 32) % 96
