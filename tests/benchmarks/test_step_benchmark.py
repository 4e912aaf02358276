"""The step benchmark's FLOP count against an analytic count, and its CLI as a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import step
from mixco_tf.models import MixCo

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _conv_flops(size, kernel, channels_in, channels_out):
    return 2 * size * size * kernel * kernel * channels_in * channels_out


def _resnet18_imagenet_stem_flops(image_size, projection_dim=128):
    """Counts ResNet-18's (imagenet stem) conv and dense FLOP by hand, head included."""
    size = (image_size + 2 * 3 - 7) // 2 + 1  # stem conv 7x7/2, padding 3
    total = _conv_flops(size, 7, 3, 64)
    size = (size + 2 - 3) // 2 + 1  # max-pool 3x3/2, padding 1
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            out_size = (size + 2 - 3) // stride + 1
            total += _conv_flops(out_size, 3, channels, width)
            total += _conv_flops(out_size, 3, width, width)
            if stride != 1 or channels != width:
                total += _conv_flops(out_size, 1, channels, width)
            size, channels = out_size, width
    return total + 2 * 512 * 512 + 2 * 512 * projection_dim


@pytest.mark.parametrize("image_size", [64])
def test_forward_flops_match_hand_count(image_size):
    model = MixCo(backbone="resnet18", stem="imagenet", queue_size=256, seed=0)

    counted = step.encoder_forward_flops(model, image_size)

    assert counted == _resnet18_imagenet_stem_flops(image_size)


def test_step_flops_formula():
    forward, batch, queue, dim = 1000, 8, 64, 16

    mixco = step.step_flops(forward, batch, "mixco", queue, dim)
    moco = step.step_flops(forward, batch, "moco", queue, dim)

    assert moco == 3 * forward * batch + forward * batch + 4 * batch * queue * dim
    assert mixco == 3 * forward * (batch + batch // 2) + forward * batch + 4 * (batch + batch // 2) * queue * dim


def test_cli_writes_one_record_per_method(tmp_path):
    output = tmp_path / "step.jsonl"
    command = [
        # Width 0.125: every stage has 8 or more channels, which oneDNN computes right.
        sys.executable, "-m", "benchmarks.step", "--width_multiplier=0.125", "--image_size=16",
        "--batch_size=16", "--steps=2", "--warmup_steps=1", "--repeats=1", "--queue_size=32",
        "--onednn=true", f"--output={output}",
    ]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stderr[-2000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["method"] for record in records] == ["mixco", "moco"]
    # The worker records what TensorFlow ran, which --onednn=true switched on.
    assert [record["onednn"] for record in records] == [True, True]
    for record in records:
        assert set(step.FIELDS) <= record.keys()
        assert record["images_per_second"] > 0
        assert 0 < record["utilization_fp32"]
    assert "MixCo / MoCo step time" in completed.stdout


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--batch_size=12", "batch_size 12"),
        ("--stem=foo", "invalid stem 'foo'"),
        ("--backbone=resnet7", "invalid backbone 'resnet7'"),
        ("--steps=0", "invalid --steps=0"),
        ("--repeats=0", "invalid --repeats=0"),
        ("--onednn=maybe", "use true, false or default"),
        ("--output=/nonexistent-folder/step.jsonl", "its folder does not exist"),
    ],
)
def test_cli_rejects_bad_value_before_measuring(flag, message):
    command = [sys.executable, "-m", "benchmarks.step", flag]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_step_parts_cli_prints_every_part():
    command = [
        sys.executable, "-m", "benchmarks.step_parts", "--image_size=16", "--batch_size=8", "--repeats=1",
        "--width_multiplier=0.125",
    ]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stderr[-2000:]
    for part in ("whole step", "query forward + backward + SGD", "key forward (split BatchNorm)", "rest"):
        assert part in completed.stdout


def test_cli_continues_after_a_failed_setting(tmp_path):
    """A worker that fails (here: width 0, which the model rejects) is reported, the rest still run."""
    output = tmp_path / "step.jsonl"
    command = [
        sys.executable, "-m", "benchmarks.step", "--width_multiplier=0,0.125",
        "--image_size=16", "--batch_size=16", "--steps=1", "--warmup_steps=1", "--repeats=1",
        "--queue_size=32", "--methods=moco", f"--output={output}",
    ]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=600)

    assert completed.returncode == 1
    assert "FAILED" in completed.stderr
    assert "width_multiplier must be positive" in completed.stderr
    assert "1 of 2 settings failed" in completed.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["width_multiplier"] for record in records] == [0.125]
