"""What MixCo sees: original images, their two augmented views and the mixed images.

    python -m mixco_tf.preview --dataset=digits --output=preview.png
    python -m mixco_tf.preview --config=configs/digits.yaml --num_pairs=6 --output=preview.png

Each row of the grid is one mixed pair `(i, i + num_pairs)` of a batch of
`2 * num_pairs` training images: the original of image i, its query view and its key
view, the same three for image `i + num_pairs`, and the mixed image
`lam * query_i + (1 - lam) * query_{i + num_pairs}` with its `lam`. The views come from
`mixco_tf.augment.two_view_dataset` and the mixing from
`mixco_tf.models.mixing.mix_halves`, the functions that training runs, with the
augmentation and image size of the config.

`preview_figure` returns the grid as a matplotlib figure for notebooks. matplotlib is
an optional dependency (`pip install "mixco-tf[notebook]"`); `PreviewSampler` works
without it.
"""

import dataclasses
import os
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from mixco_tf import augment, figures
from mixco_tf.models.mixing import mix_halves
from mixco_tf.preprocess import denormalize

# Inches per grid cell and resolution of saved previews.
CELL_INCHES = 1.2
TITLE_INCHES = 0.5
DPI = 100
COLUMN_TITLES = (
    "original i",
    "query view i",
    "key view i",
    "original j",
    "query view j",
    "key view j",
    "mixed i and j",
)


@dataclasses.dataclass(frozen=True)
class PreviewBatch:
    """One batch of `2 * num_pairs` images as MixCo's train step receives it, for display.

    Attributes:
        originals: uint8 `[2 * num_pairs, height, width, 3]`, the images before
            augmentation at their native size.
        view_q: float32 `[2 * num_pairs, image_size, image_size, 3]` in [0, 1], the query
            views, denormalized.
        view_k: the key views, like `view_q`.
        mixed: float32 `[num_pairs, image_size, image_size, 3]` in [0, 1],
            `lam[i] * view_q[i] + (1 - lam[i]) * view_q[i + num_pairs]`.
        lam: float32 `[num_pairs]`, the mixing weights.
    """

    originals: np.ndarray
    view_q: np.ndarray
    view_k: np.ndarray
    mixed: np.ndarray
    lam: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.lam)


class PreviewSampler:
    """Draws preview batches of fixed training images with the training pipeline.

    The two-view pipeline is built once. Each `sample` call iterates it again, so it
    draws new views of the same images, and mixes them with its own seed. Nothing is
    drawn from a model's random state, so sampling during training leaves the run's
    random numbers unchanged.

    Args:
        splits: a `mixco_tf.data.DatasetSplits`.
        image_size: side of the square views, in pixels.
        augment_config: a `mixco_tf.AugmentConfig`.
        num_pairs: mixed pairs per batch; the batch has `2 * num_pairs` images.
        seed: seed of the views.
        start: index of the first training image shown.

    Raises:
        ValueError: if `num_pairs` or `start` is invalid, or the training split has
            fewer than `start + 2 * num_pairs` images.
    """

    def __init__(self, splits, *, image_size, augment_config, num_pairs=4, seed=0, start=0):
        if not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"Invalid num_pairs={num_pairs!r}: it must be a positive integer.")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"Invalid start={start!r}: it must be a non-negative image index.")
        batch_size = 2 * num_pairs
        images = splits.train.skip(start).take(batch_size)
        self.originals = np.stack([image.numpy() for image, *_ in images])
        if len(self.originals) < batch_size:
            raise ValueError(
                f"The training split of {splits.name} has {splits.num_train} images, fewer than "
                f"start={start} + 2 * num_pairs={batch_size}. Lower start or num_pairs."
            )
        self.mean, self.std = splits.mean, splits.std
        self._views = augment.two_view_dataset(
            images,
            image_size=image_size,
            mean=splits.mean,
            std=splits.std,
            batch_size=batch_size,
            config=augment_config,
            seed=seed,
            shuffle=False,
            cache=False,
        )

    def sample(self, mix_seed=0) -> PreviewBatch:
        """Draws new views of the images and mixes the query views with `mix_seed`."""
        view_q, view_k = next(iter(self._views))
        mixed, lam = mix_halves(view_q, seed=mix_seed)
        return PreviewBatch(
            originals=self.originals,
            view_q=denormalize(view_q, self.mean, self.std).numpy(),
            view_k=denormalize(view_k, self.mean, self.std).numpy(),
            mixed=denormalize(mixed, self.mean, self.std).numpy(),
            lam=lam.numpy(),
        )


def figure_size_pixels(num_pairs: int) -> tuple[int, int]:
    """Returns `(width, height)` in pixels of a saved preview with `num_pairs` rows."""
    width = CELL_INCHES * len(COLUMN_TITLES)
    height = CELL_INCHES * num_pairs + TITLE_INCHES
    return round(width * DPI), round(height * DPI)


def batch_figure(batch: PreviewBatch, title: Optional[str] = None):
    """Draws a `PreviewBatch` as a grid, one mixed pair per row.

    Returns:
        A `matplotlib.figure.Figure` of `figure_size_pixels(batch.num_pairs)` at `DPI`.
    """
    num_pairs = batch.num_pairs
    width, height = figure_size_pixels(num_pairs)
    figure = figures.new_figure((width / DPI, height / DPI), DPI)
    axes = figure.subplots(num_pairs, len(COLUMN_TITLES), squeeze=False)
    for row in range(num_pairs):
        partner = row + num_pairs
        cells = (
            batch.originals[row],
            batch.view_q[row],
            batch.view_k[row],
            batch.originals[partner],
            batch.view_q[partner],
            batch.view_k[partner],
            batch.mixed[row],
        )
        for column, image in enumerate(cells):
            axis = axes[row, column]
            axis.imshow(image, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(COLUMN_TITLES[column], fontsize=8)
        lam = float(batch.lam[row])
        axes[row, 0].set_ylabel(f"i={row}, j={partner}", fontsize=8)
        axes[row, -1].set_xlabel(f"lam = {lam:.2f}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.04, top=1 - TITLE_INCHES / (height / DPI), wspace=0.1, hspace=0.35)
    return figure


def preview_figure(splits, *, image_size, augment_config, num_pairs=4, seed=0, start=0):
    """Draws `2 * num_pairs` training images, their views and mixed pairs as a figure.

    Args:
        splits: a `mixco_tf.data.DatasetSplits`, e.g. `mixco_tf.load_dataset("digits")`.
        image_size: side of the square views, in pixels.
        augment_config: a `mixco_tf.AugmentConfig`.
        num_pairs: rows of the grid, one mixed pair each.
        seed: seed of the views and of `lam`.
        start: index of the first training image shown.

    Returns:
        A `matplotlib.figure.Figure`; a notebook displays it, `figure.savefig(path)`
        writes it.
    """
    sampler = PreviewSampler(
        splits,
        image_size=image_size,
        augment_config=augment_config,
        num_pairs=num_pairs,
        seed=seed,
        start=start,
    )
    title = f"{splits.name}: {image_size}x{image_size} views, training images {start} to {start + 2 * num_pairs - 1}"
    return batch_figure(sampler.sample(mix_seed=seed), title=title)


def write_preview(config, output, *, num_pairs=4, start=0, splits=None):
    """Writes the preview of a `mixco_tf.config.Config` to the PNG file `output`.

    Uses the config's dataset, image size, augmentation and seed. Pass `splits` when
    the dataset is already loaded.

    Sets TensorFlow's global seed to `config.seed`, as `run_experiment` does before
    training. TensorFlow combines the global seed with the pipeline's own seeds, so
    without this the same config would draw other views in another process.

    Returns:
        The path written.
    """
    # Imported here because mixco_tf.experiment imports this module.
    from mixco_tf.data import load_dataset
    from mixco_tf.experiment import augment_config

    if splits is None:
        splits = load_dataset(config.dataset, config.data_dir)
    tf.random.set_seed(config.seed)
    figure = preview_figure(
        splits,
        image_size=config.image_size,
        augment_config=augment_config(config),
        num_pairs=num_pairs,
        seed=config.seed,
        start=start,
    )
    directory = os.path.dirname(output)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(output, dpi=DPI)
    return output


def define_flags():
    """Defines the flags of this command; called by `run()`.

    They are not defined at import time because `dataset`, `config`, `seed` and
    `data_dir` are also flags of `mixco_tf.train`, and absl rejects a flag name defined
    twice in one process.
    """
    flags.DEFINE_string("output", None, "PNG file to write the preview grid to.", required=True)
    flags.DEFINE_string("config", None, "YAML config whose image_size, augmentation and seed are used.")
    flags.DEFINE_string("dataset", None, "Registered dataset to preview. Default: the config's (digits).")
    flags.DEFINE_string("data_dir", None, "Folder where the dataset loader finds or downloads its files.")
    flags.DEFINE_integer("num_pairs", 4, "Rows of the grid, one mixed pair of training images each.", lower_bound=1)
    flags.DEFINE_integer("start", 0, "Index of the first training image shown.", lower_bound=0)
    flags.DEFINE_integer("seed", None, "Seed of the views and of lam. Default: the config's seed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}. Options are flags: --key=value.")
    from mixco_tf import config as config_lib
    from mixco_tf import plots

    if not plots.matplotlib_available():
        logging.error("The preview needs matplotlib, which is not installed. Install it with pip install 'mixco-tf[notebook]'.")
        raise SystemExit(2)
    values = config_lib.load_yaml(flags.FLAGS.config) if flags.FLAGS.config else {}
    for name in ("dataset", "data_dir", "seed"):
        if flags.FLAGS[name].value is not None:
            values[name] = flags.FLAGS[name].value
    try:
        config = config_lib.from_dict(values, source=flags.FLAGS.config or "flags").validate()
        path = write_preview(config, flags.FLAGS.output, num_pairs=flags.FLAGS.num_pairs, start=flags.FLAGS.start)
    except ValueError as error:
        logging.error("%s", error)
        raise SystemExit(2) from error
    logging.info("Wrote the preview of %s to %s", config.dataset, path)


def run():
    """Console-script entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
