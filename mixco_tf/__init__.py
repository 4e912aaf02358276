"""MixCo: mix-up contrastive learning in Keras 3 / TensorFlow.

Public API:
    MixCo: MoCo-v2 with mixed images as semi-positives, a subclassed `keras.Model`.
    losses: `info_nce` and `mix_contrast` as pure functions on tensors.
    build_backbone: torchvision-layout ResNet-18/34/50 backbones.
    two_view_dataset, AugmentConfig: the MoCo-v2 two-view tf.data pipeline.
    load_dataset: the data set registry.
    export_backbone: the backbone as a TF Serving SavedModel.
"""

from mixco_tf import losses
from mixco_tf.augment import AugmentConfig, two_view_dataset
from mixco_tf.data import load_dataset
from mixco_tf.export import export_backbone
from mixco_tf.models import MixCo, build_backbone

__all__ = [
    "AugmentConfig",
    "MixCo",
    "build_backbone",
    "export_backbone",
    "load_dataset",
    "losses",
    "two_view_dataset",
]
__version__ = "0.1.0"
