"""Bad data stops a run before training, with a message that names the file or key."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mixco_tf.data import load_dataset, miniature

# The offline checks must fail within seconds; this bound only catches retry loops of minutes.
OFFLINE_FAILURE_BOUND_S = 60
CLOSED_LOCAL_PROXY = "http://127.0.0.1:9"


def _jpeg(label=0, size=24):
    return miniature.encode_image(miniature.class_image(label, size, np.random.default_rng(label)))


def _folder_missing(root):
    return "folder", str(root / "no_such_folder"), "no_such_folder"


def _folder_empty(root):
    (root / "empty").mkdir()
    return "folder", str(root / "empty"), "contains no images"


def _folder_empty_class(root):
    miniature.write_image_folder(str(root), num_classes=2, per_class=2)
    (root / "class_9").mkdir()
    return "folder", str(root), "class_9"


def _folder_zero_byte_file(root):
    miniature.write_image_folder(str(root), num_classes=2, per_class=2)
    (root / "class_1" / "zero.jpg").write_bytes(b"")
    return "folder", str(root), os.path.join("class_1", "zero.jpg")


def _folder_truncated_file(root):
    miniature.write_image_folder(str(root), num_classes=2, per_class=2)
    (root / "class_0" / "cut.jpg").write_bytes(miniature.truncated(_jpeg()))
    return "folder", str(root), os.path.join("class_0", "cut.jpg")


def _folder_text_as_jpeg(root):
    miniature.write_image_folder(str(root), num_classes=2, per_class=2)
    (root / "class_0" / "readme.jpg").write_text("not an image")
    return "folder", str(root), "readme.jpg"


def _folder_without_data_dir(root):
    return "folder", None, "data_dir"


def _unknown_dataset(root):
    return "tiny_imagenett", str(root), "tiny_imagenett"


def _tiny(root, **options):
    miniature.write_tiny_imagenet_zip(str(root / "tiny-imagenet-200.zip"), num_classes=2, train_per_class=2, val_per_class=1, **options)
    return str(root)


def _tiny_missing_val_annotation(root):
    return "tiny_imagenet", _tiny(root, extra_val_images=["val_99.JPEG"]), "val_99.JPEG"


def _tiny_val_wnid_not_in_wnids(root):
    return "tiny_imagenet", _tiny(root, val_annotation_wnids={"val_0.JPEG": "n09999999"}), "n09999999"


def _tiny_train_wnid_not_in_wnids(root):
    return "tiny_imagenet", _tiny(root, extra_train_wnids=["n08888888"]), "n08888888"


def _tiny_zero_byte_image(root):
    return "tiny_imagenet", _tiny(root, bad_train_files={"n01443537_zero.JPEG": b""}), "n01443537_zero.JPEG"


def _tiny_truncated_image(root):
    return "tiny_imagenet", _tiny(root, bad_train_files={"n01443537_cut.JPEG": miniature.truncated(_jpeg(size=64))}), "n01443537_cut.JPEG"


BAD_DATA = [
    _folder_missing,
    _folder_empty,
    _folder_empty_class,
    _folder_zero_byte_file,
    _folder_truncated_file,
    _folder_text_as_jpeg,
    _folder_without_data_dir,
    _unknown_dataset,
    _tiny_missing_val_annotation,
    _tiny_val_wnid_not_in_wnids,
    _tiny_train_wnid_not_in_wnids,
    _tiny_zero_byte_image,
    _tiny_truncated_image,
]


@pytest.mark.parametrize("make_case", BAD_DATA, ids=[case.__name__.lstrip("_") for case in BAD_DATA])
def test_bad_data_names_file_or_key(tmp_path, make_case):
    name, data_dir, named = make_case(tmp_path)

    with pytest.raises(ValueError) as raised:
        load_dataset(name, data_dir)

    assert named in str(raised.value)


def _offline_env(monkeypatch=None):
    """Sends every HTTP(S) request to a closed port on this machine, so nothing leaves it."""
    variables = {name: CLOSED_LOCAL_PROXY for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    variables["NO_PROXY"] = variables["no_proxy"] = ""
    if monkeypatch is not None:
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
    return variables


@pytest.mark.parametrize(
    "name, file_name, url",
    [
        ("tiny_imagenet", "tiny-imagenet-200.zip", "http://cs231n.stanford.edu/tiny-imagenet-200.zip"),
        ("cifar10", "cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
        ("cifar100", "cifar-100-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"),
    ],
)
def test_offline_without_data_fails_fast(tmp_path, monkeypatch, name, file_name, url):
    _offline_env(monkeypatch)

    started = time.monotonic()
    with pytest.raises(ValueError) as raised:
        load_dataset(name, str(tmp_path))
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert url in message
    assert file_name in message
    assert str(tmp_path) in message
    assert elapsed < OFFLINE_FAILURE_BOUND_S


def _run_train(args, tmp_path, env_extra=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mixco_tf.train", f"--model_dir={tmp_path / 'run'}", "--epochs=1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return result, time.monotonic() - started


def test_cli_bad_file_exits_before_training(tmp_path):
    miniature.write_image_folder(str(tmp_path / "images"), num_classes=2, per_class=3)
    (tmp_path / "images" / "class_1" / "zero.jpg").write_bytes(b"")

    result, _ = _run_train(["--dataset=folder", f"--data_dir={tmp_path / 'images'}"], tmp_path)

    assert result.returncode == 2, result.stderr[-2000:]
    assert os.path.join("class_1", "zero.jpg") in result.stderr
    assert "--skip_bad_files=true" in result.stderr
    assert not (tmp_path / "run" / "history.csv").exists()
    assert not (tmp_path / "run" / "backup").exists()


def test_cli_offline_tiny_imagenet_fails_within_seconds(tmp_path):
    result, elapsed = _run_train(
        ["--dataset=tiny_imagenet", f"--data_dir={tmp_path / 'data'}"], tmp_path, env_extra=_offline_env()
    )

    assert result.returncode == 2, result.stderr[-2000:]
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in result.stderr
    assert "tiny-imagenet-200.zip" in result.stderr
    assert str(tmp_path / "data") in result.stderr
    assert elapsed < OFFLINE_FAILURE_BOUND_S


@pytest.mark.slow
def test_cli_trains_on_tiny_imagenet_archive(tmp_path):
    expected = miniature.write_tiny_imagenet_zip(
        str(tmp_path / "data" / "tiny-imagenet-200.zip"), num_classes=3, train_per_class=8, val_per_class=4,
        odd_kinds=miniature.ODD_KINDS, bad_train_files={"n01443537_zero.JPEG": b""},
    )
    args = [
        "--dataset=tiny_imagenet", f"--data_dir={tmp_path / 'data'}", "--skip_bad_files=true", "--batch_size=8",
        "--queue_size=16", "--key_bn_splits=4", "--width_multiplier=0.0625", "--image_size=16", "--warmup_epochs=0",
    ]

    result, _ = _run_train(args, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["num_train_examples"] == len(expected["train"]) == 30
    assert results["num_test_examples"] == len(expected["validation"]) == 12
    assert results["skipped_files"] == 1
    assert results["data"]["name"] == "tiny_imagenet"
    assert results["data"]["num_classes"] == 3
    assert results["epochs_completed"] == 1
    assert "knn_top1" in results["evaluation"]
