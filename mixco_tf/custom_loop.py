"""A `strategy.run` training loop for strategies that `model.fit` cannot drive.

Keras 3.15's `model.fit` fails under `MultiWorkerMirroredStrategy` with more than one
worker: its symbolic build reduces the first batch across workers, and the reduction of
the step outputs fails after it. This loop runs the model's own `train_step` through
`strategy.run` instead and calls the same Keras callbacks as `fit`, so checkpoints,
logs and guards behave alike.

Every worker runs exactly `steps_per_epoch` steps per epoch on a dataset batched with
`drop_remainder=True`, so no worker waits in a collective for a batch that another
worker does not have.
"""

import logging

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)


def fit_with_strategy_run(
    model,
    strategy,
    dataset_fn,
    *,
    epochs,
    steps_per_epoch,
    per_replica_batch_size,
    initial_epoch=0,
    callbacks=(),
    verbose=2,
    jit_compile=False,
):
    """Trains `model` like `model.fit`, one `strategy.run(model.train_step)` per step.

    Args:
        model: a compiled Keras model built under `strategy.scope()`, whose metrics are
            `model.metrics` and whose `train_step` takes one batch.
        strategy: the `tf.distribute.Strategy` the model was built under.
        dataset_fn: `fn(tf.distribute.InputContext) -> tf.data.Dataset` of per-replica
            batches with a static batch size; see
            `tf.distribute.Strategy.distribute_datasets_from_function`. Each epoch must
            yield at least `steps_per_epoch` batches on every replica.
        epochs: index of the last epoch plus one, as in `fit`.
        steps_per_epoch: steps of each epoch, the same on every worker.
        per_replica_batch_size: batch size of each replica's batches. The distributed
            iterator of a multi-worker strategy reports an unknown batch dimension, so
            the loop restores it for the train step.
        initial_epoch: epoch to start from (a resumed run's completed epochs).
        callbacks: Keras callbacks; they receive the same calls as in `fit`.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.
        jit_compile: compile the step with XLA (one replica only, as in `fit`).

    Returns:
        The `keras.callbacks.History` of the epochs trained.
    """
    distributed = strategy.distribute_datasets_from_function(dataset_fn)

    def replica_step(batch):
        batch = tf.nest.map_structure(
            lambda t: tf.ensure_shape(t, [per_replica_batch_size, *t.shape[1:]]), batch
        )
        return model.train_step(batch)

    # The iterator stays outside the XLA function: XLA cannot compile its ops.
    @tf.function(jit_compile=jit_compile)
    def run_step(batch):
        strategy.run(replica_step, args=(batch,))

    @tf.function
    def train_step(iterator):
        run_step(next(iterator))
        # In cross-replica context a metric's result reads its variables summed over
        # all replicas, so these are means over the global batch.
        return {metric.name: metric.result() for metric in model.metrics}

    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
    )
    history = next(c for c in callback_list.callbacks if isinstance(c, keras.callbacks.History))
    logger.info(
        "Training with a strategy.run loop: %d replicas, %d steps per epoch, epochs %d to %d.",
        strategy.num_replicas_in_sync,
        steps_per_epoch,
        initial_epoch + 1,
        epochs,
    )
    model.stop_training = False
    logs = {}
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        for metric in model.metrics:
            metric.reset_state()
        callback_list.on_epoch_begin(epoch)
        iterator = iter(distributed)
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            logs = {name: float(value) for name, value in train_step(iterator).items()}
            callback_list.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        callback_list.on_epoch_end(epoch, dict(logs))
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return history
