"""Keras callbacks that measure representation quality during pretraining."""

import logging
import math
import time

import keras

from mixco_tf import augment, evaluation

logger = logging.getLogger(__name__)


class KNNMonitor(keras.callbacks.Callback):
    """Writes the weighted k-NN top-1 of the backbone into the epoch logs every N epochs.

    At the end of every `every`-th epoch and of the last epoch, the backbone (in
    inference mode) embeds the memory and query images, and `evaluation.knn_top1`
    classifies each query by its `k` nearest memory features. The accuracy goes into
    `logs["knn_top1"]`, so callbacks placed after this one (`CSVLogger`, `TensorBoard`,
    `History`) record it. Epochs without a measurement get NaN, which keeps the CSV
    columns the same in every row; plots skip NaN points.

    Args:
        backbone: Keras model mapping normalized float32 `[batch, image_size, image_size, 3]`
            to `[batch, dim]`.
        splits: a `mixco_tf.data.DatasetSplits`. Its train split is the memory bank and
            its test split the queries, unless `memory` and `queries` are given.
        image_size: side of the backbone's input images, in pixels.
        every: measure every `every` epochs, at least 1.
        k: neighbours per query.
        temperature: softness of the vote weights `exp(similarity / temperature)`.
        batch_size: images per feature-extraction batch.
        memory: optional dataset of `(uint8 image, label)` replacing the train split.
        queries: optional dataset of `(uint8 image, label)` replacing the test split.
        log_key: key of the accuracy in the epoch logs.

    Raises:
        ValueError: if `every < 1`.
    """

    def __init__(
        self,
        backbone,
        splits,
        *,
        image_size,
        every=1,
        k=evaluation.KNN_K,
        temperature=evaluation.KNN_TEMPERATURE,
        batch_size=256,
        memory=None,
        queries=None,
        log_key="knn_top1",
    ):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer number of epochs, got {every!r}.")
        self.backbone = backbone
        self.num_classes = splits.num_classes
        self.every = every
        self.k = k
        self.temperature = temperature
        self.log_key = log_key

        def batches(dataset):
            return augment.eval_dataset(
                dataset, image_size=image_size, mean=splits.mean, std=splits.std, batch_size=batch_size
            ).cache()

        self._memory = batches(splits.train if memory is None else memory)
        self._queries = batches(splits.test if queries is None else queries)

    def should_measure(self, epoch):
        """Returns whether the 0-based `epoch` gets a measurement."""
        last = self.params.get("epochs") if self.params else None
        return (epoch + 1) % self.every == 0 or epoch + 1 == last

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if not self.should_measure(epoch):
            logs[self.log_key] = math.nan
            return
        started = time.time()
        memory_features, memory_labels = evaluation.extract_features(self.backbone, self._memory)
        query_features, query_labels = evaluation.extract_features(self.backbone, self._queries)
        accuracy = evaluation.knn_top1(
            memory_features,
            memory_labels,
            query_features,
            query_labels,
            self.num_classes,
            k=min(self.k, len(memory_features)),
            temperature=self.temperature,
        )
        logs[self.log_key] = accuracy
        logger.info("Epoch %d: %s %.4f (%.1f s)", epoch + 1, self.log_key, accuracy, time.time() - started)
