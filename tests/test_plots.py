"""PNG plots of a run, and the package without matplotlib."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import plots, preview
from mixco_tf.config import Config
from mixco_tf.data import load_dataset
from mixco_tf.models import build_backbone

HISTORY_HEADER = ["epoch", "learning_rate", "loss", "mix_loss", "moco_loss", "top1", "val_loss"]
RESULTS = {
    "evaluation": {"linear_top1": 0.9, "linear_5shot_top1": 0.7, "knn_top1": 0.8},
    "random_init_evaluation": {"linear_top1": 0.85, "linear_5shot_top1": 0.6, "knn_top1": 0.75},
}
TINY_FLAGS = [
    "--epochs=2",
    "--batch_size=32",
    "--queue_size=64",
    "--key_bn_splits=4",
    "--width_multiplier=0.0625",
    "--warmup_epochs=0",
    "--evaluate=false",
]


def _pixels(inches):
    return round(inches[1] * plots.DPI), round(inches[0] * plots.DPI)


def _png_shape(path):
    return tuple(tf.io.decode_png(tf.io.read_file(str(path))).shape)


def _write_history(path, epochs=3, extra_columns=()):
    """Writes a history.csv as CSVLogger does, `NA` in the unused val_ column."""
    header = HISTORY_HEADER + list(extra_columns)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for epoch in range(epochs):
            row = [epoch, 0.1 / (epoch + 1), 9.0 - epoch, 5.0 - epoch / 2, 4.0 - epoch / 2, 0.1 * epoch, "NA"]
            writer.writerow(row + [0.5 + 0.1 * epoch] * len(extra_columns))


def test_read_history_drops_empty_columns(tmp_path):
    path = tmp_path / "history.csv"
    _write_history(path)

    history = plots.read_history(str(path))

    assert sorted(history) == sorted(HISTORY_HEADER[:-1])
    np.testing.assert_array_equal(history["epoch"], [0, 1, 2])
    np.testing.assert_allclose(history["loss"], [9.0, 8.0, 7.0])
    np.testing.assert_allclose(history["learning_rate"], [0.1, 0.05, 0.1 / 3])


def test_read_history_marks_missing_cells_nan(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,knn_top1\n0,9.0,NA\n1,8.0,0.6\n2,7.0,\n")

    history = plots.read_history(str(path))

    assert np.isnan(history["knn_top1"][0])
    assert history["knn_top1"][1] == 0.6
    assert np.isnan(history["knn_top1"][2])


def test_loss_curves_png_size(tmp_path):
    _write_history(tmp_path / "history.csv")
    figure = plots.loss_curves_figure(plots.read_history(str(tmp_path / "history.csv")))

    figure.savefig(tmp_path / "loss.png", dpi=plots.DPI)

    assert _png_shape(tmp_path / "loss.png") == (*_pixels(plots.LOSS_CURVES_INCHES), 4)
    loss_axis, rate_axis = figure.axes
    assert loss_axis.get_legend_handles_labels()[1] == ["loss", "moco_loss", "mix_loss"]
    np.testing.assert_allclose(rate_axis.lines[0].get_ydata(), [0.1, 0.05, 0.1 / 3])


def test_accuracy_plots_knn_column_per_epoch(tmp_path):
    _write_history(tmp_path / "history.csv", extra_columns=["knn_top1"])
    history = plots.read_history(str(tmp_path / "history.csv"))

    figure = plots.accuracy_figure(history, RESULTS)

    _, accuracy_axis = figure.axes
    labels = accuracy_axis.get_legend_handles_labels()[1]
    assert labels[0] == "knn_top1"
    assert "final knn_top1" in labels
    np.testing.assert_allclose(accuracy_axis.lines[0].get_ydata(), [0.5, 0.6, 0.7])


def test_accuracy_shows_final_results_without_knn_column(tmp_path):
    _write_history(tmp_path / "history.csv")
    history = plots.read_history(str(tmp_path / "history.csv"))

    figure = plots.accuracy_figure(history, RESULTS)

    _, accuracy_axis = figure.axes
    heights = [patch.get_height() for patch in accuracy_axis.patches]
    np.testing.assert_allclose(heights, [0.9, 0.7, 0.8, 0.85, 0.6, 0.75])
    figure.savefig(tmp_path / "accuracy.png", dpi=plots.DPI)
    assert _png_shape(tmp_path / "accuracy.png") == (*_pixels(plots.ACCURACY_INCHES), 4)


def test_accuracy_without_any_evaluation_still_draws(tmp_path):
    _write_history(tmp_path / "history.csv")

    figure = plots.accuracy_figure(plots.read_history(str(tmp_path / "history.csv")), None)

    _, accuracy_axis = figure.axes
    assert "no kNN or linear accuracy" in accuracy_axis.texts[0].get_text()


def test_tsne_keeps_separated_clusters_apart():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5.0
    labels = np.repeat(np.arange(3), 25)
    features = centers[labels] + rng.normal(scale=0.3, size=(75, 16))

    embedding = plots.tsne_embedding(features, seed=0)

    assert embedding.shape == (75, 2)
    assert embedding.dtype == np.float32
    # Each point's nearest other point in the embedding has its class.
    distances = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert np.all(labels[distances.argmin(axis=1)] == labels)


def test_tsne_figure_subsamples_large_sets():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(60, 8))
    labels = np.arange(60) % 3

    figure = plots.tsne_figure(features, labels, ["a", "b", "c"], max_points=30)

    axis = figure.axes[0]
    assert "(30 random points)" in axis.get_title()
    assert sum(len(collection.get_offsets()) for collection in axis.collections) == 30
    assert axis.get_legend_handles_labels()[1] == ["a", "b", "c"]


def test_tsne_figure_rejects_label_count_mismatch():
    with pytest.raises(ValueError, match="4 feature vectors but 3 labels"):
        plots.tsne_figure(np.zeros((4, 2)), np.zeros(3))


def test_write_run_plots_writes_every_png(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    _write_history(model_dir / "history.csv")
    (model_dir / "results.json").write_text(json.dumps(RESULTS))
    config = Config(width_multiplier=0.0625, model_dir=str(model_dir))
    backbone = build_backbone(config.backbone, config.stem, config.width_multiplier)

    paths = plots.write_run_plots(str(model_dir), backbone, load_dataset("digits"), config)

    expected = {
        "loss_curves": _pixels(plots.LOSS_CURVES_INCHES),
        "accuracy": _pixels(plots.ACCURACY_INCHES),
        "tsne": _pixels(plots.TSNE_INCHES),
        "preview": preview.figure_size_pixels(4)[::-1],
    }
    assert sorted(paths) == sorted(expected)
    for name, (height, width) in expected.items():
        assert paths[name] == str(model_dir / "plots" / f"{name}.png")
        assert _png_shape(paths[name]) == (height, width, 4), name


def test_package_imports_without_matplotlib(tmp_path):
    """`sys.modules["matplotlib"] = None` makes every matplotlib import fail."""
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "import logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "import mixco_tf\n"
        "from mixco_tf import experiment, plots, preview, summaries, train\n"
        "assert mixco_tf.MixCo is not None\n"
        "assert not plots.matplotlib_available()\n"
        f"assert plots.write_run_plots({str(tmp_path)!r}, None, None, None) == {{}}\n"
        "try:\n"
        "    import matplotlib\n"
        "except ImportError:\n"
        "    print('matplotlib blocked')\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "matplotlib blocked" in result.stdout
    assert "matplotlib is not installed, so the run's plots are skipped" in result.stderr
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_training_run_writes_plots_and_summaries(tmp_path):
    model_dir = tmp_path / "run"

    result = subprocess.run(
        [sys.executable, "-m", "mixco_tf.train", f"--model_dir={model_dir}", *TINY_FLAGS],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )

    assert result.returncode == 0, result.stderr[-3000:]
    for name, inches in (
        ("loss_curves", plots.LOSS_CURVES_INCHES),
        ("accuracy", plots.ACCURACY_INCHES),
        ("tsne", plots.TSNE_INCHES),
    ):
        assert _png_shape(model_dir / "plots" / f"{name}.png") == (*_pixels(inches), 4), name
    width, height = preview.figure_size_pixels(4)
    assert _png_shape(model_dir / "plots" / "preview.png") == (height, width, 4)

    # 1,437 images in batches of 32: 44 steps per epoch, a cosine over 88 steps.
    history = plots.read_history(str(model_dir / "history.csv"))
    expected_rates = 0.12 * 0.5 * (1.0 + np.cos(np.pi * np.array([44, 88]) / 88))
    np.testing.assert_allclose(history["learning_rate"], expected_rates, rtol=1e-5, atol=1e-7)

    scalar_tags, image_steps = set(), []
    for log_dir in ("train", "mixed_inputs"):
        for path in tf.io.gfile.glob(str(model_dir / "logs" / log_dir / "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    if value.tag == "mixed_inputs":
                        image_steps.append(event.step)
                    else:
                        scalar_tags.add(value.tag)
    assert {"epoch_loss", "epoch_moco_loss", "epoch_mix_loss", "epoch_top1", "epoch_learning_rate"} <= scalar_tags
    assert image_steps == [0, 1]


def test_history_columns_of_keras_history():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(np.ones((4, 2)), np.zeros((4, 1)), epochs=4, initial_epoch=1, verbose=0)

    columns = plots.history_columns(history)

    np.testing.assert_array_equal(columns["epoch"], [1, 2, 3])
    assert len(columns["loss"]) == 3
    np.testing.assert_array_equal(plots.history_columns({"loss": [3.0, 2.0]})["epoch"], [0, 1])


def test_loss_curves_without_learning_rate_hint():
    figure = plots.loss_curves_figure({"loss": [3.0, 2.0], "moco_loss": [2.0, 1.5]})

    _, rate_axis = figure.axes
    assert "LearningRateLogger" in rate_axis.texts[0].get_text()


def test_figures_display_as_png_in_notebooks():
    from mixco_tf import figures

    figure = figures.new_figure((3.0, 2.0), 50)

    png = figure._repr_png_()

    assert tuple(tf.io.decode_png(png).shape) == (100, 150, 4)
