"""Compaction: remove the dropped channels for real, with torch-pruning's surgery."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from lightly.models.batchnorm import SplitBatchNorm
from timm.layers import MixedConv2d
from timm.models.dla import DlaBottle2neck
from timm.models.res2net import Bottle2neck
from torch import Tensor, nn
from torch_pruning.ops import _SplitOp

from lightly_mcp.pruning.batchnorm import merge_split_batchnorm
from lightly_mcp.pruning.dependency_graph import refresh_traceable_forms
from lightly_mcp.pruning.groups import (
    ChannelGroup,
    build_dependency_graph,
)
from lightly_mcp.pruning.masks import GroupMasks, Masks, output_feature_index


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
        restored = type(split)(  # lightly's class or lightly_mcp's ShuffleBatchNorm
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
    masks: Masks,
    example_inputs: Tensor | None = None,
) -> nn.Module:
    """Returns a physically pruned copy of ``encoder`` that keeps only masked channels.

    The copy is traced once with torch-pruning and every group's dropped channels are
    removed through its dependency graph (so coupled layers, residual branches and
    the consumers' input channels shrink together). The original is not modified.
    The copy's parameters require gradients like the original's did. lightly's
    ``SplitBatchNorm`` layers stay split, with the per-split running statistics of
    their kept channels, so the copy equals the masked network in train mode too;
    ``lightly_mcp.pruning.batchnorm.merge_split_batchnorm`` turns them into plain
    ``BatchNorm2d`` for deployment (same eval-mode output).

    Args:
        encoder: The dense encoder (e.g. the momentum encoder).
        groups: Its channel groups.
        masks: The masks of kept channels (a ``GroupMasks`` of ``groups``, or per
            group a boolean mask).
        example_inputs: A batch to trace with; defaults to one 64x64 RGB image.

    Returns:
        The compact encoder, in the same train/eval mode as ``encoder``. When a
        group reaching the output is pruned (``keep_output_dim=False``), its output
        has fewer features (``lightly_mcp.pruning.masks.output_feature_index``) and a
        ``feature_dim`` attribute is updated.

    Raises:
        ValueError: If a mask does not fit its group, keeps no channel or part of a
            set of tied channels.

    Examples:
        >>> groups = find_channel_groups(backbone)
        >>> masks = GroupMasks.top_k(groups, 0.5, dict(backbone.named_parameters()))
        >>> small = compact(backbone, groups, masks)
    """
    masks = GroupMasks.of(groups, masks)
    masks.check_compactable()
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
    for group, mask in masks.items():
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
            refresh_traceable_forms(compact_model)
            graph = build_dependency_graph(compact_model, example_inputs)
    _restore_splits(compact_model, splits)
    # torch-pruning creates new Parameters with requires_grad=True.
    for name, param in compact_model.named_parameters():
        param.requires_grad_(requires_grad.get(name, True))
    feature_dim = getattr(compact_model, "feature_dim", None)
    if isinstance(feature_dim, int) and not isinstance(feature_dim, bool):
        # lightly_mcp.methods.backbones.Backbone: a pruned output group narrows the
        # features.
        kept, _ = output_feature_index(groups, masks, feature_dim)
        setattr(compact_model, "feature_dim", len(kept))  # noqa: B010
    return compact_model
