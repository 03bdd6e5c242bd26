"""Compaction: remove the dropped channels for real, with torch-pruning's surgery."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from lightly.models.batchnorm import SplitBatchNorm
from timm.layers import MixedConv2d
from timm.models.dla import DlaBottle2neck
from timm.models.res2net import Bottle2neck
from torch import Tensor, nn
from torch.func import functional_call
from torch_pruning.ops import _SplitOp

from lightly_mcp.batchnorm import merge_split_batchnorm
from lightly_mcp.errors import describe_error
from lightly_mcp.groups import (
    ChannelGroup,
    build_dependency_graph,
    masked_tensors,
    output_feature_index,
    random_masks,
    route_of,
    unsupported,
)

CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
"""Largest relative difference between masked and compact outputs that
:func:`check_exact` accepts, by the precision it checks in; a wrongly removed channel
gives differences of order 1."""

CHECK_FLOAT64_MAX_PARAMETERS = 50_000_000
"""Larger backbones are checked in float32 (two float64 copies would need > 800 MB)."""


def _tag_channels(model: nn.Module, splits: dict[str, SplitBatchNorm]) -> None:
    """Stores every formerly split norm layer's channel indices in its running mean.

    torch-pruning cuts the running mean like the channels, so after pruning it holds
    the indices of the kept channels. (float64: exact for any channel count.)
    """
    for name in splits:
        norm = model.get_submodule(name)
        assert isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None
        norm.running_mean = torch.arange(
            norm.num_features, dtype=torch.float64, device=norm.running_mean.device
        )


@torch.no_grad()
def _restore_splits(model: nn.Module, splits: dict[str, SplitBatchNorm]) -> None:
    """Replaces the pruned norm layers tagged by :func:`_tag_channels` by
    ``SplitBatchNorm`` layers with the original per-split statistics of the kept
    channels.
    """
    for name, split in splits.items():
        norm = model.get_submodule(name)
        assert isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None
        kept = norm.running_mean.round().long()
        c, s = split.num_features, split.num_splits
        if not (kept.numel() == norm.num_features and bool((kept.diff() > 0).all())):
            raise RuntimeError(f"Lost track of the kept channels of '{name}'.")
        restored = SplitBatchNorm(
            len(kept),
            s,
            eps=split.eps,
            momentum=split.momentum,
            affine=split.affine,
            track_running_stats=split.track_running_stats,
        ).to(device=split.running_mean.device, dtype=split.running_mean.dtype)
        if split.affine:
            restored.weight = norm.weight
            restored.bias = norm.bias
        kept = kept.to(split.running_mean.device)
        for stat in ("running_mean", "running_var"):
            per_split = getattr(split, stat).view(s, c)
            setattr(restored, stat, per_split[:, kept].reshape(-1).clone())
        restored.num_batches_tracked = split.num_batches_tracked.clone()
        restored.training = split.training  # train() would collate the splits
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, restored)


def _refresh_mixed_convolutions(model: nn.Module) -> None:
    """Sets the split sizes of timm's split blocks from their pruned parts.

    ``MixedConv2d`` (MixNet) and the Res2Net bottlenecks split their input by sizes
    stored when they were built; torch-pruning shrinks their convolutions but not
    those sizes. (Res2Net's chunks stay equal: ``find_channel_groups`` ties the same
    position of every chunk.)
    """
    for module in model.modules():
        if isinstance(module, (Bottle2neck, DlaBottle2neck)):
            first = module.convs[0]
            assert isinstance(first, nn.Conv2d)
            module.width = first.in_channels  # res2net's chunk width
        if isinstance(module, MixedConv2d):
            convs = list(module.values())
            module.splits = [conv.in_channels for conv in convs]
            module.in_channels = sum(module.splits)
            module.out_channels = sum(conv.out_channels for conv in convs)


def compact(
    encoder: nn.Module,
    groups: Sequence[ChannelGroup],
    masks: Sequence[Tensor],
    example_inputs: Tensor | None = None,
) -> nn.Module:
    """Returns a physically pruned copy of ``encoder`` that keeps only masked channels.

    The copy is traced once with torch-pruning and every group's dropped channels are
    removed through its dependency graph (so coupled layers, residual branches and
    the consumers' input channels shrink together). The original is not modified.
    The copy's parameters require gradients like the original's did. lightly's
    ``SplitBatchNorm`` layers stay split, with the per-split running statistics of
    their kept channels, so the copy equals the masked network in train mode too;
    ``lightly_mcp.batchnorm.merge_split_batchnorm`` turns them into plain
    ``BatchNorm2d`` for deployment (same eval-mode output).

    Args:
        encoder: The dense encoder (e.g. the momentum encoder).
        groups: Its channel groups.
        masks: Per group, a boolean mask of kept channels.
        example_inputs: A batch to trace with; defaults to one 64x64 RGB image.

    Returns:
        The compact encoder, in the same train/eval mode as ``encoder``. When a
        group reaching the output is pruned (``keep_output_dim=False``), its output
        has fewer features (``lightly_mcp.groups.output_feature_index``) and a
        ``feature_dim`` attribute is updated.
    """
    if len(groups) != len(masks):
        raise ValueError(f"Got {len(masks)} masks for {len(groups)} channel groups.")
    compact_model = copy.deepcopy(encoder)
    # torch-pruning cannot cut split statistics: prune plain BatchNorm2d layers and
    # restore the splits afterwards.
    splits = {
        name: module
        for name, module in compact_model.named_modules()
        if isinstance(module, SplitBatchNorm)
    }
    merge_split_batchnorm(compact_model)
    requires_grad = {n: p.requires_grad for n, p in encoder.named_parameters()}
    graph = build_dependency_graph(compact_model, example_inputs)
    _tag_channels(compact_model, splits)
    for group, mask in zip(groups, masks):
        if mask.shape != (group.num_channels,):
            raise ValueError(
                f"Mask for group '{group.root}' has shape {tuple(mask.shape)}, "
                f"expected ({group.num_channels},)."
            )
        if not bool(mask.any()):
            raise ValueError(f"Mask for group '{group.root}' keeps no channel.")
        if group.splits_units(mask):
            raise ValueError(
                f"Mask for group '{group.root}' keeps part of a set of tied channels: "
                "a grouped convolution must keep the same channels in each of its "
                "convolution groups (ChannelGroup.units)."
            )
        # torch-pruning corrupts the model on duplicate or unsorted indices.
        dropped = sorted({int(i) for i in torch.nonzero(~mask.cpu()).flatten()})
        if not dropped:
            continue
        root = compact_model.get_submodule(group.root)
        pruner = graph.get_pruner_of_module(root)
        tp_group = graph.get_pruning_group(root, pruner.prune_out_channels, dropped)
        tp_group.prune()
        if any(isinstance(item.dep.target.module, _SplitOp) for item in tp_group):
            # The chunk offsets of the split changed: trace the pruned model again.
            _refresh_mixed_convolutions(compact_model)
            graph = build_dependency_graph(compact_model, example_inputs)
    _restore_splits(compact_model, splits)
    # torch-pruning creates new Parameters with requires_grad=True.
    for name, param in compact_model.named_parameters():
        param.requires_grad_(requires_grad.get(name, True))
    feature_dim = getattr(compact_model, "feature_dim", None)
    if isinstance(feature_dim, int) and not isinstance(feature_dim, bool):
        # lightly_mcp.backbones.Backbone: a pruned output group narrows the features.
        kept, _ = output_feature_index(groups, masks, feature_dim)
        setattr(compact_model, "feature_dim", len(kept))  # noqa: B010
    return compact_model


@torch.no_grad()
def _randomise_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights for every parameter (variance ``1 / fan_in``).

    Exactness is a property of the architecture, not of the weights: the check must
    not depend on what a model learned (a model whose trained weights overflow in a
    forward pass would otherwise fail it with NaN).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_floating_point():
                continue
            fan_in = param[0].numel() if param.dim() > 1 else 1
            values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_((values / math.sqrt(fan_in)).to(param.dtype))


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Random affine parameters and running statistics for every BatchNorm layer.

    Fresh layers (weight 1, bias 0, mean 0, var 1) hide errors such as a norm bias
    that is not masked.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        for name, low, scale in (
            ("running_mean", -0.5, 1.0),
            ("running_var", 0.5, 1.5),
            ("weight", 0.7, 0.6),
            ("bias", -0.3, 0.6),
        ):
            tensor = getattr(module, name, None)
            if isinstance(tensor, Tensor) and tensor.is_floating_point():
                values = low + scale * torch.rand(
                    tensor.shape, generator=generator, dtype=torch.float64
                )
                tensor.copy_(values.to(tensor.dtype))


def _mismatch(
    reference: nn.Module,
    groups: Sequence[ChannelGroup],
    masks: Sequence[Tensor],
    x: Tensor,
    tolerance: float,
) -> str | None:
    """Why the compact network differs from the masked one, or None if it does not."""
    params = dict(reference.named_parameters())
    try:
        with torch.no_grad():
            masked = functional_call(
                reference, {**params, **masked_tensors(params, groups, masks)}, (x,)
            )
        pruned = compact(reference, groups, masks, x)
        with torch.no_grad():
            compact_out = pruned(x)
    except Exception as error:  # noqa: BLE001 - any failure is a mismatch
        return f"pruning fails with {describe_error(error)}"
    if not isinstance(masked, Tensor) or not isinstance(compact_out, Tensor):
        return "the backbone does not return a tensor"
    if masked.dim() > 1 and masked.shape[1] != compact_out.shape[1]:
        kept, _ = output_feature_index(groups, masks, masked.shape[1])
        masked = masked[:, kept]
    if masked.shape != compact_out.shape:
        return (
            f"the pruned network's output has shape {tuple(compact_out.shape)}, "
            f"the masked one's {tuple(masked.shape)}"
        )
    scale = float(masked.abs().max())
    difference = float((masked - compact_out).abs().max()) / max(scale, 1e-12)
    if not difference <= tolerance:
        return f"the pruned network differs from the masked one by {difference:.1e}"
    return None


def check_exact(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_inputs: Tensor,
    pruning_ratio: float = 0.5,
    seed: int = 0,
) -> None:
    """Checks that masking and removing channels give the same network.

    A float64 copy of ``model`` on the CPU (float32 above
    :data:`CHECK_FLOAT64_MAX_PARAMETERS`), in eval mode with seeded random weights
    and BatchNorm statistics (the check is about the architecture, not about what the
    model learned), is pruned with random masks at ``pruning_ratio`` and its output on
    ``example_inputs`` compared with the masked copy's (relative difference at most
    :data:`CHECK_TOLERANCE`). When they differ, the groups are bisected to name the
    first one whose pruning alone breaks the equality.

    The global random number generators are left as they were: constructing a
    model with the check draws the same random numbers afterwards as without it.

    Raises:
        UnsupportedBackboneError: If they differ (or pruning fails), naming the group.
    """
    with torch.random.fork_rng(devices=[]):
        _check_exact(model, groups, example_inputs, pruning_ratio, seed)


def _check_exact(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_inputs: Tensor,
    pruning_ratio: float,
    seed: int,
) -> None:
    large = sum(p.numel() for p in model.parameters()) > CHECK_FLOAT64_MAX_PARAMETERS
    dtype = torch.float32 if large else torch.float64
    tolerance = CHECK_TOLERANCE[dtype]
    reference = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
    with torch.no_grad():
        _randomise_weights(reference, seed)
        _randomise_norms(reference, seed)
    x = example_inputs.detach().to(device="cpu", dtype=dtype)
    masks = random_masks(groups, pruning_ratio, seed)
    reason = _mismatch(reference, groups, masks, x, tolerance)
    if reason is None:
        return
    everything = [torch.ones_like(mask) for mask in masks]

    def only(chosen: Sequence[int]) -> list[Tensor]:
        return [masks[i] if i in chosen else everything[i] for i in range(len(masks))]

    candidates = list(range(len(groups)))
    while len(candidates) > 1:
        half = candidates[: len(candidates) // 2]
        rest = candidates[len(candidates) // 2 :]
        if _mismatch(reference, groups, only(half), x, tolerance) is not None:
            candidates = half
        elif _mismatch(reference, groups, only(rest), x, tolerance) is not None:
            candidates = rest
        else:
            break  # only a combination of groups fails
    if len(candidates) == 1:
        culprit = _mismatch(reference, groups, only(candidates), x, tolerance)
        if culprit is not None:
            root = groups[candidates[0]].root
            try:
                route = route_of(reference, root, x)
            except Exception:  # noqa: BLE001 - the message does without it
                route = ""
            raise unsupported(
                model,
                f"removing channels of the group of {root} is not exact "
                f"({f'{route}; ' if route else ''}{culprit})",
            )
    raise unsupported(model, f"pruning all groups together is not exact ({reason})")
