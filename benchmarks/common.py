"""Helpers shared by the benchmark scripts (`python benchmarks/<script>.py`)."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from lightly_mcp import compact, find_channel_groups, num_kept_channels
from lightly_mcp.groups import ChannelGroup


def cpu_model() -> str:
    """The CPU model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def first_channels_masks(groups: Sequence[ChannelGroup], ratio: float) -> list[Tensor]:
    """Masks keeping the first ``n_g`` channels of every group (the architecture a
    pruning at ``ratio`` gives, whichever channels survive)."""
    masks = []
    for group in groups:
        mask = torch.zeros(group.num_channels, dtype=torch.bool)
        mask[: num_kept_channels(group.num_channels, ratio)] = True
        masks.append(mask)
    return masks


def mobilenet_v2_pair(ratio: float) -> tuple[nn.Module, nn.Module]:
    """Dense torchvision MobileNetV2 (no classifier) and its compact version at
    ``ratio`` in every group, the output group included (the paper's setting)."""
    dense = torchvision.models.mobilenet_v2()
    dense.classifier = nn.Identity()
    dense.eval()
    groups = find_channel_groups(dense, keep_output_dim=False)
    small = compact(dense, groups, first_channels_masks(groups, ratio)).eval()
    return dense, small
