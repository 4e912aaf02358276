"""Backbones, projection heads and the MixCo (MoCo-v2) and SimCLR models."""

from mixco_tf.models.batch_norm import SplitBatchNormalization
from mixco_tf.models.mixco import MixCo
from mixco_tf.models.resnet import build_backbone, build_projection_head
from mixco_tf.models.simclr import SimCLR

__all__ = ["MixCo", "SimCLR", "SplitBatchNormalization", "build_backbone", "build_projection_head"]
