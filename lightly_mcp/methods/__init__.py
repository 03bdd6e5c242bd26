"""The Lightning methods and what they train on: backbones, MoCo v2 views
(``transforms``, ``batched_views``), resumable data order, ``MoCoV2`` and ``MCP``,
their options, the checkpoint formats they read (lightly's, MoCo's, ours), and
Lightning callbacks and loggers.

Imports :mod:`lightly_mcp.errors`, :mod:`lightly_mcp.io`, :mod:`lightly_mcp.pruning`
and this folder.
"""
