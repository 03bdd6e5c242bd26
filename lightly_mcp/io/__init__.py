"""Files on disk, below everything else: atomic writes (``files``), the bounded YAML
reader (``safe_yaml``), code-free model files and their checks (``model_files``), and
provenance records (``provenance``).

Imports only :mod:`lightly_mcp.errors`.
"""
