"""Shared pytest setup."""

import os

# Hide TensorFlow's C++ info logs, which would bury test output. Runs before any test
# module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
