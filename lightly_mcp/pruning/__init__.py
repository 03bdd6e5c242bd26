"""The paper's algorithm, in plain ``torch.nn`` and torch-pruning (no Lightning, no
files): channel groups (``dependency_graph``, ``groups``, ``prunable_groups``), masks
and the channel budget (``masks``, ``pruning_ratio``), ADMM (``admm``), the momentum
subnet and its compact keys (``momentum_subnet``, ``compact_keys``), the smooth
transition and the block schedule (``transition``, ``schedule``), physical removal
(``compaction``), and the module tools they share (``measure``, ``batchnorm``).

Imports only :mod:`lightly_mcp.errors` and this folder.
"""
