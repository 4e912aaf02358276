"""MixCo: mix-up contrastive learning in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
