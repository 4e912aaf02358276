"""MixCo on MoCo-v2: mixed images as semi-positives of a momentum-contrast model.

One training step on two augmented views `view_q`, `view_k` of a batch of B images:

0. augment (only for a model built with `augmentation`): draw `view_q`, `view_k` from
   the batch of plain images on the device;
1. mix: pair the first half of `view_q` with the second half, `x_mix = lam * x1 + (1 - lam) * x2`;
2. encode queries: `q`, `q_mix` from the query encoder on `concat[view_q, x_mix]`;
3. update the key encoder: `theta_k = m * theta_k + (1 - m) * theta_q`;
4. encode keys: `k` from the key encoder on a shuffled `view_k` (Shuffle-BN);
5. contrast: InfoNCE(q, k, queue) + beta * mix loss(q_mix, k, queue, lam);
6. step the optimizer on the query encoder; enqueue `k`.

Reference: Kim, Lee, Bae, Yun, "MixCo: Mix-up Contrastive Learning for Visual
Representation", arXiv 2010.06300, and the authors' PyTorch code.
"""

import functools
import logging

import keras
import tensorflow as tf

from mixco_tf import distribute, losses
from mixco_tf.augment_batched import OnDeviceAugmentation
from mixco_tf.models.batch_norm import SplitBatchNormalization
from mixco_tf.models.mixing import mix_halves, unpack_views
from mixco_tf.models.resnet import build_backbone, build_projection_head

logger = logging.getLogger(__name__)

# Normalization of the encoders; see the `batch_norm` argument of `MixCo`.
BATCH_NORM_MODES = ("shuffle", "synchronized", "none")
# Name of the seed generator's state among the model's own variables in saved files.
_SEED_STATE_KEY = "seed_generator_state"


@keras.saving.register_keras_serializable(package="mixco_tf")
class MixCo(keras.Model):
    """MoCo-v2 with MixCo's mixed semi-positives, trained by `model.fit`.

    `fit` takes a dataset of `(view_q, view_k)` pairs: two augmented, normalized float
    views `[batch, height, width, 3]` of the same images, with an even batch size.
    A model built with `augmentation` instead takes batches of plain images and draws
    the two views in its train step. Calling the model returns the query backbone's
    features, the representation that is exported and evaluated.

    Args:
        backbone: "resnet18", "resnet34" or "resnet50" (torchvision layout).
        stem: "imagenet" or "cifar"; see `mixco_tf.models.resnet`.
        width_multiplier: channel multiplier of the backbone.
        projection_dim: output size of the MLP head (128).
        queue_size: K, the number of negative keys kept in the queue. Must be at least
            the batch size.
        moco_momentum: m of the key encoder's moving average (0.999).
        temperature: T of the InfoNCE loss (0.2).
        mix_temperature: T_mix of the mix loss (0.05).
        mix_weight: beta, the weight of the mix loss. 0 trains plain MoCo-v2 and runs no
            mixed forward pass.
        weight_decay: L2 coefficient added to the gradients of the query encoder before
            the optimizer, like `torch.optim.SGD(weight_decay=...)` in the authors' code.
            Leave it at 0 when the optimizer applies its own decoupled weight decay.
        key_bn_splits: groups of the key encoder's split BatchNorm on each replica (the
            one-device substitute for Shuffle-BN); 1 disables it. The per-replica batch
            size must be divisible by it.
        batch_norm: normalization of the encoders, one of `BATCH_NORM_MODES`:
            "shuffle" (default): the query encoder normalizes over each replica's batch;
                the key encoder runs Shuffle-BN, i.e. with several replicas the key
                batch is shuffled across all replicas before the key encoder and
                unshuffled after it, and on each replica `key_bn_splits` groups are
                normalized separately.
            "synchronized": the key encoder normalizes over the global batch of all
                replicas (BatchNorm with all-reduced statistics, no shuffle); the query
                encoder is as in "shuffle". On one device this is plain BatchNorm.
            "none": no normalization layers in either encoder (for ablations and for
                checks that must not depend on how a batch is split over replicas). The
                keys are still shuffled as in "shuffle", which then changes nothing.
        seed: seed of the in-graph randomness (mixing weights, key shuffle, queue init,
            and the views with `augmentation`).
        augmentation: None (default) to train on views drawn by the input pipeline, or
            a `mixco_tf.AugmentConfig` (or a dict of its fields) to draw them in the
            train step with `mixco_tf.augment_batched`. `fit` then takes batches of
            uint8 images (or float in [0, 1]) `[batch, height, width, 3]` of one static
            size, or `(images, labels)`.
        image_size: side of the square views in pixels, with `augmentation`.
        mean: per-channel mean of the data in [0, 1] units, with `augmentation`.
        std: per-channel standard deviation of the data in [0, 1] units, with `augmentation`.
        **kwargs: passed to `keras.Model`.
    """

    def __init__(
        self,
        backbone="resnet18",
        stem="cifar",
        width_multiplier=1.0,
        projection_dim=128,
        queue_size=65536,
        moco_momentum=0.999,
        temperature=0.2,
        mix_temperature=0.05,
        mix_weight=1.0,
        weight_decay=0.0,
        key_bn_splits=8,
        seed=None,
        batch_norm="shuffle",
        augmentation=None,
        image_size=None,
        mean=None,
        std=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.backbone_name = backbone
        self.stem = stem
        self.width_multiplier = width_multiplier
        self.projection_dim = projection_dim
        self.queue_size = queue_size
        self.moco_momentum = moco_momentum
        self.temperature = temperature
        self.mix_temperature = mix_temperature
        self.mix_weight = mix_weight
        self.weight_decay = weight_decay
        self.key_bn_splits = key_bn_splits
        self.seed = seed
        self.batch_norm = batch_norm
        _validate_hyperparameters(self)
        self.augmentation = OnDeviceAugmentation.from_arguments(augmentation, image_size, mean, std, "MixCo")

        # Query encoder f_q = projection_head(backbone(x)): trained by the optimizer.
        query_batch_norm, key_batch_norm = _batch_norm_factories(batch_norm, key_bn_splits)
        self.backbone = build_backbone(
            backbone, stem, width_multiplier, batch_norm=query_batch_norm, model_name="backbone"
        )
        feature_dim = self.backbone.output_shape[-1]
        self.projection_head = build_projection_head(feature_dim, projection_dim, name="projection_head")

        # Key encoder f_k: same architecture, split BatchNorm, moved only by momentum.
        self.key_backbone = build_backbone(
            backbone, stem, width_multiplier, batch_norm=key_batch_norm, model_name="key_backbone"
        )
        self.key_projection_head = build_projection_head(
            feature_dim, projection_dim, name="key_projection_head"
        )
        self.key_backbone.trainable = False
        self.key_projection_head.trainable = False
        self._copy_query_to_key_encoder()

        self.queue = self.add_weight(
            shape=(queue_size, projection_dim),
            initializer=_normalized_normal_initializer(seed),
            trainable=False,
            name="queue",
        )
        self.queue_pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="queue_pointer"
        )
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.moco_loss_tracker = keras.metrics.Mean(name="moco_loss")
        self.mix_loss_tracker = keras.metrics.Mean(name="mix_loss")
        self.top1_tracker = keras.metrics.Mean(name="top1")
        logger.info("MixCo key encoder BatchNorm: %s", _describe_key_batch_norm(batch_norm, key_bn_splits))
        self.built = True

    # ------------------------------------------------------------------ encoders

    def call(self, images, training=False):
        """Returns the query backbone's features `[batch, feature_dim]` for normalized images."""
        return self.backbone(images, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.moco_loss_tracker, self.mix_loss_tracker, self.top1_tracker]

    @property
    def key_encoder_pairs(self):
        """(query weight, key weight) pairs that the momentum update moves: the trainable ones."""
        query_weights = self.backbone.weights + self.projection_head.weights
        key_weights = self.key_backbone.weights + self.key_projection_head.weights
        return [(q, k) for q, k in zip(query_weights, key_weights) if q.trainable]

    def _copy_query_to_key_encoder(self):
        """Starts the key encoder equal to the query encoder, moving statistics included."""
        self.key_backbone.set_weights(self.backbone.get_weights())
        self.key_projection_head.set_weights(self.projection_head.get_weights())

    def encode_queries(self, images, training=True):
        """Returns L2-normalized projections `[batch, projection_dim]` of the query encoder."""
        projections = self.projection_head(self.backbone(images, training=training), training=training)
        return tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1)

    def encode_keys(self, images):
        """Returns L2-normalized key projections `[batch, projection_dim]`, without gradient.

        The batch is shuffled before the key encoder and unshuffled after it, so each
        split-BatchNorm group draws its statistics from a random subset of the batch.
        With several replicas and `batch_norm` other than "synchronized", the shuffle
        spans the global batch (Shuffle-BN): see `_encode_keys_shuffled_across_replicas`.

        Args:
            images: this replica's key view, float `[batch, height, width, 3]`.
        """
        replica_id, num_replicas = distribute.replica_position()
        if num_replicas > 1 and self.batch_norm != "synchronized":
            return tf.stop_gradient(self._encode_keys_shuffled_across_replicas(images, replica_id))
        batch_size = tf.shape(images)[0]
        if self.key_bn_splits > 1 and self.batch_norm != "synchronized":
            permutation = tf.argsort(keras.random.uniform([batch_size], seed=self.seed_generator))
            images = tf.gather(images, permutation)
        projections = self.key_projection_head(self.key_backbone(images, training=True), training=True)
        keys = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1)
        if self.key_bn_splits > 1 and self.batch_norm != "synchronized":
            keys = tf.gather(keys, tf.argsort(permutation))
        return tf.stop_gradient(keys)

    def _encode_keys_shuffled_across_replicas(self, images, replica_id):
        """Shuffle-BN across replicas, as in MoCo: every replica encodes a random slice.

        All replicas gather the global key batch, permute it with the same permutation
        (the seed generator's state is identical on every replica), and encode their
        own slice, so each replica's BatchNorm statistics come from images of other
        replicas. The keys are then gathered again and unshuffled, so each replica
        returns the keys of its own images in their original order.

        Args:
            images: this replica's key view, float `[batch, height, width, 3]`.
            replica_id: this replica's index in the sync group.

        Returns:
            float32 keys `[batch, projection_dim]`, L2-normalized.
        """
        batch_size = images.shape[0]
        _, num_replicas = distribute.replica_position()
        global_images = distribute.all_gather(images)  # [replicas * batch, h, w, 3]
        global_size = num_replicas * batch_size
        permutation = tf.argsort(keras.random.uniform([global_size], seed=self.seed_generator))
        local_images = tf.gather(global_images, distribute.local_slice(permutation, replica_id, batch_size))
        projections = self.key_projection_head(self.key_backbone(local_images, training=True), training=True)
        local_keys = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1)
        # Row j of the gathered keys is the key of global image permutation[j].
        global_keys = tf.gather(distribute.all_gather(local_keys), tf.argsort(permutation))
        return distribute.local_slice(global_keys, replica_id, batch_size)

    # ------------------------------------------------------------------ the algorithm

    def mix(self, images):
        """Mixes the first half of a batch with the second half; see `mixing.mix_halves`.

        Args:
            images: float `[batch, height, width, 3]`, batch even.

        Returns:
            `(mixed, lam)`: mixed images `[batch / 2, height, width, 3]` with
            `mixed[i] = lam[i] * images[i] + (1 - lam[i]) * images[i + batch / 2]`, and
            float32 `lam` `[batch / 2]` drawn from U(0, 1).

        Pairs never cross replicas: each replica mixes its own batch. Every replica draws
        the weights of all replicas from the shared generator state and keeps its own
        slice, so the weights are independent across replicas.
        """
        half = tf.shape(images)[0] // 2
        replica_id, num_replicas = distribute.replica_position()
        if num_replicas == 1:
            lam = keras.random.uniform([half], seed=self.seed_generator)
        else:
            lam = keras.random.uniform([num_replicas * half], seed=self.seed_generator)
            lam = distribute.local_slice(lam, replica_id, half)
        return mix_halves(images, lam=lam)

    def update_key_encoder(self):
        """Moves the key encoder towards the query encoder: `k = m * k + (1 - m) * q`.

        In replica context each replica updates its own copy. The copies stay identical
        because the update is elementwise on inputs that are identical on every replica:
        the optimizer applies all-reduced gradients to the query encoder.
        """
        m = self.moco_momentum
        for query_weight, key_weight in self.key_encoder_pairs:
            key_weight.assign(m * key_weight + (1.0 - m) * query_weight)

    def enqueue(self, keys):
        """Writes the keys of the global batch into the queue at the pointer, wrapping at K.

        Args:
            keys: this replica's keys `[batch, dim]`. With several replicas every replica
                gathers all replicas' keys in replica order and writes the same
                `[replicas * batch, dim]` block, so every replica's queue stays identical
                and the pointer advances by the global batch.
        """
        keys = distribute.all_gather(keys)
        batch_size = tf.shape(keys)[0]
        positions = (self.queue_pointer + tf.range(batch_size)) % self.queue_size
        self.queue.assign(tf.tensor_scatter_nd_update(self.queue, positions[:, None], keys))
        self.queue_pointer.assign((self.queue_pointer + batch_size) % self.queue_size)

    def train_step(self, data):
        # 0. Draw the two views on the device, or take those of the input pipeline.
        if self.augmentation is not None:
            view_q, view_k = self.augmentation.draw_views(data, self.seed_generator, "MixCo")
        else:
            view_q, view_k = _unpack_views(data)
        _, num_replicas = distribute.replica_position()
        _check_batch_size(view_q.shape[0], self.key_bn_splits, self.queue_size, num_replicas)
        batch_size = tf.shape(view_q)[0]
        use_mix = self.mix_weight > 0
        query_variables = self.backbone.trainable_variables + self.projection_head.trainable_variables
        if not self.optimizer.built:
            # Built before the step, so that a LossScaleOptimizer's scale is a variable
            # when scale_loss and the weight decay below read it.
            self.optimizer.build(self.trainable_variables)

        # 1. Mix the two halves of the query view.
        if use_mix:
            x_mix, lam = self.mix(view_q)
            query_inputs = tf.concat([view_q, x_mix], axis=0)
        else:
            query_inputs = view_q

        with tf.GradientTape() as tape:
            # 2. Queries of the clean and mixed images in one forward pass.
            q_all = self.encode_queries(query_inputs, training=True)
            q = q_all[:batch_size]

            # 3-4. Momentum update, then keys from the updated key encoder. Neither needs
            # gradients, so the tape does not record them (less memory per step).
            with tape.stop_recording():
                self.update_key_encoder()
                k = self.encode_keys(view_k)

            # 5. Contrast against the keys and the queue of older keys.
            queue = tf.convert_to_tensor(self.queue)
            logits = losses.moco_logits(q, k, queue, self.temperature)
            moco_loss = losses.info_nce_from_logits(logits, queue_is_none=False)
            if use_mix:
                q_mix = q_all[batch_size:]
                mix_loss = losses.mix_contrast(q_mix, k, queue, lam, self.mix_temperature)
            else:
                mix_loss = tf.constant(0.0)
            loss = moco_loss + self.mix_weight * mix_loss

            # The optimizer sums the replicas' gradients, so each replica contributes
            # the gradient of loss / replicas: the sum is the global batch's mean. A
            # LossScaleOptimizer (float16) also multiplies by its loss scale here.
            scaled_loss = self.optimizer.scale_loss(loss / num_replicas)

        # 6. Optimizer step on the query encoder, then enqueue the global batch's keys.
        gradients = tape.gradient(scaled_loss, query_variables)
        if self.weight_decay:
            # Scaled like the loss, so that after the sum over replicas and the loss
            # scale's division the decay term is weight_decay * v.
            decay = self.weight_decay / num_replicas
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                decay = decay * self.optimizer.dynamic_scale
            gradients = [g + decay * v for g, v in zip(gradients, query_variables)]
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            if num_replicas > 1:
                gradients = distribute.poison_unless_finite_on_all_replicas(gradients)
        else:
            # A loss scale overflow is routine and skips the step; otherwise a
            # non-finite gradient is a failure that the logged loss must show.
            loss = losses.nan_unless_finite_gradients(loss, gradients)
        self.optimizer.apply(gradients, query_variables)
        self.enqueue(k)

        top1 = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=-1), 0), tf.float32))
        self.loss_tracker.update_state(loss)
        self.moco_loss_tracker.update_state(moco_loss)
        self.mix_loss_tracker.update_state(mix_loss)
        self.top1_tracker.update_state(top1)
        return {metric.name: metric.result() for metric in self.metrics}

    def summary(self, line_length=None, positions=None, print_fn=None, **kwargs):
        """Prints Keras's layer table, then the queue and the settings it does not show."""
        super().summary(line_length=line_length, positions=positions, print_fn=print_fn, **kwargs)
        key_batch_norm = (
            f"split BatchNorm in {self.key_bn_splits} groups" if self.key_bn_splits > 1 else "whole-batch BatchNorm"
        )
        loss = f"InfoNCE (T={self.temperature})"
        if self.mix_weight > 0:
            loss += f" + {self.mix_weight} * mix loss (T_mix={self.mix_temperature})"
        lines = [
            f" Queue: {self.queue_size} keys x {self.projection_dim} dims (non-trainable), "
            f"pointer at {int(self.queue_pointer.numpy())}",
            f" Key encoder: key_backbone + key_projection_head, not trained; momentum "
            f"m={self.moco_momentum}; {key_batch_norm}",
            f" Loss: {loss}",
        ]
        (print_fn or print)("\n".join(lines))

    # ------------------------------------------------------------------ serialization

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": self.backbone_name,
            "stem": self.stem,
            "width_multiplier": self.width_multiplier,
            "projection_dim": self.projection_dim,
            "queue_size": self.queue_size,
            "moco_momentum": self.moco_momentum,
            "temperature": self.temperature,
            "mix_temperature": self.mix_temperature,
            "mix_weight": self.mix_weight,
            "weight_decay": self.weight_decay,
            "key_bn_splits": self.key_bn_splits,
            "seed": self.seed,
            "batch_norm": self.batch_norm,
            **(self.augmentation.get_config() if self.augmentation is not None else {}),
        }

    def save_own_variables(self, store):
        # Keras saves weights only, and the seed generator's state is not one. Without
        # it a reloaded model would repeat the lam draws and key shuffles of step 1.
        super().save_own_variables(store)
        store[_SEED_STATE_KEY] = self.seed_generator.state.numpy()

    def load_own_variables(self, store):
        weights_store = {key: store[key] for key in store.keys() if key != _SEED_STATE_KEY}
        super().load_own_variables(weights_store)
        # Files saved before the state was stored load with a fresh generator.
        if _SEED_STATE_KEY in store.keys():
            self.seed_generator.state.assign(store[_SEED_STATE_KEY])


def _unpack_views(data):
    """Accepts `(view_q, view_k)` as yielded by the dataset, or Keras's `((q, k),)`."""
    return unpack_views(data, "MixCo")


def _check_batch_size(batch_size, key_bn_splits, queue_size, num_replicas=1):
    """Rejects per-replica batch sizes that cannot be mixed, split or enqueued, at trace time."""
    if batch_size is None:
        raise ValueError(
            "MixCo needs a static batch size: batch the dataset with drop_remainder=True."
        )
    if batch_size % 2:
        raise ValueError(f"MixCo mixes the two halves of a batch, so the batch size must be even; got {batch_size}.")
    if batch_size % key_bn_splits:
        raise ValueError(
            f"Batch size {batch_size} is not divisible by key_bn_splits={key_bn_splits}. "
            "Change one of them so the key batch splits into equal groups."
        )
    if batch_size * num_replicas > queue_size:
        raise ValueError(
            f"queue_size={queue_size} is smaller than the batch size "
            f"{batch_size * num_replicas} (the global batch of all replicas); one batch of "
            "keys would overwrite itself. Use a queue of at least one global batch."
        )


def _validate_hyperparameters(model):
    checks = [
        ("queue_size", model.queue_size, model.queue_size >= 1, "a positive integer"),
        ("projection_dim", model.projection_dim, model.projection_dim >= 1, "a positive integer"),
        ("moco_momentum", model.moco_momentum, 0.0 <= model.moco_momentum < 1.0, "in [0, 1)"),
        ("temperature", model.temperature, model.temperature > 0, "positive"),
        ("mix_temperature", model.mix_temperature, model.mix_temperature > 0, "positive"),
        ("mix_weight", model.mix_weight, model.mix_weight >= 0, "non-negative"),
        ("weight_decay", model.weight_decay, model.weight_decay >= 0, "non-negative"),
        ("key_bn_splits", model.key_bn_splits, model.key_bn_splits >= 1, "a positive integer"),
        ("batch_norm", model.batch_norm, model.batch_norm in BATCH_NORM_MODES, f"one of {list(BATCH_NORM_MODES)}"),
    ]
    for name, value, valid, expected in checks:
        if not valid:
            raise ValueError(f"Invalid {name}={value!r}: it must be {expected}.")


def _batch_norm_factories(mode, key_bn_splits):
    """Returns the `(query, key)` normalization-layer factories of `build_backbone`."""
    if mode == "none":
        identity = functools.partial(keras.layers.Identity)
        return identity, identity
    # PyTorch's BatchNorm momentum 0.1 is Keras's 0.9 (the weight of the old value).
    query = functools.partial(keras.layers.BatchNormalization, momentum=0.9, epsilon=1e-5)
    if mode == "synchronized":
        key = functools.partial(
            SplitBatchNormalization, num_splits=1, synchronized=True, momentum=0.9, epsilon=1e-5
        )
    else:
        key = functools.partial(
            SplitBatchNormalization, num_splits=key_bn_splits, momentum=0.9, epsilon=1e-5
        )
    return query, key


def _describe_key_batch_norm(mode, key_bn_splits):
    if mode == "none":
        return "none (batch_norm='none')"
    if mode == "synchronized":
        return "statistics of the global batch, all-reduced over replicas"
    if key_bn_splits > 1:
        return f"Shuffle-BN: keys shuffled across replicas, {key_bn_splits} groups per replica"
    return "Shuffle-BN across replicas; whole batch on one device (no shuffle)"


def _normalized_normal_initializer(seed):
    """Initializes the queue with random unit vectors, as MoCo does."""

    def initializer(shape, dtype=None):
        values = keras.random.normal(shape, seed=seed, dtype="float32")
        return tf.cast(tf.math.l2_normalize(values, axis=-1), dtype or tf.float32)

    return initializer
