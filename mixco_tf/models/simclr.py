"""SimCLR, with MixCo's mixed semi-positives as an optional second loss.

One training step on two augmented views `view_1`, `view_2` of a batch of N images:

0. augment (only for a model built with `augmentation`): draw `view_1`, `view_2` from
   the batch of plain images on the device;
1. mix: for each view, `x_mix = lam * x[:N/2] + (1 - lam) * x[N/2:]` (skipped when beta = 0);
2. encode: `z1`, `z2` (and `z_mix1`, `z_mix2`) = normalize(head(backbone(x))), one forward
   pass per batch, so BatchNorm normalizes each view over its own batch, as the
   authors' code does;
3. contrast: NT-Xent(z1, z2) + beta * (mix loss(z_mix1, z2) + mix loss(z_mix2, z1)) / 2;
4. step the optimizer on backbone and head.

There is no queue and no momentum encoder: the negatives are the other 2N - 2
projections of the batch.

Reference: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive
Learning of Visual Representations", arXiv 2002.05709; MixCo on SimCLR as in the code of
Kim, Lee, Bae, Yun, "MixCo: Mix-up Contrastive Learning for Visual Representation",
arXiv 2010.06300.
"""

import keras
import tensorflow as tf

from mixco_tf import losses
from mixco_tf.augment_batched import OnDeviceAugmentation
from mixco_tf.models.mixing import mix_halves, unpack_views
from mixco_tf.models.resnet import build_backbone, build_projection_head


@keras.saving.register_keras_serializable(package="mixco_tf")
class SimCLR(keras.Model):
    """SimCLR with MixCo's mix loss, trained by `model.fit`.

    `fit` takes a dataset of `(view_1, view_2)` pairs: two augmented, normalized float
    views `[batch, height, width, 3]` of the same images, with an even batch size.
    A model built with `augmentation` instead takes batches of plain images and draws
    the two views in its train step. Calling the model returns the backbone's features,
    the representation that is exported and evaluated.

    Args:
        backbone: "resnet18", "resnet34" or "resnet50" (torchvision layout).
        stem: "imagenet" or "cifar"; see `mixco_tf.models.resnet`.
        width_multiplier: channel multiplier of the backbone.
        projection_dim: output size of the MLP head (128).
        temperature: T of the NT-Xent loss (0.5).
        mix_temperature: T_mix of the mix loss (0.5).
        mix_weight: beta, the weight of the mix loss. 0 trains plain SimCLR and runs no
            mixed forward pass.
        weight_decay: L2 coefficient added to the gradients before the optimizer, like
            `torch.optim.SGD(weight_decay=...)` in the authors' code. Leave it at 0 when
            the optimizer applies its own decoupled weight decay.
        seed: seed of the in-graph randomness (the mixing weights, and the views with
            `augmentation`).
        augmentation: None (default), or a `mixco_tf.AugmentConfig` (or a dict of its
            fields) to draw the views in the train step; see `MixCo`.
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
        temperature=0.5,
        mix_temperature=0.5,
        mix_weight=1.0,
        weight_decay=0.0,
        seed=None,
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
        self.temperature = temperature
        self.mix_temperature = mix_temperature
        self.mix_weight = mix_weight
        self.weight_decay = weight_decay
        self.seed = seed
        _validate_hyperparameters(self)
        self.augmentation = OnDeviceAugmentation.from_arguments(augmentation, image_size, mean, std, "SimCLR")

        self.backbone = build_backbone(backbone, stem, width_multiplier, model_name="backbone")
        feature_dim = self.backbone.output_shape[-1]
        self.projection_head = build_projection_head(feature_dim, projection_dim, name="projection_head")
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.nt_xent_loss_tracker = keras.metrics.Mean(name="nt_xent_loss")
        self.mix_loss_tracker = keras.metrics.Mean(name="mix_loss")
        self.top1_tracker = keras.metrics.Mean(name="top1")
        self.built = True

    def call(self, images, training=False):
        """Returns the backbone's features `[batch, feature_dim]` for normalized images."""
        return self.backbone(images, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.nt_xent_loss_tracker, self.mix_loss_tracker, self.top1_tracker]

    def encode(self, images, training=True):
        """Returns L2-normalized projections `[batch, projection_dim]` in float32."""
        projections = self.projection_head(self.backbone(images, training=training), training=training)
        return tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1)

    def mix(self, images):
        """Mixes the two halves of `images` `[batch, h, w, 3]`; returns `(mixed [batch/2, h, w, 3], lam [batch/2])`."""
        return mix_halves(images, self.seed_generator)

    def train_step(self, data):
        # 0. Draw the two views on the device, or take those of the input pipeline.
        if self.augmentation is not None:
            view_1, view_2 = self.augmentation.draw_views(data, self.seed_generator, "SimCLR")
        else:
            view_1, view_2 = unpack_views(data, "SimCLR")
        _check_batch_size(view_1.shape[0])
        use_mix = self.mix_weight > 0
        variables = self.backbone.trainable_variables + self.projection_head.trainable_variables

        # 1. Mix the two halves of each view.
        if use_mix:
            x_mix1, lam1 = self.mix(view_1)
            x_mix2, lam2 = self.mix(view_2)

        with tf.GradientTape() as tape:
            # 2. Projections of both views, then of the mixed images.
            z1 = self.encode(view_1)
            z2 = self.encode(view_2)

            # 3. NT-Xent over the 2N projections; each mixed view against the other view.
            logits = losses.nt_xent_logits(z1, z2, self.temperature)
            nt_xent_loss = losses.nt_xent_from_logits(logits)
            if use_mix:
                z_mix1 = self.encode(x_mix1)
                z_mix2 = self.encode(x_mix2)
                mix_loss = losses.simclr_mix_contrast(
                    z_mix1, z_mix2, z1, z2, lam1, lam2, self.mix_temperature
                )
            else:
                mix_loss = tf.constant(0.0)
            loss = nt_xent_loss + self.mix_weight * mix_loss

        # 4. Optimizer step on backbone and head.
        gradients = tape.gradient(loss, variables)
        if self.weight_decay:
            gradients = [g + self.weight_decay * v for g, v in zip(gradients, variables)]
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # See MixCo.train_step: a non-finite gradient must show in the logged loss.
            loss = losses.nan_unless_finite_gradients(loss, gradients)
        self.optimizer.apply(gradients, variables)

        targets = losses.nt_xent_targets(tf.shape(z1)[0])
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), targets)
        self.loss_tracker.update_state(loss)
        self.nt_xent_loss_tracker.update_state(nt_xent_loss)
        self.mix_loss_tracker.update_state(mix_loss)
        self.top1_tracker.update_state(tf.reduce_mean(tf.cast(hits, tf.float32)))
        return {metric.name: metric.result() for metric in self.metrics}

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": self.backbone_name,
            "stem": self.stem,
            "width_multiplier": self.width_multiplier,
            "projection_dim": self.projection_dim,
            "temperature": self.temperature,
            "mix_temperature": self.mix_temperature,
            "mix_weight": self.mix_weight,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            **(self.augmentation.get_config() if self.augmentation is not None else {}),
        }


def _check_batch_size(batch_size):
    """Rejects batch sizes that cannot be mixed or contrasted, at trace time."""
    if batch_size is None:
        raise ValueError("SimCLR needs a static batch size: batch the dataset with drop_remainder=True.")
    if batch_size < 2 or batch_size % 2:
        raise ValueError(
            f"SimCLR mixes the two halves of a batch, so the batch size must be even and at "
            f"least 2; got {batch_size}."
        )


def _validate_hyperparameters(model):
    checks = [
        ("projection_dim", model.projection_dim, model.projection_dim >= 1, "a positive integer"),
        ("temperature", model.temperature, model.temperature > 0, "positive"),
        ("mix_temperature", model.mix_temperature, model.mix_temperature > 0, "positive"),
        ("mix_weight", model.mix_weight, model.mix_weight >= 0, "non-negative"),
        ("weight_decay", model.weight_decay, model.weight_decay >= 0, "non-negative"),
    ]
    for name, value, valid, expected in checks:
        if not valid:
            raise ValueError(f"Invalid {name}={value!r}: it must be {expected}.")
