"""Which process of a multi-process run writes its files: the launcher's global rank.

Read from the environment the launcher set (before Lightning or torch.distributed
start), so that every rank agrees from the first line of a run.
"""

from __future__ import annotations

import os


def launch_rank() -> int:
    """This process's global rank as its launcher set it; 0 without a launcher.

    ``RANK`` (torchrun), ``SLURM_PROCID`` and ``JSM_NAMESPACE_RANK`` are global
    ranks; Lightning's own launcher starts ranks 1.. of a node with ``LOCAL_RANK``
    (and ``NODE_RANK`` for the node).
    """
    env = os.environ
    for name in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    local = env.get("LOCAL_RANK", "")
    node = env.get("NODE_RANK", "")
    local_rank = int(local) if local.isdigit() else 0
    node_rank = int(node) if node.isdigit() else 0
    return node_rank * 1_000_000 + local_rank


def is_rank_zero() -> bool:
    """Whether this process is the one that writes a run's files."""
    return launch_rank() == 0
