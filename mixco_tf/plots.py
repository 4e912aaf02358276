"""PNG plots of a finished run: losses, learning rate, accuracy, t-SNE and the views.

`write_run_plots` writes them into `MODEL_DIR/plots/` at the end of `run_experiment`:

| file | content |
| --- | --- |
| `loss_curves.png` | loss, moco_loss and mix_loss per epoch; the learning rate per epoch |
| `accuracy.png` | the contrastive top-1 per epoch; kNN or linear accuracy per epoch when history.csv has such a column, else the final evaluation of the pretrained and the random-init backbone |
| `tsne.png` | a 2-D t-SNE (scikit-learn) of the test features, one colour per class |
| `preview.png` | training images, their query and key views and the mixed images (`mixco_tf.preview`) |

The figure functions return `matplotlib.figure.Figure` objects, which notebooks display.
matplotlib is optional: this module imports without it, and `write_run_plots` logs
that it skipped the plots when matplotlib is missing.
"""

import csv
import importlib.util
import json
import logging
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import threadpoolctl

from mixco_tf import augment, evaluation, figures, preview

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
DPI = 100
# Figure sizes in inches; the PNGs are these times DPI pixels.
LOSS_CURVES_INCHES = (10.0, 4.0)
ACCURACY_INCHES = (10.0, 4.0)
TSNE_INCHES = (6.0, 6.0)
# t-SNE's cost grows quadratically with the points, so larger test sets are subsampled.
TSNE_MAX_POINTS = 2000
LOSS_KEYS = ("loss", "moco_loss", "mix_loss")
EVALUATION_KEYS = ("linear_top1", "linear_5shot_top1", "knn_top1")


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:
        # find_spec raises ValueError for a module set to None in sys.modules.
        return False


def read_history(path: str) -> dict[str, np.ndarray]:
    """Reads a `CSVLogger` history.csv into column name -> float64 array `[epochs]`.

    `CSVLogger` writes `NA` for a metric missing in an epoch, and adds a `val_` column
    for every metric even without validation data. Missing cells become NaN, and
    columns with no value at all are dropped.
    """
    with open(path, encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        return {}
    columns = {}
    for name in rows[0]:
        values = np.array([_cell_value(row.get(name)) for row in rows])
        if not np.all(np.isnan(values)):
            columns[name] = values
    return columns


def _cell_value(cell):
    return np.nan if cell in (None, "", "NA") else float(cell)


def _figure(inches):
    return figures.new_figure(inches, DPI)


def history_columns(history) -> dict[str, np.ndarray]:
    """Returns column name -> values per epoch of a `keras.callbacks.History` or a mapping.

    A mapping without an `epoch` column, like `History.history`, gets epochs counted
    from 0, the numbering of history.csv.
    """
    if isinstance(history, Mapping):
        values, epochs = history, None
    else:
        values, epochs = history.history, history.epoch
    columns = {name: np.asarray(column, dtype=np.float64) for name, column in values.items()}
    if "epoch" not in columns:
        if epochs is None:
            epochs = range(max((len(column) for column in columns.values()), default=0))
        columns["epoch"] = np.asarray(epochs, dtype=np.float64)
    return columns


def _epochs(history):
    """Returns 1-based epoch numbers `[epochs]`; history.csv counts from 0."""
    return history["epoch"] + 1


def loss_curves_figure(history):
    """Draws the losses and the learning rate per epoch.

    Args:
        history: column name -> values per epoch, as `read_history` returns, or the
            `History` of `model.fit`. The `loss`, `moco_loss`, `mix_loss` and
            `learning_rate` columns that are present are plotted.

    Returns:
        A `matplotlib.figure.Figure` of `LOSS_CURVES_INCHES` at `DPI`.
    """
    history = history_columns(history)
    figure = _figure(LOSS_CURVES_INCHES)
    loss_axis, rate_axis = figure.subplots(1, 2)
    epochs = _epochs(history)
    for key in LOSS_KEYS:
        if key in history:
            loss_axis.plot(epochs, history[key], marker=".", label=key)
    loss_axis.set(title="Training losses (epoch means)", xlabel="epoch", ylabel="loss")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)

    if "learning_rate" in history:
        rate_axis.plot(epochs, history["learning_rate"], marker=".", color="tab:purple")
    else:
        _note(rate_axis, "no learning_rate in the history:\nadd mixco_tf.summaries.LearningRateLogger\nto the callbacks of fit")
    rate_axis.set(title="Learning rate at the end of each epoch", xlabel="epoch", ylabel="learning rate")
    rate_axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def accuracy_figure(history, results: Optional[Mapping] = None):
    """Draws the contrastive top-1 per epoch and the accuracy of the representation.

    The right panel plots every history column whose name contains `knn` or `linear`
    per epoch. Without such columns it shows the final `linear_top1`,
    `linear_5shot_top1` and `knn_top1` of `results["evaluation"]` next to
    `results["random_init_evaluation"]`.

    Args:
        history: column name -> values per epoch, as `read_history` returns, or the
            `History` of `model.fit`.
        results: the run's results.json mapping, or None.

    Returns:
        A `matplotlib.figure.Figure` of `ACCURACY_INCHES` at `DPI`.
    """
    history = history_columns(history)
    figure = _figure(ACCURACY_INCHES)
    top1_axis, accuracy_axis = figure.subplots(1, 2)
    epochs = _epochs(history)
    if "top1" in history:
        top1_axis.plot(epochs, history["top1"], marker=".", color="tab:green")
    else:
        _note(top1_axis, "no top1 in the history")
    top1_axis.set(
        title="Contrastive top-1: positive key ranked first",
        xlabel="epoch",
        ylabel="fraction of queries",
        ylim=(0, 1),
    )
    top1_axis.grid(alpha=0.3)

    per_epoch = [name for name in history if "knn" in name or "linear" in name]
    evaluation_results = (results or {}).get("evaluation")
    if per_epoch:
        for name in per_epoch:
            accuracy_axis.plot(epochs, history[name], marker=".", label=name)
        if evaluation_results:
            for key in EVALUATION_KEYS:
                if key in evaluation_results:
                    accuracy_axis.scatter([epochs[-1]], [evaluation_results[key]], marker="*", s=80, label=f"final {key}")
        accuracy_axis.set(title="Accuracy of the frozen features per epoch", xlabel="epoch")
        accuracy_axis.legend(fontsize=8)
    elif evaluation_results:
        _final_evaluation_bars(accuracy_axis, evaluation_results, (results or {}).get("random_init_evaluation"))
    else:
        _note(accuracy_axis, "no kNN or linear accuracy in history.csv or results.json")
    accuracy_axis.set(ylabel="test accuracy", ylim=(0, 1))
    accuracy_axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _final_evaluation_bars(axis, pretrained, random_init):
    keys = [key for key in EVALUATION_KEYS if key in pretrained]
    positions = np.arange(len(keys))
    width = 0.38
    bars = axis.bar(positions - width / 2, [pretrained[key] for key in keys], width, label="pretrained")
    axis.bar_label(bars, fmt="%.3f", fontsize=8)
    if random_init:
        bars = axis.bar(positions + width / 2, [random_init.get(key, np.nan) for key in keys], width, label="random init")
        axis.bar_label(bars, fmt="%.3f", fontsize=8)
    axis.set_xticks(positions, keys)
    axis.set_title("Final evaluation on the test split")
    axis.legend(fontsize=8, loc="lower right")


def _note(axis, text):
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, fontsize=9)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """Embeds features in 2-D with t-SNE after L2 normalization.

    Normalizing first makes the Euclidean distances that t-SNE uses a function of the
    cosine similarity, the similarity the contrastive loss trains.

    Args:
        features: float `[num_points, dim]`, at least 2 points.
        seed: seed of the PCA initialization and the optimization.

    Returns:
        float32 `[num_points, 2]`.
    """
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"t-SNE needs features of shape [num_points >= 2, dim], got {features.shape}.")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    features = features / np.maximum(norms, 1e-12)
    # scikit-learn requires perplexity < num_points.
    perplexity = min(30.0, (len(features) - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # One OpenMP thread: at most TSNE_MAX_POINTS points take seconds that way, while
    # OpenMP threads that spin-wait for cores shared with TensorFlow's thread pools
    # made the same fit several times slower on a busy 2-core machine.
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        embedding = tsne.fit_transform(features)
    return embedding.astype(np.float32)


def tsne_figure(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Optional[Sequence[str]] = None,
    *,
    seed: int = 0,
    max_points: int = TSNE_MAX_POINTS,
    title: str = "t-SNE of the test features",
):
    """Draws a t-SNE of features, one colour per class.

    Args:
        features: float `[num_points, dim]`.
        labels: int `[num_points]`, class indices.
        class_names: name of each class index, for the legend.
        seed: seed of the subsample and of t-SNE.
        max_points: a random subsample of this many points is embedded when there are
            more.
        title: axis title.

    Returns:
        A `matplotlib.figure.Figure` of `TSNE_INCHES` at `DPI`.
    """
    features = np.asarray(features)
    labels = np.asarray(labels).reshape(-1)
    if len(features) != len(labels):
        raise ValueError(f"Got {len(features)} feature vectors but {len(labels)} labels; pass one label per vector.")
    if len(features) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), max_points, replace=False))
        features, labels = features[keep], labels[keep]
        title = f"{title} ({max_points} random points)"
    embedding = tsne_embedding(features, seed=seed)

    figure = _figure(TSNE_INCHES)
    axis = figure.subplots()
    classes = np.unique(labels)
    # Qualitative colour maps keep up to 20 classes apart; more classes get a gradient.
    if len(classes) <= 10:
        colormap = "tab10"
    elif len(classes) <= 20:
        colormap = "tab20"
    else:
        colormap = "turbo"
    from matplotlib import colormaps

    colors = colormaps[colormap].resampled(max(len(classes), 2))
    for index, label in enumerate(classes):
        points = embedding[labels == label]
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        axis.scatter(points[:, 0], points[:, 1], s=8, color=colors(index), label=name)
    if len(classes) <= 20:
        axis.legend(fontsize=7, markerscale=2, loc="best")
    axis.set(title=title, xticks=[], yticks=[])
    figure.tight_layout()
    return figure


def extract_test_features(backbone, splits, *, image_size: int, batch_size: int = 256):
    """Returns `(features, labels)` of the test split: float32 `[num_test, dim]`, int64 `[num_test]`."""
    batches = augment.eval_dataset(
        splits.test, image_size=image_size, mean=splits.mean, std=splits.std, batch_size=batch_size
    )
    return evaluation.extract_features(backbone, batches)


def write_run_plots(model_dir: str, backbone, splits, config) -> dict[str, str]:
    """Writes the PNGs of a run into `MODEL_DIR/plots/`, or logs why it skips them.

    Reads `history.csv` and `results.json` (when present) from `model_dir`.

    Args:
        model_dir: the run directory.
        backbone: the trained backbone, mapping normalized images to features.
        splits: the run's `mixco_tf.data.DatasetSplits`.
        config: the run's `mixco_tf.config.Config`.

    Returns:
        Plot name -> path of each PNG written; empty when matplotlib is missing.
    """
    if not matplotlib_available():
        logger.info(
            "matplotlib is not installed, so the run's plots are skipped. Install it with "
            "pip install 'mixco-tf[notebook]' to get them in %s.",
            os.path.join(model_dir, PLOTS_DIR),
        )
        return {}
    plots_dir = os.path.join(model_dir, PLOTS_DIR)
    os.makedirs(plots_dir, exist_ok=True)
    history_path = os.path.join(model_dir, "history.csv")
    history = read_history(history_path) if os.path.isfile(history_path) else {}
    results_path = os.path.join(model_dir, "results.json")
    results = None
    if os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as stream:
            results = json.load(stream)

    figures = {}
    if history:
        figures["loss_curves"] = loss_curves_figure(history)
        figures["accuracy"] = accuracy_figure(history, results)
    else:
        logger.warning("No epochs in %s, so the loss and accuracy plots are skipped.", history_path)
    features, labels = extract_test_features(
        backbone, splits, image_size=config.image_size, batch_size=config.eval_batch_size
    )
    figures["tsne"] = tsne_figure(
        features,
        labels,
        splits.class_names,
        seed=config.seed,
        title=f"t-SNE of the {splits.name} test features",
    )

    paths = {}
    for name, figure in figures.items():
        paths[name] = os.path.join(plots_dir, f"{name}.png")
        figure.savefig(paths[name], dpi=DPI)
    paths["preview"] = preview.write_preview(config, os.path.join(plots_dir, "preview.png"), splits=splits)
    logger.info("Wrote plots %s to %s", sorted(paths), plots_dir)
    return paths
