"""Benchmarks and chaos scripts (run as ``python -m stress.<name>``); not part of the package."""
