"""TensorFlow's oneDNN CPU kernels: whether they run, and the layer shapes they get wrong.

TensorFlow on x86 Linux turns its oneDNN kernels on by default only on CPUs with
AVX512 extensions such as VNNI, BF16 or AMX. Elsewhere `TF_ENABLE_ONEDNN_OPTS=1`, set
before TensorFlow is imported, turns them on. On an AVX2-only CPU they make a
ResNet-18 training step about 3.5x faster (docs/benchmarks.md), but mixco_tf leaves
TensorFlow's default alone because TensorFlow 2.21's oneDNN filter gradient of a
strided 1x1 convolution is wrong when it has fewer than 8 input channels. Measured on an
AVX2 AMD EPYC (batch 8, 4 to 64 px, stride 2): 8% to 350% off the float64 result with 1,
3, 4, 6 or 7 channels, and heap corruption that aborts the process with 2 or 5. With 8,
12, 16, 20, 24, 32, 40, 64 or 96 channels, and for 3x3, 5x5 and 7x7 kernels with 3 or 4
channels, it matched. ResNet's downsample shortcuts are strided 1x1 convolutions with as
many input channels as the previous stage (4 at width_multiplier 0.0625).
`check_backbone` rejects those shapes while oneDNN runs.
"""

import keras

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
# Minimum input channels of a strided 1x1 convolution for a correct oneDNN gradient.
MIN_SAFE_CHANNELS = 8


def onednn_enabled():
    """Returns whether the loaded TensorFlow runs oneDNN CPU kernels, or None if unknown.

    Imports TensorFlow. The flag is read through a private TensorFlow module (the one
    TensorFlow's own tests use), so a TensorFlow without it gives None instead of failing.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def unsafe_onednn_convolutions(backbone):
    """Returns `(layer name, input channels)` of each strided 1x1 Conv2D oneDNN gets wrong.

    Args:
        backbone: a built `keras.Model`, e.g. from `mixco_tf.models.build_backbone`.
    """
    unsafe = []
    for layer in backbone.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        is_pointwise = tuple(layer.kernel_size) == (1, 1)
        is_strided = max(layer.strides) > 1
        channels = layer.kernel.shape[-2]
        if is_pointwise and is_strided and channels < MIN_SAFE_CHANNELS:
            unsafe.append((layer.name, channels))
    return unsafe


def check_backbone(backbone):
    """Raises ValueError if oneDNN runs and would compute wrong gradients for `backbone`.

    Args:
        backbone: a built `keras.Model` of Conv2D layers.
    """
    unsafe = unsafe_onednn_convolutions(backbone)
    if not unsafe or not onednn_enabled():
        return
    name, channels = unsafe[0]
    raise ValueError(
        f"TensorFlow's oneDNN CPU kernels are on ({ONEDNN_VARIABLE}=1 or this CPU's default) and "
        f"compute wrong gradients for strided 1x1 convolutions with {channels} input channels, "
        f"such as {name!r} ({len(unsafe)} such layers in {backbone.name!r}). Use a width_multiplier "
        f"that gives every stage at least {MIN_SAFE_CHANNELS} channels (0.125 or more for ResNet), "
        f"or set {ONEDNN_VARIABLE}=0 before starting Python."
    )
