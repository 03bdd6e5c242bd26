"""A smoke run of the MCP building blocks (``lightly-mcp smoke``).

Builds torchvision's MobileNetV2, finds its channel groups, runs ADMM projection at
the paper's ratio, checks that the masked momentum subnet equals the physically
pruned network, and prints parameters and MACs. (The full pipeline, training
included, is the ``lightly-mcp`` command line.)
"""

from __future__ import annotations

import time

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

from lightly_mcp import (
    ADMMRegularizer,
    MomentumSubnet,
    compact,
    count_macs,
    count_parameters,
    find_channel_groups,
)


def smoke() -> None:
    """Runs the smoke pipeline and prints a table."""
    console = Console()
    torch.manual_seed(0)
    start = time.perf_counter()
    encoder = torchvision.models.mobilenet_v2()
    encoder.classifier = nn.Identity()
    groups = find_channel_groups(encoder)
    admm = ADMMRegularizer(encoder, groups, pruning_ratio=0.73, rho=0.01)
    admm.update(encoder)
    subnet = MomentumSubnet(encoder, groups, admm.group_masks).eval()
    small = compact(encoder, groups, admm.group_masks).eval()
    encoder.eval()
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        error = float((subnet(x) - small(x)).abs().max())
    table = Table(title="MCP smoke run: torchvision/mobilenet_v2, r = 0.73")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("compact", justify="right")
    table.add_row(
        "parameters", f"{count_parameters(encoder):,}", f"{count_parameters(small):,}"
    )
    table.add_row(
        "MACs @224", f"{count_macs(encoder, 224):,}", f"{count_macs(small, 224):,}"
    )
    table.add_row("channel groups", str(len(groups)), "")
    table.add_row("masked vs. compact max |err|", "", f"{error:.2e}")
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    if error > 1e-4:
        raise SystemExit(f"masked subnet and compact model disagree: {error:.2e}")
