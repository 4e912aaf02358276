"""Benchmarks of mixco_tf; run them as modules, e.g. `python -m benchmarks.pipeline`."""
