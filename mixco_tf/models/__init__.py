"""Backbones, projection heads and the MixCo model."""

from mixco_tf.models.batch_norm import SplitBatchNormalization
from mixco_tf.models.mixco import MixCo
from mixco_tf.models.resnet import build_backbone, build_projection_head

__all__ = ["MixCo", "SplitBatchNormalization", "build_backbone", "build_projection_head"]
