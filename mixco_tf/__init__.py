"""MixCo: mix-up contrastive learning in Keras 3 / TensorFlow.

Public API:
    MixCo: MoCo-v2 with mixed images as semi-positives, a subclassed `keras.Model`.
    SimCLR: SimCLR with the same optional mix loss, a subclassed `keras.Model`.
    losses: `info_nce`, `mix_contrast` and `nt_xent` as pure functions on tensors.
    build_backbone: torchvision-layout ResNet-18/34/50 backbones.
    two_view_dataset, AugmentConfig: the MoCo-v2 two-view tf.data pipeline.
    load_dataset: the data set registry.
    export_backbone: the backbone as a TF Serving SavedModel.
    export_backbone_onnx: the backbone as an ONNX model.
    KNNMonitor: a callback logging kNN top-1 during pretraining.
"""

import importlib

__version__ = "0.1.0"

# Names resolve on first use, so `python -m mixco_tf.train` can reject a bad config
# before TensorFlow loads, and `python -m mixco_tf.export` does not find its own module
# already imported by the package (runpy warns about that).
_PUBLIC = {
    "AugmentConfig": "mixco_tf.augment",
    "KNNMonitor": "mixco_tf.callbacks",
    "MixCo": "mixco_tf.models",
    "SimCLR": "mixco_tf.models",
    "build_backbone": "mixco_tf.models",
    "export_backbone": "mixco_tf.export",
    "export_backbone_onnx": "mixco_tf.export",
    "load_dataset": "mixco_tf.data",
    "two_view_dataset": "mixco_tf.augment",
}

__all__ = sorted([*_PUBLIC, "losses"])


def __getattr__(name):
    if name == "losses":
        return importlib.import_module("mixco_tf.losses")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mixco_tf' has no attribute {name!r}")
