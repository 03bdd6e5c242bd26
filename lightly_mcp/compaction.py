"""Compaction: remove the dropped channels for real, with torch-pruning's surgery."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightly_mcp.batchnorm import merge_split_batchnorm
from lightly_mcp.groups import (
    ChannelGroup,
    build_dependency_graph,
    output_feature_index,
)


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
    The copy's parameters require gradients like the original's did, and lightly's
    ``SplitBatchNorm`` layers become plain ``BatchNorm2d`` (same eval-mode output).

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
    merge_split_batchnorm(compact_model)  # torch-pruning cannot cut split statistics
    requires_grad = {n: p.requires_grad for n, p in encoder.named_parameters()}
    graph = build_dependency_graph(compact_model, example_inputs)
    for group, mask in zip(groups, masks):
        if mask.shape != (group.num_channels,):
            raise ValueError(
                f"Mask for group '{group.root}' has shape {tuple(mask.shape)}, "
                f"expected ({group.num_channels},)."
            )
        if not bool(mask.any()):
            raise ValueError(f"Mask for group '{group.root}' keeps no channel.")
        # torch-pruning corrupts the model on duplicate or unsorted indices.
        dropped = sorted({int(i) for i in torch.nonzero(~mask.cpu()).flatten()})
        if not dropped:
            continue
        root = compact_model.get_submodule(group.root)
        pruner = graph.get_pruner_of_module(root)
        tp_group = graph.get_pruning_group(root, pruner.prune_out_channels, dropped)
        tp_group.prune()
    # torch-pruning creates new Parameters with requires_grad=True.
    for name, param in compact_model.named_parameters():
        param.requires_grad_(requires_grad.get(name, True))
    feature_dim = getattr(compact_model, "feature_dim", None)
    if isinstance(feature_dim, int) and not isinstance(feature_dim, bool):
        # lightly_mcp.backbones.Backbone: a pruned output group narrows the features.
        kept, _ = output_feature_index(groups, masks, feature_dim)
        setattr(compact_model, "feature_dim", len(kept))  # noqa: B010
    return compact_model
