"""TensorFlow runtime settings that must be chosen before TensorFlow loads.

oneDNN kernels: TensorFlow on x86 Linux turns its oneDNN CPU kernels on by default only
on CPUs with AVX512 extensions such as VNNI, BF16 or AMX. On an AVX2-only CPU the
fallback Eigen convolution gradients make a ResNet-18 training step about 3.5x slower
(docs/benchmarks.md: 64 px, batch 128). TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once,
when it is imported, so `mixco_tf/__init__.py` sets it to "1" unless the user set it or
TensorFlow is already loaded. Set `TF_ENABLE_ONEDNN_OPTS=0` to keep TensorFlow's default.
"""

import logging
import os
import sys

logger = logging.getLogger(__name__)

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn():
    """Requests oneDNN CPU kernels unless TensorFlow is already loaded or the user chose.

    Returns:
        True if this call set the variable, False if it left the environment unchanged.
    """
    if ONEDNN_VARIABLE in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ[ONEDNN_VARIABLE] = "1"
    return True


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


def warn_if_onednn_missed():
    """Logs a warning when TensorFlow was imported first and runs without oneDNN on a CPU.

    Call only when TensorFlow is already loaded; GPUs make the warning moot.
    """
    if ONEDNN_VARIABLE in os.environ or onednn_enabled() is not False:
        return
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if tf.config.list_physical_devices("GPU"):
        return
    logger.warning(
        "TensorFlow was imported before mixco_tf with %s unset, so its oneDNN CPU kernels are "
        "off on this CPU and training steps run about 3.5x slower. Import mixco_tf before "
        "TensorFlow and Keras, or set %s=1 in the environment before Python starts.",
        ONEDNN_VARIABLE,
        ONEDNN_VARIABLE,
    )
