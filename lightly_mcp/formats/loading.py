"""Rebuilding a trained module from a Lightning checkpoint of this project.

A checkpoint is read as data (``torch.load(weights_only=True)``, see
:func:`lightly_mcp.methods.checkpoints.read_checkpoint`); which module wrote it is
decided by :func:`lightly_mcp.methods.checkpoints.checkpoint_kind`; the module is
rebuilt from the checkpoint's hyper-parameters and its state, queue and transition
position are restored. No code is ever run from a file.

Examples:
    >>> from lightly_mcp.formats.loading import load_mcp_checkpoint  # doctest: +SKIP
    >>> mcp = load_mcp_checkpoint("runs/quickstart/prune/final.ckpt")  # doctest: +SKIP
    >>> subnet = mcp.subnet.materialize()  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightly_mcp.errors import CheckpointError, ExportError, describe_error
from lightly_mcp.methods.checkpoints import (
    check_finite_weights,
    checkpoint_kind,
    read_checkpoint,
)
from lightly_mcp.methods.mcp import LEGACY_HPARAMS, MCP
from lightly_mcp.methods.moco_v2 import MoCoV2


def module_from_checkpoint(data: dict[str, Any], path: str | Path) -> MoCoV2:
    """Rebuilds the :class:`MoCoV2` or :class:`MCP` module a Lightning checkpoint of
    this project holds (read with :func:`read_checkpoint`).

    The class is told by :func:`checkpoint_kind`, the module is built from the
    checkpoint's hyper-parameters (an MCP's ``dense_checkpoint`` is not re-read: the
    weights come from this checkpoint), then its state, queue and transition position
    are restored. The caller's RNG state is left alone.

    Raises:
        CheckpointError: If it is not such a checkpoint or does not rebuild.
    """
    kind = checkpoint_kind(data)
    if kind is None:
        raise CheckpointError(
            f"Checkpoint '{path}' is not a Lightning checkpoint (no 'state_dict' and "
            "'hyper_parameters'); use the checkpoint a MoCoV2 or MCP run wrote."
        )
    if kind == "unknown":
        raise CheckpointError(
            f"Checkpoint '{path}' is neither a MoCoV2 nor an MCP checkpoint."
        )
    return _rebuild(MCP if kind == "MCP" else MoCoV2, data, path)


def load_mcp_checkpoint(
    checkpoint: str | Path, expected_backbone: str | None = None
) -> MCP:
    """Rebuilds an :class:`MCP` module from a Lightning checkpoint, safely.

    The file is read with ``weights_only=True``; the module is rebuilt from the
    checkpoint's hyper-parameters (with ``dense_checkpoint=None``: the weights come
    from this checkpoint, no other file is read), then its state, queue and
    transition scheduler are restored.

    Args:
        checkpoint: Path of a checkpoint written by a Lightning ``Trainer`` for MCP.
        expected_backbone: If given, the backbone name the checkpoint must have.

    Returns:
        The MCP module, in eval mode, on the CPU.

    Raises:
        CheckpointError: If the file cannot be read safely (corrupt, truncated, code)
            or does not rebuild.
        ExportError: If it is not an MCP checkpoint (e.g. a MoCo v2 one) or was
            trained with another backbone than ``expected_backbone``.
    """
    data = read_checkpoint(checkpoint)
    kind = checkpoint_kind(data)
    if kind is None:
        raise ExportError(
            f"Checkpoint '{checkpoint}' is not a Lightning checkpoint (no "
            "'state_dict' and 'hyper_parameters'); export needs the checkpoint an MCP "
            "training run wrote."
        )
    if kind == "MoCoV2":
        raise ExportError(
            f"Checkpoint '{checkpoint}' is a dense MoCo v2 checkpoint, with no "
            "pruning mask to export; prune it first (lightly-mcp prune --from) and "
            "export that."
        )
    if kind != "MCP":
        raise ExportError(
            f"Checkpoint '{checkpoint}' is not an MCP checkpoint (no 'admm.*' state)."
        )
    backbone = data["hyper_parameters"].get("backbone")
    if expected_backbone is not None and backbone != expected_backbone:
        raise ExportError(
            f"Checkpoint '{checkpoint}' was trained with backbone '{backbone}', but "
            f"'{expected_backbone}' was expected. Use a checkpoint of "
            f"'{expected_backbone}' or expect '{backbone}'."
        )
    model = _rebuild(MCP, data, checkpoint)
    assert isinstance(model, MCP)
    return model.eval()


def _rebuild(cls: type[MoCoV2], data: dict[str, Any], path: str | Path) -> MoCoV2:
    """``cls`` built from the checkpoint's hyper-parameters, its state restored."""
    hparams = data["hyper_parameters"]
    kwargs = dict(hparams)
    if cls is MCP:
        kwargs["dense_checkpoint"] = None
        kwargs = {**LEGACY_HPARAMS, **kwargs}
    else:
        kwargs.pop("dense_checkpoint", None)
    check_finite_weights(data["state_dict"], path)
    try:
        model = cls(**kwargs)
        model.load_state_dict(data["state_dict"])
    except (TypeError, RuntimeError) as error:
        raise CheckpointError(
            f"Checkpoint '{path}' does not rebuild as a {cls.__name__} model of "
            f"backbone '{hparams.get('backbone')}': {describe_error(error)}"
        ) from None
    if isinstance(model, MCP):
        try:
            model.admm.group_masks.check_compactable()
        except ValueError as error:
            raise CheckpointError(
                f"Checkpoint '{path}' holds unusable masks: {error} Use the "
                "checkpoint an MCP run wrote, unchanged."
            ) from None
    model.on_load_checkpoint({k: v for k, v in data.items() if k != "rng_states"})
    return model
