"""Shipped checkpoints: a slim dense MoCo file with a provenance record and its sha256.

A shipped checkpoint ``NAME.ckpt`` has a sidecar ``NAME.provenance.json`` that says how
it was made (command, recipe, commit, wall time, accuracy) and holds its sha256.
:func:`lightly_mcp.methods.checkpoints.read_checkpoint` verifies every checkpoint that
has such a sidecar before loading it, so an altered or partly downloaded file is refused
with a message naming the file and the command that regenerates it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lightly_mcp.errors import MAX_MESSAGE, ProvenanceError


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
    """The error for a checkpoint path that is not a file (``what`` names it):
    missing, a folder, or a FIFO or device.
    """
    from lightly_mcp.io.files import not_a_file

    problem = not_a_file(checkpoint)
    if problem != "does not exist":
        return f"{what} '{checkpoint}' {problem}; give a checkpoint file."
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
        from lightly_mcp.io.model_files import shown_path

        head = f"Checkpoint '{shown_path(checkpoint)}' is altered (sha256 mismatch); "
        message = head + regenerate_hint(record).replace(" -- FILE", "")
        if len(message + ".") > MAX_MESSAGE:  # a long command: where it is instead
            where = "the 'regenerate' command in its .provenance.json"
            message = f"{head}restore it or rerun {where}"
        raise ProvenanceError(message + ".")
    return record
