from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightly_mcp.pruning.prunable_groups import find_channel_groups
from lightly_mcp.pruning.pruning_ratio import removed_fraction, solve_pruning_ratio

INPUT = torch.randn(1, 3, 8, 8)


def test_removed_fraction_grows_with_ratio(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, INPUT)
    fractions = [
        removed_fraction(tiny_net, groups, r, example_inputs=INPUT)
        for r in (0, 0.25, 0.5, 0.75)
    ]
    assert fractions[0] == 0.0
    assert fractions == sorted(fractions) and fractions[-1] > fractions[1]


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_solver_meets_target_with_smallest_ratio(
    tiny_net: nn.Module, metric: str
) -> None:
    groups = find_channel_groups(tiny_net, INPUT)
    ratio = solve_pruning_ratio(
        tiny_net, groups, 0.5, metric=metric, input_size=8, example_inputs=INPUT
    )
    achieved = removed_fraction(tiny_net, groups, ratio, metric, 8, INPUT)
    below = removed_fraction(tiny_net, groups, max(0.0, ratio - 0.01), metric, 8, INPUT)
    assert achieved >= 0.5 > below


def test_mobilenet_v2_paper_setting() -> None:
    """r = 0.73 removes about 92 % of MobileNetV2's parameters (DESIGN.md)."""
    model = torchvision.models.mobilenet_v2()
    model.classifier = nn.Identity()
    groups = find_channel_groups(model, keep_output_dim=False)
    removed = removed_fraction(model, groups, 0.73, "params")
    assert 0.90 < removed < 0.94
    ratio = solve_pruning_ratio(model, groups, 0.927, tolerance=0.01)
    assert 0.72 < ratio < 0.78


def test_unreachable_target_is_refused(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, INPUT)
    with pytest.raises(ValueError, match="Choose a smaller target"):
        solve_pruning_ratio(tiny_net, groups, 0.999, example_inputs=INPUT)
