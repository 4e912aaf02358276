"""TensorFlow's oneDNN CPU kernels: whether they run.

TensorFlow on x86 Linux turns its oneDNN kernels on by default only on CPUs with
AVX512 extensions such as VNNI, BF16 or AMX. Elsewhere `TF_ENABLE_ONEDNN_OPTS=1`, set
before TensorFlow is imported, turns them on: on an AVX2-only CPU that makes a ResNet-18
training step about 3.9x faster (docs/benchmarks.md). mixco_tf leaves TensorFlow's
default alone, because oneDNN has had shape-specific bugs. In TensorFlow 2.21 on an AVX2
AMD EPYC, the filter gradient of a strided 1x1 convolution with fewer than 8 input
channels was 8% to 350% off the float64 result with 1, 3, 4, 6 or 7 channels. With 2 or
5 channels it corrupted the heap and the process aborted. The backbones of `mixco_tf.models.resnet` avoid
that layer, and `tests/test_runtime.py` compares a training step under oneDNN with
TensorFlow's own kernels.
"""

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


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

