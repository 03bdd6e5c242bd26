"""Shipped checkpoints: a slim dense MoCo file with a provenance record and its sha256.

A shipped checkpoint ``NAME.ckpt`` has a sidecar ``NAME.provenance.json`` that says how
it was made (command, recipe, commit, wall time, accuracy) and holds its sha256.
:func:`lightly_mcp.checkpoints.read_checkpoint` verifies every checkpoint that has
such a sidecar before loading it, so an altered or partly downloaded file is refused
with a message naming the file and the command that regenerates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightly_mcp.files import default_file_mode, write_json_atomic

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


class ProvenanceError(ValueError):
    """A shipped checkpoint that does not match its provenance record."""


def provenance_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The sidecar of ``NAME.ckpt``: ``NAME.provenance.json`` in the same folder."""
    return Path(checkpoint).with_suffix(".provenance.json")


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_provenance(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance record beside ``checkpoint``, or None if it has none.

    Raises:
        ProvenanceError: If the sidecar exists but is not a JSON object with a sha256.
    """
    sidecar = provenance_path(checkpoint)
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise ProvenanceError(
            f"provenance file '{sidecar}' is not valid JSON ({error}); restore it "
            "from the repository (git checkout -- FILE)."
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ProvenanceError(
            f"provenance file '{sidecar}' has no 'sha256' entry; restore it from the "
            "repository (git checkout -- FILE)."
        )
    return record


def regenerate_hint(record: dict[str, Any] | None) -> str:
    """How to get the file back, as a sentence for error messages."""
    command = (record or {}).get("regenerate")
    if command:
        return f"restore it (git checkout -- FILE) or regenerate it with: {command}"
    return "restore it from where it came from"


def missing_checkpoint_message(
    checkpoint: str | os.PathLike[str], what: str = "Checkpoint"
) -> str:
    """The error for a checkpoint file that does not exist (``what`` names it)."""
    try:
        record = read_provenance(checkpoint)
    except ProvenanceError:
        record = None
    if record is None:
        return f"{what} '{checkpoint}' does not exist."
    hint = regenerate_hint(record).replace("FILE", str(checkpoint))
    return f"{what} '{checkpoint}' does not exist; {hint}."


def verify_checkpoint(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Checks ``checkpoint`` against the sha256 of its provenance record.

    Returns:
        The record, or None when the file has no provenance sidecar.

    Raises:
        ProvenanceError: If the file's sha256 differs from the recorded one.
    """
    record = read_provenance(checkpoint)
    if record is None:
        return None
    actual = sha256_of(checkpoint)
    if actual != record["sha256"]:
        hint = regenerate_hint(record).replace("FILE", str(checkpoint))
        raise ProvenanceError(
            f"Checkpoint '{checkpoint}' has sha256 {actual[:12]}… but its provenance "
            f"file '{provenance_path(checkpoint)}' records {record['sha256'][:12]}… "
            f"(altered or incomplete); {hint}."
        )
    return record


def slim_checkpoint(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a MoCoV2 Lightning checkpoint that MCP starts from.

    Raises:
        ValueError: If ``data`` has no ``state_dict`` / ``hyper_parameters`` or is an
            MCP checkpoint (ship dense checkpoints only).
    """
    state = data.get("state_dict")
    if not isinstance(state, dict) or not isinstance(
        data.get("hyper_parameters"), dict
    ):
        raise ValueError(
            "not a Lightning checkpoint of MoCoV2 (no 'state_dict' and "
            "'hyper_parameters'); ship the final.ckpt of a pretrain run."
        )
    if any(str(key).startswith("admm.") for key in state):
        raise ValueError(
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
