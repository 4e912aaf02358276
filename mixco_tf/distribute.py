"""Strategy selection and the cross-replica helpers of MixCo's train step.

Strategies (`config.strategy`):

- `one_device`: TensorFlow's default strategy, one replica on the first GPU, else the CPU.
- `mirrored`: `tf.distribute.MirroredStrategy` over every local GPU, or over the
  logical CPU devices of `cpu_devices` when there is no GPU.
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy`; the cluster comes from
  the `TF_CONFIG` environment variable, and without it the process is a single worker.
- `tpu`: `tf.distribute.TPUStrategy` on the TPU that `TPUClusterResolver()` finds
  (a TPU VM's local TPU, or the one named by the `TPU_NAME` environment variable).
- `auto`: `mirrored` when more than one GPU, or more than one logical CPU device, is
  visible; otherwise `one_device`.

`batch_size` is always the global batch: each of the R replicas trains on
`batch_size / R` images per step.
"""

import hashlib
import logging

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


class StrategyError(ValueError):
    """Raised when the requested strategy cannot be created on this machine."""


def configure_cpu_devices(num_devices):
    """Splits the host CPU into `num_devices` logical devices `/cpu:0` ... `/cpu:N-1`.

    Logical CPU devices let `MirroredStrategy` run several replicas without GPUs, for
    trying out and testing distributed training. TensorFlow accepts this only before its
    runtime starts, i.e. before the process runs any TensorFlow op.

    Args:
        num_devices: number of logical devices; 0 or 1 leaves the CPU as it is.

    Raises:
        StrategyError: if the TensorFlow runtime has already started with another split.
    """
    if num_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError as error:
        raise StrategyError(
            f"Cannot split the CPU into cpu_devices={num_devices} logical devices: TensorFlow "
            f"has already started in this process ({error}). Set cpu_devices in a fresh "
            "process, before any TensorFlow op runs."
        ) from error
    logger.info("Split the host CPU into %d logical devices.", num_devices)


def create_strategy(name, cpu_devices=0):
    """Creates the `tf.distribute.Strategy` called `name` (see the module docstring).

    Call it at program start, before any other TensorFlow op: `cpu_devices` and
    `MultiWorkerMirroredStrategy` both need a runtime that has not started yet.

    Args:
        name: one of `STRATEGIES`.
        cpu_devices: logical CPU devices to create first; 0 keeps one.

    Returns:
        The strategy. `one_device` returns TensorFlow's default strategy.

    Raises:
        StrategyError: for an unknown name, or a strategy this machine cannot run.
    """
    if name not in STRATEGIES:
        raise StrategyError(f"Invalid strategy={name!r}: expected one of {list(STRATEGIES)}.")
    if name == "tpu":
        return _create_tpu_strategy()
    if name == "multi_worker":
        # Created before configure_cpu_devices touches the runtime; the strategy has to
        # configure the collective ops of a runtime that has not started.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        logger.info(
            "MultiWorkerMirroredStrategy: %d replicas in sync, this process is %s.",
            strategy.num_replicas_in_sync,
            describe_task(strategy),
        )
        return strategy

    configure_cpu_devices(cpu_devices)
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 or (not gpus and len(cpus) > 1) else "one_device"
    if name == "one_device":
        logger.info("One device: %s.", gpus[0].name if gpus else cpus[0].name)
        return tf.distribute.get_strategy()

    devices = [device.name for device in (gpus or cpus)]
    if len(devices) == 1:
        logger.warning(
            "strategy=mirrored found a single device (%s), so it trains one replica. Set "
            "cpu_devices=N to split the CPU into N replicas when there is no GPU.",
            devices[0],
        )
    strategy = tf.distribute.MirroredStrategy(devices)
    logger.info("MirroredStrategy over %d devices: %s.", len(devices), ", ".join(devices))
    return strategy


def _create_tpu_strategy():
    # NOTE: no TPU was available where this was written, so this path is untested.
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise StrategyError(
            f"strategy='tpu' found no TPU ({error}). Run on a TPU VM, or set TPU_NAME to "
            "the TPU's name or grpc:// address."
        ) from error
    strategy = tf.distribute.TPUStrategy(resolver)
    logger.info("TPUStrategy: %d replicas.", strategy.num_replicas_in_sync)
    return strategy


def strategy_name(strategy):
    """Returns the `STRATEGIES` name of a created strategy, with `auto` resolved."""
    if is_multi_worker(strategy):
        return "multi_worker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    return "one_device"


def is_multi_worker(strategy):
    """Returns whether `strategy` is a `MultiWorkerMirroredStrategy` (one worker or more)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Returns whether this process writes the run's files: the chief, or worker 0 without one.

    Every strategy other than `MultiWorkerMirroredStrategy` has a single process, which
    is the chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy) or resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def describe_task(strategy):
    """Returns `"worker 1 of 2"`-style text for logs; `"the only worker"` without TF_CONFIG."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "the only worker"
    cluster = resolver.cluster_spec().as_dict()
    count = sum(len(tasks) for tasks in cluster.values())
    return f"{resolver.task_type} {resolver.task_id} of {count} tasks"


def check_global_batch(batch_size, num_replicas, key_bn_splits=1):
    """Checks that the global batch divides into even per-replica batches.

    Args:
        batch_size: the global batch.
        num_replicas: replicas in sync.
        key_bn_splits: split-BatchNorm groups of the key encoder on each replica.

    Returns:
        The per-replica batch size.

    Raises:
        ValueError: naming `batch_size`, the replica count and the per-replica batch when
            the batch does not divide evenly, gives an odd per-replica batch (MixCo mixes
            the halves of each replica's batch), or does not split into `key_bn_splits`
            groups on each replica.
    """
    if batch_size % num_replicas:
        raise ValueError(
            f"Invalid config value batch_size={batch_size}: it does not divide among "
            f"{num_replicas} replicas. Use a multiple of {num_replicas}, such as "
            f"{(batch_size // num_replicas + 1) * num_replicas}."
        )
    per_replica = batch_size // num_replicas
    if per_replica % 2:
        raise ValueError(
            f"Invalid config value batch_size={batch_size}: with {num_replicas} replicas each "
            f"replica gets {per_replica} images, an odd number, but MixCo mixes the two halves "
            f"of each replica's batch. Use a multiple of {2 * num_replicas}."
        )
    if per_replica % key_bn_splits:
        raise ValueError(
            f"Invalid config value key_bn_splits={key_bn_splits}: with batch_size={batch_size} "
            f"on {num_replicas} replicas each replica's batch of {per_replica} images does not "
            "split into equal BatchNorm groups. Use a divisor of the per-replica batch."
        )
    return per_replica


# ---------------------------------------------------------------------- replica context


def replica_position():
    """Returns `(replica_id, num_replicas)` of the replica context the caller runs in.

    Outside any strategy this is `(0, 1)`. `num_replicas` is a Python int, and
    `replica_id` is an int32 scalar tensor under a strategy with several replicas.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "MixCo's train step runs per replica; call it through model.fit or strategy.run, "
            "not in a cross-replica context."
        )
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def all_gather(tensor):
    """Concatenates `tensor` `[batch, ...]` of every replica along axis 0, in replica order.

    With one replica this returns `tensor` itself.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    return context.all_gather(tensor, axis=0)


def local_slice(tensor, replica_id, size):
    """Returns rows `[replica_id * size, (replica_id + 1) * size)` of `tensor`."""
    return tensor[replica_id * size : (replica_id + 1) * size]


def poison_unless_finite_on_all_replicas(gradients):
    """Makes every replica's gradients NaN when any replica's gradients are not finite.

    Keras 3.15's `LossScaleOptimizer` decides whether to apply a step (or to lower the
    loss scale and skip it) from the first replica's gradients only, but applies the sum
    over replicas. Without this, an overflow on another replica reaches the weights as
    NaN. Multiplying by 1 leaves finite gradients bit-identical.

    Args:
        gradients: this replica's gradients, a list of float tensors (None entries kept).
    """
    context = tf.distribute.get_replica_context()
    present = [g for g in gradients if g is not None]
    local_finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present])
    # ReduceOp has no MIN: count the replicas with non-finite gradients instead.
    non_finite_replicas = context.all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(local_finite, tf.float32)
    )
    factor = tf.where(non_finite_replicas > 0, float("nan"), 1.0)
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in gradients]


def make_replica_averager(variables, strategy):
    """Returns a function that sets each variable on every replica to its mean over replicas.

    Keras 3.15 creates BatchNorm moving statistics with `aggregation="none"`, so each
    replica updates its own copy from its own batch. Averaging them, e.g. at each epoch
    end, keeps the replicas identical and makes the checkpoint store the mean.

    Args:
        variables: Keras or TensorFlow float variables created under `strategy`.
        strategy: the strategy that owns them.

    Returns:
        A function of no arguments; it does nothing with one replica.
    """
    if strategy.num_replicas_in_sync == 1 or not variables:
        return lambda: None
    tf_variables = [getattr(variable, "value", variable) for variable in variables]

    def replica_fn():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v) for v in tf_variables])
        for variable, mean in zip(tf_variables, means):
            variable.assign(mean)

    @tf.function
    def average():
        strategy.run(replica_fn)

    return average


def weights_digest(weights):
    """Returns the SHA-256 hex digest of the values of `weights` (this replica's copies).

    Workers of one run log it at the end of training; equal digests mean identical weights.
    """
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()


def batch_norm_moving_statistics(models):
    """Lists the moving mean and variance of every BatchNormalization layer in `models`."""
    statistics = []
    for model in models:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                statistics += [layer.moving_mean, layer.moving_variance]
    return statistics


def make_batch_norm_sync_callback(strategy, models):
    """Returns a Keras callback that averages BatchNorm moving statistics over replicas.

    It runs at each epoch end; put it before the checkpoint callback, so that the
    checkpoint stores the averages. With one replica it does nothing.

    Args:
        strategy: the strategy the models were built under.
        models: the Keras models whose BatchNorm layers to synchronize.
    """
    average = make_replica_averager(batch_norm_moving_statistics(models), strategy)

    class AverageBatchNormStatistics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            average()

    return AverageBatchNormStatistics()
