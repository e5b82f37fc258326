"""Benchmark internals behind ``python -m bayeslora.bench`` (model set-up and timing, suites, scaling curves)."""
