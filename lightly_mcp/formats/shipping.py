"""Shipping a dense MoCo v2 checkpoint: the slim file MCP starts from, written with
its provenance sidecar (:mod:`lightly_mcp.io.provenance`), atomically.

Used by ``benchmarks/ship_dense_checkpoint.py`` to produce ``pretrained/*.ckpt``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightly_mcp.errors import InputError
from lightly_mcp.io.files import default_file_mode, write_json_atomic
from lightly_mcp.io.provenance import provenance_path, sha256_of
from lightly_mcp.methods.checkpoints import checkpoint_kind

# What MCP needs to start from a dense MoCo v2 checkpoint: encoders, heads (in
# ``state_dict``), the model's settings and the queue. No optimizer, scheduler,
# loop, callback or RNG state.
SLIM_KEYS = (
    "state_dict",
    "hyper_parameters",
    "memory_bank",
    "epoch",
    "global_step",
    "pytorch-lightning_version",
)


def slim_checkpoint(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a MoCoV2 Lightning checkpoint that MCP starts from.

    Raises:
        InputError: If ``data`` is not a Lightning checkpoint (no ``state_dict`` /
            ``hyper_parameters``) or is an MCP checkpoint (ship dense checkpoints
            only).
    """
    kind = checkpoint_kind(data)
    if kind is None:
        raise InputError(
            "not a Lightning checkpoint of MoCoV2 (no 'state_dict' and "
            "'hyper_parameters'); ship the final.ckpt of a pretrain run."
        )
    if kind == "MCP":
        raise InputError(
            "this is an MCP checkpoint; ship the dense MoCoV2 checkpoint of a pretrain "
            "run (pretrain/final.ckpt)."
        )
    return {key: data[key] for key in SLIM_KEYS if key in data}


def ship_checkpoint(
    data: dict[str, Any], target: str | os.PathLike[str], record: dict[str, Any]
) -> dict[str, Any]:
    """Writes the slim checkpoint to ``target`` and its provenance sidecar, atomically.

    Args:
        data: A MoCoV2 Lightning checkpoint (as read by ``read_checkpoint``).
        target: ``NAME.ckpt`` to write.
        record: Provenance entries (command, recipe, commit, wall time, accuracy...);
            ``file``, ``bytes`` and ``sha256`` are added.

    Returns:
        The provenance record as written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    try:
        torch.save(slim_checkpoint(data), tmp)
        record = {
            **record,
            "file": target.name,
            "bytes": os.path.getsize(tmp),
            "sha256": sha256_of(tmp),
        }
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json_atomic(provenance_path(target), record)
    return record
