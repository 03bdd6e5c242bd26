"""Frozen-feature evaluation (kNN, linear probe, raw pixels), the benchmark's
baselines (typical pruning, small from scratch, random masks) and the per-user cache
of evaluation baselines.

Imports the layers below it (errors, io, pruning, methods, formats, data) and this
folder.
"""
