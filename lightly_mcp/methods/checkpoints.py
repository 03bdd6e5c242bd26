"""Loading a dense MoCo starting point into MoCoV2 / MCP.

Checkpoints are data, not code: they are read with ``torch.load(weights_only=True)``.
Every supported format is first mapped onto this project's key space
(``backbone.net.*``, ``backbone_momentum.net.*``, ``projection_head.*``,
``projection_head_momentum.*``, queue as ``[K, dim]``):

- ``lightly-mcp``: Lightning checkpoints and ``state_dict()`` files of
  :class:`~lightly_mcp.methods.moco_v2.MoCoV2` (the queue under ``memory_bank``);
- ``lightly-example``: lightly's ``examples/pytorch_lightning/moco.py`` and
  ``examples/pytorch/moco.py`` models, whose backbone is
  ``nn.Sequential(*list(resnet.children())[:-1])`` (positional keys
  ``backbone.0.weight``, ``backbone.4.0.conv1.weight``, ...);
- ``lightly-benchmark``: lightly's ImageNet benchmark module (``backbone.*`` the query
  encoder, ``key_backbone.*`` the key encoder, ``projection_head.*``,
  ``key_projection_head.*``);
- ``moco-official``: facebookresearch/moco releases (``state_dict`` with
  ``module.encoder_q.*`` / ``module.encoder_k.*``, the MLP head as ``fc.0``/``fc.2``,
  and ``module.queue`` as ``[dim, K]``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightly_mcp.errors import CheckpointError
from lightly_mcp.io.model_files import check_finite_weights, read_tensors, shown_path
from lightly_mcp.io.provenance import (
    ProvenanceError,
    missing_checkpoint_message,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from lightly_mcp.methods.moco_v2 import MoCoV2

PARTS = ("backbone", "backbone_momentum", "projection_head", "projection_head_momentum")


def checkpoint_file(path: str | Path, what: str = "Checkpoint") -> Path:
    """``path`` when it is a file; otherwise the error that says what it is.

    Raises:
        CheckpointError: For a folder (naming checkpoints found in it).
        FileNotFoundError: For a path that does not exist.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.ckpt")) + sorted(path.glob("*/*.ckpt"))
        hint = (
            f"give a checkpoint file such as '{shown_path(found[0])}'"
            if found
            else "give the checkpoint file itself"
        )
        raise CheckpointError(
            f"{what} '{path}' is a folder, not a checkpoint file; {hint}."
        )
    if not path.is_file():
        raise FileNotFoundError(missing_checkpoint_message(path, what))
    return path


def read_checkpoint(
    path: str | Path,
    fix: str = "give a checkpoint that lightly-mcp or lightly wrote",
) -> dict[str, Any]:
    """Reads a checkpoint file safely (``weights_only=True``, see
    :func:`lightly_mcp.io.model_files.read_tensors`) into a dict.

    A file with a provenance sidecar (``NAME.provenance.json``, see
    :mod:`lightly_mcp.io.provenance`) must match the sha256 recorded there.

    Args:
        path: The checkpoint file.
        fix: What the user should do instead, for the refusal of an unreadable file.

    Raises:
        UnsafeCheckpointError: If the file is truncated, corrupt or holds code.
        CheckpointError: If it does not hold a dict or fails its provenance check.
    """
    path = checkpoint_file(path)
    try:
        verify_checkpoint(path)
    except ProvenanceError as error:
        raise CheckpointError(str(error)) from None
    data = read_tensors(path, fix)
    if not isinstance(data, dict):
        raise CheckpointError(
            f"Checkpoint '{shown_path(path)}' holds a {type(data).__name__}, expected "
            "a dict (a Lightning checkpoint or a state_dict)."
        )
    return data


def checkpoint_kind(data: Mapping[str, Any]) -> str | None:
    """Which of this project's modules a checkpoint (as read by
    :func:`read_checkpoint`) was written by; the one place that decides it.

    Returns:
        ``"MCP"`` (ADMM state), ``"MoCoV2"`` (a momentum backbone and no ADMM state),
        ``"unknown"`` (a Lightning checkpoint of neither), or ``None`` if ``data`` is
        not a Lightning checkpoint (no ``state_dict`` and ``hyper_parameters``).

    Examples:
        >>> checkpoint_kind({"state_dict": {"admm.rho": 0}, "hyper_parameters": {}})
        'MCP'
    """
    state = data.get("state_dict")
    if not isinstance(state, Mapping) or not isinstance(
        data.get("hyper_parameters"), Mapping
    ):
        return None
    if any(str(key).startswith("admm.") for key in state):
        return "MCP"
    if any(str(key).startswith("backbone_momentum.") for key in state):
        return "MoCoV2"
    return "unknown"


def _rename(state: dict[str, Any], mapping: list[tuple[str, str]]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        for old, new in mapping:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
    return out


def canonical_moco_state(
    data: dict[str, Any], model: MoCoV2
) -> tuple[str, dict[str, Any], Tensor | None, Tensor | None]:
    """Maps a MoCo checkpoint of any supported format onto this project's keys.

    Returns:
        ``(format, state, bank, bank_ptr)`` with ``bank`` as ``[K, dim]`` or None.
    """
    state: dict[str, Any] = data.get("state_dict", data)
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint's 'state_dict' is not a mapping.")
    keys = list(state)
    bank = (
        data.get("memory_bank") if isinstance(data.get("memory_bank"), dict) else None
    )
    if any(k.startswith("backbone.net.") for k in keys):
        b = bank or {}
        return "lightly-mcp", state, b.get("bank"), b.get("bank_ptr")
    official = next(
        (
            p
            for p in ("module.encoder_q.", "encoder_q.")
            if any(k.startswith(p) for k in keys)
        ),
        None,
    )
    if official is not None:
        root = official[: -len("encoder_q.")]
        mapping = []
        for enc, side in (("encoder_q.", ""), ("encoder_k.", "_momentum")):
            mapping += [
                (f"{root}{enc}fc.0.", f"projection_head{side}.layers.0."),
                (f"{root}{enc}fc.2.", f"projection_head{side}.layers.2."),
                (f"{root}{enc}", f"backbone{side}.net."),
            ]
        queue = state.get(f"{root}queue")
        ptr = state.get(f"{root}queue_ptr")
        return (
            "moco-official",
            _rename(state, mapping),
            queue.t().contiguous() if isinstance(queue, Tensor) else None,
            ptr.reshape(1).long() if isinstance(ptr, Tensor) else None,
        )
    if any(re.match(r"backbone\.\d+\.", k) for k in keys):
        children = [name for name, _ in model.backbone.net.named_children()]
        mapping = []
        for side in ("", "_momentum"):
            for index, child in enumerate(children):
                mapping.append(
                    (f"backbone{side}.{index}.", f"backbone{side}.net.{child}.")
                )
            mapping.append((f"projection_head{side}.", f"projection_head{side}."))
        return "lightly-example", _rename(state, mapping), None, None
    if any(k.startswith("key_backbone.") for k in keys):
        mapping = [
            ("key_backbone.", "backbone_momentum.net."),
            ("key_projection_head.", "projection_head_momentum."),
            ("backbone.", "backbone.net."),
            ("projection_head.", "projection_head."),
        ]
        b = bank or {}
        return (
            "lightly-benchmark",
            _rename(state, mapping),
            b.get("bank"),
            b.get("bank_ptr"),
        )
    raise CheckpointError(
        "not a MoCo checkpoint this project knows: expected keys of lightly-mcp "
        "(backbone.net.*), lightly's examples (backbone.0.*), lightly's benchmark "
        "(backbone.*, key_backbone.*) or the official MoCo release (encoder_q.*)."
    )


# --- what a checkpoint says about the model it needs ------------------------------
_RESNETS: dict[tuple[bool, tuple[int, ...]], str] = {
    (False, (2, 2, 2, 2)): "torchvision/resnet18",
    (False, (3, 4, 6, 3)): "torchvision/resnet34",
    (True, (3, 4, 6, 3)): "torchvision/resnet50",
}
# Children of torchvision's ResNet, as lightly's examples index them positionally.
_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2"}
_RESNET_CHILDREN.update({"6": "layer3", "7": "layer4"})


def _query_prefixes(state: dict[str, Any]) -> tuple[str, str]:
    """The key prefixes of the query backbone and its projection head."""
    keys = list(state)
    for root in ("module.", ""):
        if any(k.startswith(f"{root}encoder_q.") for k in keys):
            return f"{root}encoder_q.", f"{root}encoder_q.fc."
    if any(k.startswith("backbone.net.") for k in keys):
        return "backbone.net.", "projection_head."
    return "backbone.", "projection_head."


def checkpoint_settings(data: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """The recipe settings a MoCo checkpoint's tensors require, read from its
    shapes (any supported format), with the evidence for each.

    Keys are recipe keys: ``backbone.name`` (torchvision ResNets and MobileNetV2,
    from their block structure), ``backbone.small_input`` (ResNets: a 7x7 stem
    convolution or the 3x3 small-input one), ``pretrain.projection_hidden_dim``,
    ``pretrain.projection_dim``, ``pretrain.projection_batch_norm`` (the head's
    layer shapes and BatchNorm), ``pretrain.split_batch_norm`` (running statistics
    ``num_splits`` times the channels: lightly's ``SplitBatchNorm``) and
    ``pretrain.memory_bank_size`` (the queue). What the tensors do not show is left
    out.
    """
    state = data.get("state_dict", data)
    if not isinstance(state, dict):
        return {}
    backbone_prefix, head_prefix = _query_prefixes(state)
    found: dict[str, tuple[Any, str]] = {}
    backbone = {
        k[len(backbone_prefix) :]: v
        for k, v in state.items()
        if k.startswith(backbone_prefix) and isinstance(v, Tensor)
    }
    if backbone and all(k.split(".")[0].isdigit() for k in backbone):
        # lightly's examples: nn.Sequential(*list(resnet.children())[:-1]).
        backbone = {
            ".".join([_RESNET_CHILDREN.get(k.split(".")[0], "?"), *k.split(".")[1:]]): v
            for k, v in backbone.items()
        }
    name = None
    if any(k.startswith("layer4.") for k in backbone):
        blocks = tuple(
            len({k.split(".")[1] for k in backbone if k.startswith(f"layer{i}.")})
            for i in range(1, 5)
        )
        bottleneck = any(".conv3." in k for k in backbone)
        name = _RESNETS.get((bottleneck, blocks))
        if name is not None:
            found["backbone.name"] = (name, f"ResNet blocks {list(blocks)}")
        stem = backbone.get("conv1.weight")
        if stem is not None and stem.dim() == 4 and stem.shape[-1] in (3, 7):
            kernel = int(stem.shape[-1])
            found["backbone.small_input"] = (kernel == 3, f"a {kernel}x{kernel} stem")
    elif any(k.startswith("features.18.") for k in backbone):
        found["backbone.name"] = ("torchvision/mobilenet_v2", "MobileNetV2 blocks")
        stem = backbone.get("features.0.0.weight")
        width = _MOBILENET_WIDTHS.get(int(stem.shape[0])) if stem is not None else None
        if width is not None:
            found["backbone.width_multiplier"] = (
                width,
                f"a {int(stem.shape[0])}-channel stem",  # type: ignore[union-attr]
            )
    linears = [
        v
        for k, v in state.items()
        if k.startswith(head_prefix)
        and k.endswith(".weight")
        and isinstance(v, Tensor)
        and v.dim() == 2
    ]
    if linears:
        batch_norm = any(
            k.startswith(head_prefix) and k.endswith("running_mean") for k in state
        )
        dims = "-".join(
            str(d) for d in [linears[0].shape[1], *(w.shape[0] for w in linears)]
        )
        head = (
            f"a {dims} projection head {'with' if batch_norm else 'without'} BatchNorm"
        )
        if len(linears) >= 2:
            found["pretrain.projection_hidden_dim"] = (int(linears[0].shape[0]), head)
        found["pretrain.projection_dim"] = (int(linears[-1].shape[0]), head)
        found["pretrain.projection_batch_norm"] = (batch_norm, head)
    for key, value in backbone.items():
        if key.endswith("running_mean") and isinstance(value, Tensor):
            weight = backbone.get(key[: -len("running_mean")] + "weight")
            if weight is not None and weight.numel() > 0:
                splits = value.numel() // weight.numel()
                found["pretrain.split_batch_norm"] = (
                    splits if splits > 1 else 0,
                    f"SplitBatchNorm with {splits} splits"
                    if splits > 1
                    else "plain BatchNorm",
                )
            break
    bank = data.get("memory_bank")
    queue = bank.get("bank") if isinstance(bank, dict) else None
    for key in ("module.queue", "queue"):
        if queue is None and isinstance(state.get(key), Tensor):
            queue = state[key].t()
    if isinstance(queue, Tensor) and queue.dim() == 2:
        found["pretrain.memory_bank_size"] = (int(queue.shape[0]), "its queue")
    return found


#: MobileNetV2's stem channels (32 × width, rounded to a multiple of 8) → width.
_MOBILENET_WIDTHS = {8: 0.25, 16: 0.5, 24: 0.75, 32: 1.0}

#: The ``MoCoV2`` / ``MCP`` arguments that describe the dense model (the rest are
#: training settings), read from this project's checkpoints' hyper-parameters.
MODEL_ARGUMENTS = (
    "backbone",
    "backbone_kwargs",
    "temperature",
    "momentum",
    "memory_bank_size",
    "projection_hidden_dim",
    "projection_dim",
    "projection_batch_norm",
    "split_batch_norm",
)


def dense_model_arguments(data: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """The ``MoCoV2`` / ``MCP`` arguments a dense MoCo checkpoint was made with, each
    with its evidence: this project's checkpoints from their hyper-parameters, other
    formats from their tensors (:func:`checkpoint_settings`).
    """
    hparams = data.get("hyper_parameters")
    if isinstance(hparams, dict) and "backbone" in hparams:
        return {
            key: (hparams[key], "its hyper-parameters")
            for key in MODEL_ARGUMENTS
            if key in hparams
        }
    found: dict[str, tuple[Any, str]] = {}
    kwargs: dict[str, Any] = {}
    evidence: list[str] = []
    for key, (value, why) in checkpoint_settings(data).items():
        section, name = key.split(".", 1)
        if key == "backbone.name":
            found["backbone"] = (value, why)
        elif section == "backbone":
            kwargs[name] = value
            evidence.append(why)
        else:
            found[name] = (value, why)
    if kwargs:
        found["backbone_kwargs"] = (kwargs, ", ".join(evidence))
    return found


def checkpoint_format(data: dict[str, Any]) -> str:
    """The format name ``canonical_moco_state`` reports for a checkpoint."""
    state = data.get("state_dict", data)
    keys = [str(k) for k in state] if isinstance(state, dict) else []
    if any(k.startswith("backbone.net.") for k in keys):
        return "lightly-mcp"
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in keys):
        return "moco-official"
    if any(re.match(r"backbone\.\d+\.", k) for k in keys):
        return "lightly-example"
    if any(k.startswith("key_backbone.") for k in keys):
        return "lightly-benchmark"
    raise CheckpointError(
        "not a MoCo checkpoint this project knows: expected keys of lightly-mcp "
        "(backbone.net.*), lightly's examples (backbone.0.*), lightly's benchmark "
        "(backbone.*, key_backbone.*) or the official MoCo release (encoder_q.*)."
    )


def inspect_checkpoint(path: str | Path) -> str:
    """The recipe sections a dense MoCo checkpoint needs, as YAML with the evidence
    in comments (``lightly-mcp inspect CKPT``).

    Raises:
        CheckpointError: For a file that is not a MoCo checkpoint of a known format.
    """
    data = read_checkpoint(path)
    try:
        fmt = checkpoint_format(data)
    except CheckpointError as error:
        raise CheckpointError(f"Checkpoint '{path}': {error}") from None
    found = checkpoint_settings(data)
    lines = [
        f"# {path}: format {fmt}",
        "# the recipe settings its tensors need (for `lightly-mcp prune RECIPE "
        "--from` this checkpoint):",
    ]
    for section in ("backbone", "pretrain"):
        entries = [
            (key.split(".", 1)[1], value, evidence)
            for key, (value, evidence) in found.items()
            if key.startswith(section + ".")
        ]
        if entries:
            lines.append(f"{section}:")
            lines += [f"  {k}: {_yaml(v)}  # {evidence}" for k, v, evidence in entries]
    if not found:
        lines.append("# (its tensors say nothing the recipe sets)")
    return "\n".join(lines)


def model_settings(model: MoCoV2) -> dict[str, Any]:
    """The values of ``checkpoint_settings``' keys for a model."""
    h = model.hparams
    kwargs = h.get("backbone_kwargs") or {}
    split = int(h.get("split_batch_norm") or 0)
    return {
        "backbone.name": h.get("backbone"),
        "backbone.small_input": bool(kwargs.get("small_input", False)),
        "pretrain.projection_hidden_dim": h.get("projection_hidden_dim"),
        "pretrain.projection_dim": h.get("projection_dim"),
        "pretrain.projection_batch_norm": bool(h.get("projection_batch_norm")),
        "pretrain.split_batch_norm": split if split > 1 else 0,
    }


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_checkpoint_fits(
    data: dict[str, Any], model: MoCoV2, path: str | Path
) -> None:
    """Refuses a checkpoint whose shapes need other recipe settings than ``model``
    has, naming every recipe key and value to set (one message, not a first
    missing key).

    Raises:
        CheckpointError: ``set backbone.small_input: false, ...`` with the evidence.
    """
    needed = checkpoint_settings(data)
    have = model_settings(model)
    if not str(have["backbone.name"]).startswith("torchvision/"):
        # A timm ResNet has torchvision's keys: leave backbones to _load_part.
        needed.pop("backbone.name", None)
        needed.pop("backbone.small_input", None)
    differing = [
        (key, value, evidence)
        for key, (value, evidence) in needed.items()
        if key in have and have[key] != value
    ]
    if not differing:
        return
    settings = ", ".join(f"{key}: {_yaml(value)}" for key, value, _ in differing)
    evidence = "; ".join(dict.fromkeys(evidence for _, _, evidence in differing))
    raise CheckpointError(
        f"Checkpoint '{path}' needs other model settings than the recipe gives: set "
        f"{settings} (the checkpoint has {evidence}); `lightly-mcp inspect {path}` "
        "prints the recipe sections it needs."
    )


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
    try:
        fmt, state, bank, bank_ptr = canonical_moco_state(data, model)
    except CheckpointError as error:
        raise CheckpointError(f"Checkpoint '{path}': {error}") from None
    check_finite_weights(state, path)
    wanted = model.hparams.get("backbone")
    saved = data.get("hyper_parameters", {}).get("backbone")
    if saved is not None and wanted is not None and saved != wanted:
        raise CheckpointError(
            f"Checkpoint '{path}' was trained with backbone '{saved}' but the model "
            f"uses '{wanted}'. Set the backbone to '{saved}' or use a matching "
            "checkpoint."
        )
    check_checkpoint_fits(data, model, path)
    report = [f"format: {fmt}"]
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
    if isinstance(bank, Tensor):
        ptr = (
            bank_ptr
            if isinstance(bank_ptr, Tensor)
            else torch.zeros(1, dtype=torch.long)
        )
        try:
            model.load_memory_bank(bank, ptr)
            report.append(f"memory bank: {tuple(bank.shape)} loaded")
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
            ("of another shape", mismatched),
        ):
            if keys:
                more = ", …" if len(keys) > 1 else ""
                noun = "key" if len(keys) == 1 else "keys"
                problems.append(f"{len(keys)} {noun} {label} ({keys[0][-30:]}{more})")
        raise CheckpointError(
            f"Checkpoint '{shown_path(path)}' does not fit the {part}: "
            f"{'; '.join(problems[:2])}; check the backbone section."
        )
    module.load_state_dict(state)
