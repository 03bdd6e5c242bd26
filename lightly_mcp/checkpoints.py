"""Loading a dense MoCo starting point into MoCoV2 / MCP.

Checkpoints are data, not code: they are read with ``torch.load(weights_only=True)``.
Supported now: Lightning checkpoints and plain ``state_dict()`` files of this
project's :class:`~lightly_mcp.moco_v2.MoCoV2` (keys ``backbone.*``,
``backbone_momentum.*``, ``projection_head.*``, ``projection_head_momentum.*``, and
the queue under ``memory_bank``).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightly_mcp.moco_v2 import MoCoV2

PARTS = ("backbone", "backbone_momentum", "projection_head", "projection_head_momentum")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint file safely (``weights_only=True``) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"Checkpoint '{path}' cannot be read safely (truncated, corrupt, or it "
            f"contains code rather than tensors): {type(err).__name__}: {first_line}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"Checkpoint '{path}' holds a {type(data).__name__}, expected a dict "
            "(a Lightning checkpoint or a state_dict)."
        )
    return data


def load_dense_moco(model: MoCoV2, path: str | Path) -> list[str]:
    """Loads encoders, heads and queue of a dense MoCo checkpoint into ``model``.

    The momentum side is copied from the query side when the checkpoint has no
    momentum weights. The queue is loaded when present and of the same shape.

    Returns:
        Lines saying what was loaded and what was not.

    Raises:
        CheckpointError: If the checkpoint is for another backbone or its tensors do
            not fit the model.
    """
    data = read_checkpoint(path)
    state: dict[str, Any] = data.get("state_dict", data)
    wanted = model.hparams.get("backbone")
    saved = data.get("hyper_parameters", {}).get("backbone")
    if saved is not None and wanted is not None and saved != wanted:
        raise CheckpointError(
            f"Checkpoint '{path}' was trained with backbone '{saved}' but the model "
            f"uses '{wanted}'. Set the backbone to '{saved}' or use a matching "
            "checkpoint."
        )
    report = []
    for part in PARTS:
        prefix = part + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub and part.endswith("_momentum"):
            query = part[: -len("_momentum")]
            getattr(model, part).load_state_dict(getattr(model, query).state_dict())
            report.append(f"{part}: not in checkpoint, copied from {query}")
            continue
        if not sub:
            raise CheckpointError(
                f"Checkpoint '{path}' has no '{prefix}*' weights; expected a MoCo "
                f"checkpoint with {', '.join(PARTS)}."
            )
        _load_part(getattr(model, part), sub, part, path, wanted)
        report.append(f"{part}: {len(sub)} tensors loaded")
    bank = data.get("memory_bank")
    if isinstance(bank, dict) and isinstance(bank.get("bank"), Tensor):
        try:
            model.load_memory_bank(bank["bank"], bank["bank_ptr"])
            report.append(f"memory bank: {tuple(bank['bank'].shape)} loaded")
        except ValueError as error:
            report.append(f"memory bank: not loaded ({error})")
    else:
        report.append("memory bank: not in checkpoint, starts empty")
    return report


def _load_part(
    module: torch.nn.Module,
    state: dict[str, Tensor],
    part: str,
    path: str | Path,
    backbone: str | None,
) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with another shape", mismatched),
        ):
            if keys:
                problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])})")
        raise CheckpointError(
            f"Checkpoint '{path}' does not match {part} of '{backbone}': "
            f"{'; '.join(problems)} keys. Check the backbone name and its options."
        )
    module.load_state_dict(state)
