"""Shared pytest setup."""

import os

# Hide TensorFlow's C++ info logs, which would bury test output. Runs before any test
# module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Imported before any test module loads TensorFlow, so the suite runs with the oneDNN
# kernels that mixco_tf asks for (see mixco_tf.runtime), as users' runs do.
import mixco_tf  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
