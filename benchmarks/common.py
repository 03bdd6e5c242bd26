"""Helpers shared by the benchmark scripts (`python benchmarks/<script>.py`)."""

from __future__ import annotations

import platform
from pathlib import Path

import torchvision
from torch import nn

from lightly_mcp import compact, find_channel_groups
from lightly_mcp.masks import leading_masks


def cpu_model() -> str:
    """The CPU model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mobilenet_v2_pair(ratio: float) -> tuple[nn.Module, nn.Module]:
    """Dense torchvision MobileNetV2 (no classifier) and its compact version at
    ``ratio`` in every group, the output group included (the paper's setting)."""
    dense = torchvision.models.mobilenet_v2()
    dense.classifier = nn.Identity()
    dense.eval()
    groups = find_channel_groups(dense, keep_output_dim=False)
    small = compact(dense, groups, leading_masks(groups, ratio)).eval()
    return dense, small
