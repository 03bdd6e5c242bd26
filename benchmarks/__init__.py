"""Benchmarks: scripts run from the repository root (``python benchmarks/NAME.py``),
importable as a package by the tests."""
