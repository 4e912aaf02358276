"""Evaluation protocols for a frozen backbone: linear probe, few-shot linear probe, k-NN.

Every protocol works on cached features. `extract_features` runs the backbone once over
a dataset, and the protocols then train or look up on the NumPy arrays it returns:

- `linear_probe`: one Dense layer on standardized features, trained with `model.fit`,
  reporting top-1 and top-5 accuracy on the test features.
- `few_shot_linear`: the same probe trained on `shots` labelled examples per class,
  averaged over several fixed random draws.
- `knn_top1`: weighted k-nearest-neighbour vote with cosine similarity (k = 200,
  temperature 0.1 by default, the monitor of InstDisc and MoCo), also measured during
  pretraining by `mixco_tf.callbacks.KNNMonitor`.

`evaluate_backbone` (a Keras backbone) and `evaluate_saved_model` (an exported
SavedModel) run all three on a dataset's splits.
"""

import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from mixco_tf import augment

logger = logging.getLogger(__name__)

PROTOCOLS = ("linear", "5shot", "knn")

# Weighted k-NN settings of InstDisc (Wu et al., 2018), which MoCo's monitor reuses.
KNN_K = 200
KNN_TEMPERATURE = 0.1

# Memory budget of one chunk of the test-by-train similarity matrix, in float32 entries
# (2**26 entries = 256 MiB), so k-NN over 100k training features stays bounded.
_KNN_CHUNK_ENTRIES = 2**26

# Test features per forward pass of a trained linear probe.
_PREDICT_BATCH = 8192


def extract_features(
    feature_fn: Callable[[tf.Tensor], Any], dataset: Iterable
) -> tuple[np.ndarray, np.ndarray]:
    """Runs a frozen feature extractor over a dataset and collects the results.

    Args:
        feature_fn: maps a batch of images to features. A Keras layer or model (for
            example a backbone or a `keras.layers.TFSMLayer`) is called with
            `training=False`. Any other callable is called as is.
            It returns float `[batch, dim]`, or a dict whose `"features"` entry is that
            tensor. A SavedModel signature takes keyword inputs, so wrap it first:
            `lambda images: signature(images=images)`.
        dataset: iterable of `(images, labels)` batches, labels `[batch]` integers. The
            images are whatever `feature_fn` expects.

    Returns:
        `(features, labels)`: float32 `[num_examples, dim]` and int64 `[num_examples]`.

    Raises:
        ValueError: if the dataset is empty, or `feature_fn` returns a dict without
            `"features"` or a tensor that is not `[batch, dim]`.
    """
    if isinstance(feature_fn, keras.layers.Layer):
        layer = feature_fn
        # Eager calls: a tf.function per extraction would be traced again for every
        # backbone and split, and the per-batch ops are large enough to gain nothing.
        def call(images):
            return layer(images, training=False)

    else:
        call = feature_fn

    feature_batches, label_batches = [], []
    for images, labels in dataset:
        features = call(images)
        if isinstance(features, Mapping):
            if "features" not in features:
                raise ValueError(
                    f"feature_fn returned a dict with keys {sorted(features)}, expected a "
                    "'features' entry. Pass a function that returns the features tensor."
                )
            features = features["features"]
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2:
            raise ValueError(
                f"feature_fn returned features of shape {features.shape}, expected "
                "[batch, dim]. Pool or flatten the backbone output first."
            )
        feature_batches.append(features)
        label_batches.append(np.asarray(labels, dtype=np.int64).reshape(-1))

    if not feature_batches:
        raise ValueError("The dataset yielded no batches, so there are no features to extract.")
    features = np.concatenate(feature_batches)
    non_finite_rows = int(np.sum(~np.all(np.isfinite(features), axis=1)))
    if non_finite_rows:
        logger.warning(
            "%d of %d feature vectors contain NaN or infinite values, so the accuracies will be "
            "near chance. The backbone's weights have probably diverged.",
            non_finite_rows,
            len(features),
        )
    return features, np.concatenate(label_batches)


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 0.01,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Trains a linear classifier on frozen features and measures test accuracy.

    The classifier is `keras.Sequential([Normalization, Dense(num_classes)])`. The
    Normalization layer stores the training features' per-dimension mean and variance. A
    dimension that is constant on the training set gets variance 1, so it maps to 0 on
    training data instead of dividing test values by ~0. Dense weights start from
    N(0, 0.01) and the bias from 0, as in the MixCo linear protocol. Training uses AdamW
    (bias excluded from weight decay) with a cosine-decayed learning rate and softmax
    cross-entropy.

    The defaults were chosen on the 1,437 digits training images. Measured against
    scikit-learn's `LogisticRegression(max_iter=2000)` on the same standardized features
    (360 test images), top-1 was 0.3 points lower on the 64 raw pixels and 2.2 points
    lower on 128 features of a random Conv2D-BatchNorm-ReLU-pool network. Each probe
    took 2 to 4 s on 2 shared CPU cores with tensorflow-cpu 2.21. Doubling the epochs or
    tripling the learning rate alone changed top-1 by under one point. Both together, or
    10x the learning rate with 200 epochs, gained up to 1.7 points (6 of 360 test images)
    on the random features. `tests/test_evaluation.py` checks the pixel case.

    Calls `keras.utils.set_random_seed(seed)`, which reseeds Python, NumPy and
    TensorFlow's global generators, so results repeat for a fixed seed.

    Args:
        train_features: float `[num_train, dim]`.
        train_labels: integers `[num_train]` in `[0, num_classes)`.
        test_features: float `[num_test, dim]`.
        test_labels: integers `[num_test]` in `[0, num_classes)`.
        num_classes: number of classes, at least 2.
        epochs: passes over the training features.
        batch_size: features per optimizer step.
        learning_rate: initial AdamW learning rate, decayed to 0 with a cosine.
        weight_decay: decoupled weight decay of AdamW on the kernel.
        seed: seed of the weight initialization and the shuffling.

    Returns:
        `{"top1": float, "top5": float}`, fractions in [0, 1]. With fewer than 5 classes,
        top-5 counts the top `num_classes` predictions and is 1.0.

    Raises:
        ValueError: on mismatched shapes, labels outside `[0, num_classes)` or
            non-positive hyperparameters.
    """
    train_features, train_labels = _check_split(train_features, train_labels, num_classes, "train")
    test_features, test_labels = _check_split(test_features, test_labels, num_classes, "test")
    _check_same_dim(train_features, test_features)
    _check_positive(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")

    keras.utils.set_random_seed(seed)
    num_train, dim = train_features.shape
    steps_per_epoch = math.ceil(num_train / batch_size)

    variance = train_features.var(axis=0)
    variance = np.where(variance > 1e-12, variance, 1.0)
    model = keras.Sequential(
        [
            keras.Input(shape=(dim,)),
            keras.layers.Normalization(mean=train_features.mean(axis=0), variance=variance),
            keras.layers.Dense(
                num_classes,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
                bias_initializer="zeros",
            ),
        ]
    )
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps_per_epoch)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    # One repeated dataset for all epochs, because fit(x=array) builds a new iterator
    # every epoch, which made the digits probe about twice as slow on 2 CPU cores.
    train_batches = (
        tf.data.Dataset.from_tensor_slices((train_features, train_labels))
        .shuffle(num_train, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )
    started = time.time()
    # shuffle=False because the dataset above already reshuffles every epoch.
    model.fit(train_batches, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False, verbose=0)
    # Direct calls instead of model.predict: predict traces a new tf.function for every
    # probe, which few_shot_linear would repeat per draw.
    logits = np.concatenate(
        [
            keras.ops.convert_to_numpy(model(test_features[start : start + _PREDICT_BATCH], training=False))
            for start in range(0, len(test_features), _PREDICT_BATCH)
        ]
    )
    top1, top5 = _top_k_accuracies(logits, test_labels)
    logger.info(
        "Linear probe on %d x %d features, %d classes, %d epochs: top-1 %.4f, top-5 %.4f (%.1f s)",
        num_train, dim, num_classes, epochs, top1, top5, time.time() - started,
    )
    return {"top1": top1, "top5": top5}


def sample_few_shot_indices(
    labels: np.ndarray, num_classes: int, shots: int, rng: np.random.Generator
) -> np.ndarray:
    """Draws `shots` distinct examples of every class, without replacement.

    Args:
        labels: integers `[num_examples]` in `[0, num_classes)`.
        num_classes: number of classes; every class must have `shots` examples.
        shots: examples drawn per class, at least 1.
        rng: NumPy generator that makes the draw.

    Returns:
        int64 `[num_classes * shots]` indices into `labels`, grouped by class in
        ascending class order.

    Raises:
        ValueError: if `shots < 1` or a class has fewer than `shots` examples.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}.")
    labels = np.asarray(labels)
    chosen = []
    for label in range(num_classes):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < shots:
            raise ValueError(
                f"Class {label} has {len(candidates)} training examples, fewer than "
                f"shots={shots}. Lower shots or use a larger training split."
            )
        chosen.append(rng.choice(candidates, size=shots, replace=False))
    return np.concatenate(chosen).astype(np.int64)


def few_shot_linear(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    shots: int = 5,
    draws: int = 5,
    seed: int = 0,
    **probe_kwargs,
) -> float:
    """Measures the mean top-1 of linear probes trained on a few labels per class.

    One `np.random.default_rng(seed)` generator makes the draws in order, so draw `i`
    is the same for any `draws > i`. Draw `i` trains `linear_probe` with seed `seed + i`
    on its `shots * num_classes` examples and is tested on all test features.

    Args:
        train_features: float `[num_train, dim]`, the pool the labelled examples come from.
        train_labels: integers `[num_train]` in `[0, num_classes)`.
        test_features: float `[num_test, dim]`.
        test_labels: integers `[num_test]` in `[0, num_classes)`.
        num_classes: number of classes.
        shots: labelled examples per class in each draw.
        draws: number of independent draws averaged.
        seed: seed of the draws and of each probe.
        **probe_kwargs: `epochs`, `batch_size`, `learning_rate`, `weight_decay` of
            `linear_probe`.

    Returns:
        Mean test top-1 over the draws, a fraction in [0, 1].

    Raises:
        ValueError: if `draws < 1` or a class has fewer than `shots` training examples.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}.")
    train_features, train_labels = _check_split(train_features, train_labels, num_classes, "train")

    rng = np.random.default_rng(seed)
    top1s = []
    for draw in range(draws):
        indices = sample_few_shot_indices(train_labels, num_classes, shots, rng)
        result = linear_probe(
            train_features[indices],
            train_labels[indices],
            test_features,
            test_labels,
            num_classes,
            seed=seed + draw,
            **probe_kwargs,
        )
        top1s.append(result["top1"])
    logger.info("%d-shot linear probe over %d draws: top-1 %s", shots, draws, np.round(top1s, 4).tolist())
    return float(np.mean(top1s))


def knn_top1(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    k: int = KNN_K,
    temperature: Optional[float] = KNN_TEMPERATURE,
) -> float:
    """Measures the top-1 accuracy of a k-nearest-neighbour vote with cosine similarity.

    Features are L2-normalized, so the similarity `s` is the cosine. Each of the `k`
    most similar training features votes for its label with weight `exp(s / temperature)`,
    or 1 when `temperature` is None (majority vote). The class with the largest total
    wins, and ties go to the smaller label. The test set is processed in chunks so the
    similarity matrix never exceeds 256 MiB.

    Args:
        train_features: float `[num_train, dim]`.
        train_labels: integers `[num_train]` in `[0, num_classes)`.
        test_features: float `[num_test, dim]`.
        test_labels: integers `[num_test]` in `[0, num_classes)`.
        num_classes: number of classes.
        k: neighbours per test example, in `[1, num_train]`.
        temperature: softness of the similarity weights, > 0, or None for equal votes.

    Returns:
        Test top-1 accuracy, a fraction in [0, 1].

    Raises:
        ValueError: if `k` is outside `[1, num_train]`, `temperature <= 0`, or shapes or
            labels are invalid.
    """
    train_features, train_labels = _check_split(train_features, train_labels, num_classes, "train")
    test_features, test_labels = _check_split(test_features, test_labels, num_classes, "test")
    _check_same_dim(train_features, test_features)
    num_train = len(train_features)
    if not 1 <= k <= num_train:
        raise ValueError(f"k must be in [1, {num_train}] (the number of training features), got {k}.")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0 or None for a majority vote, got {temperature}.")

    train_normalized = tf.math.l2_normalize(tf.constant(train_features), axis=1)
    test_normalized = tf.math.l2_normalize(tf.constant(test_features), axis=1)
    chunk_size = max(1, _KNN_CHUNK_ENTRIES // num_train)

    correct = 0
    for start in range(0, len(test_features), chunk_size):
        similarities = tf.matmul(test_normalized[start : start + chunk_size], train_normalized, transpose_b=True)
        top_similarities, top_indices = tf.math.top_k(similarities, k=k)
        top_similarities = top_similarities.numpy().astype(np.float64)
        neighbour_labels = train_labels[top_indices.numpy()]  # [chunk, k]

        if temperature is None:
            weights = np.ones_like(top_similarities)
        else:
            # Subtracting each row's largest similarity keeps exp() finite for small
            # temperatures and leaves the winning class unchanged.
            weights = np.exp((top_similarities - top_similarities[:, :1]) / temperature)
        votes = np.zeros((len(weights), num_classes))
        np.add.at(votes, (np.arange(len(weights))[:, None], neighbour_labels), weights)
        correct += int(np.sum(votes.argmax(axis=1) == test_labels[start : start + chunk_size]))

    accuracy = correct / len(test_features)
    logger.info("k-NN (k=%d, temperature=%s) on %d train features: top-1 %.4f", k, temperature, num_train, accuracy)
    return accuracy


def evaluate_features(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    seed: int = 0,
) -> dict[str, float]:
    """Runs the requested protocols on cached features with their standard settings.

    Args:
        train_features: float `[num_train, dim]`.
        train_labels: integers `[num_train]`.
        test_features: float `[num_test, dim]`.
        test_labels: integers `[num_test]`.
        num_classes: number of classes.
        protocols: any of `"linear"` (all labels), `"5shot"` (5 labels per class, mean
            over 5 draws) and `"knn"` (k = min(200, num_train), temperature 0.1).
        seed: seed of the probes and draws.

    Returns:
        Dict with `linear_top1` and `linear_top5` for `"linear"`, `linear_5shot_top1`
        for `"5shot"` and `knn_top1` for `"knn"`, fractions in [0, 1].

    Raises:
        ValueError: on an unknown protocol name.
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"Unknown evaluation protocols {unknown}. Valid protocols: {list(PROTOCOLS)}.")

    splits = (train_features, train_labels, test_features, test_labels, num_classes)
    results = {}
    if "linear" in protocols:
        linear = linear_probe(*splits, seed=seed)
        results["linear_top1"] = linear["top1"]
        results["linear_top5"] = linear["top5"]
    if "5shot" in protocols:
        results["linear_5shot_top1"] = few_shot_linear(*splits, shots=5, draws=5, seed=seed)
    if "knn" in protocols:
        k = min(KNN_K, len(train_features))
        results["knn_top1"] = knn_top1(*splits, k=k, temperature=KNN_TEMPERATURE)
    return results


def evaluate_backbone(
    feature_fn: Callable[[tf.Tensor], Any],
    splits,
    *,
    image_size: int,
    batch_size: int = 256,
    seed: int = 0,
    protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, float]:
    """Extracts features of a dataset's splits with a backbone and runs the protocols.

    Images are resized to `image_size` and normalized with the dataset's mean and std,
    the same preprocessing as the exported serving signature.

    Args:
        feature_fn: a Keras backbone mapping normalized float32
            `[batch, image_size, image_size, 3]` to `[batch, dim]`, or any callable
            `extract_features` accepts.
        splits: a `mixco_tf.data.DatasetSplits`.
        image_size: side of the backbone's input images, in pixels.
        batch_size: images per feature-extraction batch.
        seed: seed of the probes and draws.
        protocols: protocols to run, see `evaluate_features`.

    Returns:
        Dict with `linear_top1`, `linear_top5`, `linear_5shot_top1` and `knn_top1` (the
        keys of the requested protocols), fractions in [0, 1].
    """
    features = {}
    for name, dataset in (("train", splits.train), ("test", splits.test)):
        batches = augment.eval_dataset(
            dataset, image_size=image_size, mean=splits.mean, std=splits.std, batch_size=batch_size
        )
        features[name] = extract_features(feature_fn, batches)
    return _evaluate_split_features(features, splits, protocols, seed)


def load_serving_layer(saved_model_dir: str) -> keras.layers.TFSMLayer:
    """Loads the `serving_default` signature of an exported backbone as a Keras layer.

    Args:
        saved_model_dir: a version folder written by `mixco_tf.export.export_backbone`.

    Returns:
        A `keras.layers.TFSMLayer` mapping uint8 `[batch, height, width, 3]` to
        `{"features": float32 [batch, dim]}`.

    Raises:
        ValueError: if the folder contains no readable SavedModel or it has no
            `serving_default` signature.
    """
    try:
        return keras.layers.TFSMLayer(saved_model_dir, call_endpoint="serving_default")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Failed to load the serving_default signature of the SavedModel {saved_model_dir}: {error} "
            "Pass a version folder written by mixco_tf.export.export_backbone."
        ) from error


def evaluate_saved_model(
    saved_model: "str | keras.layers.TFSMLayer",
    splits,
    *,
    batch_size: int = 256,
    seed: int = 0,
    protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, float]:
    """Evaluates an exported backbone through its `serving_default` signature.

    The signature receives the dataset's uint8 images and resizes and normalizes them
    itself, so this checks the artifact that a server would load.

    Args:
        saved_model: a version folder written by `mixco_tf.export.export_backbone`, or
            the layer `load_serving_layer` returned for one.
        splits: a `mixco_tf.data.DatasetSplits`.
        batch_size: images per batch. Datasets whose images differ in size are fed one
            image at a time, because a batch must have one height and width.
        seed: seed of the probes and draws.
        protocols: protocols to run, see `evaluate_features`.

    Returns:
        The dict of `evaluate_backbone`.

    Raises:
        ValueError: if `saved_model` is a folder that `load_serving_layer` cannot load.
    """
    layer = load_serving_layer(saved_model) if isinstance(saved_model, str) else saved_model
    features = {}
    for name, dataset in (("train", splits.train), ("test", splits.test)):
        features[name] = extract_features(layer, _batch_uint8_images(dataset, batch_size))
    return _evaluate_split_features(features, splits, protocols, seed)


def _batch_uint8_images(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    image_shape = dataset.element_spec[0].shape
    if not image_shape.is_fully_defined():
        logger.warning(
            "Images of shape %s may differ in size, so they are fed one at a time instead "
            "of in batches of %d.", image_shape, batch_size,
        )
        batch_size = 1
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _evaluate_split_features(features, splits, protocols, seed):
    (train_features, train_labels), (test_features, test_labels) = features["train"], features["test"]
    logger.info(
        "Evaluating %s features: %d train and %d test examples of dimension %d",
        splits.name, len(train_features), len(test_features), train_features.shape[1],
    )
    return evaluate_features(
        train_features, train_labels, test_features, test_labels, splits.num_classes,
        protocols=protocols, seed=seed,
    )


def _check_split(features, labels, num_classes, split):
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"{split}_features must be a non-empty [num_examples, dim] array, got shape {features.shape}.")
    if labels.shape != (len(features),):
        raise ValueError(
            f"{split}_labels must have shape [{len(features)}] to match {split}_features, got {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{split}_labels must be integers, got dtype {labels.dtype}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{split}_labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]. "
            "Check num_classes."
        )
    return features, labels.astype(np.int64)


def _check_same_dim(train_features, test_features):
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have dimension {train_features.shape[1]} but test_features have "
            f"{test_features.shape[1]}. Extract both with the same backbone."
        )


def _check_positive(**values):
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}.")


def _top_k_accuracies(logits, labels):
    k = min(5, logits.shape[1])
    top1 = float(np.mean(logits.argmax(axis=1) == labels))
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top5 = float(np.mean(np.any(top_k == labels[:, None], axis=1)))
    return top1, top5
