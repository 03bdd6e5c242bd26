"""Shared fixtures: tiny networks with non-trivial BatchNorm state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, one thread per worker (and per subprocess it starts).

    The workers share the machine's cores; a worker's tiny models gain nothing from
    a second thread, and two workers with two threads each would oversubscribe them.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read or write the per-user baseline cache (a test that needs it
    points ``LIGHTLY_MCP_CACHE`` at its own folder).
    """
    monkeypatch.setenv("LIGHTLY_MCP_CACHE", "off")


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every norm layer random affine parameters and running statistics.

    Freshly initialised BatchNorm layers have weight 1, bias 0, mean 0 and var 1,
    under which some masking bugs (e.g. forgetting the norm bias) are invisible.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                if module.affine:
                    module.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator))
                    module.bias.copy_(0.3 * torch.randn(c, generator=generator))
    return model


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU, a residual block, a depthwise conv and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        )
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 12, 1)
        self.expand_bn = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block(x))
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.expand_bn(self.expand(x)))
        return self.head(self.pool(x).flatten(1))


class GroupedConvNet(nn.Module):
    """A grouped 3x3 convolution (2 groups of 4 channels) between 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.conv3(x).mean((2, 3))


class ConcatNet(nn.Module):
    """A dense block: a norm layer after a concatenation carries two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(10)
        self.conv_out = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_a(x)
        b = self.conv_b(torch.relu(a))
        x = torch.relu(self.norm(torch.cat([a, b], dim=1)))
        return self.conv_out(x).mean((2, 3))


class CrossStageNet(nn.Module):
    """A CSP stage: half of a split feeds a residual block, then both are joined."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_exp = nn.Conv2d(3, 8, 1)
        self.bn_exp = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv_out = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = torch.relu(self.bn_exp(self.conv_exp(x))).split(4, dim=1)
        xb = torch.relu(xb + self.block(xb))
        return self.conv_out(torch.cat([xs, xb], dim=1)).mean((2, 3))


@pytest.fixture
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(TinyConvNet())


# --- one tiny dense and one tiny MCP checkpoint per session (tests/tiny.py) ---------
@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's dense MoCo v2 checkpoint (4 steps of pretraining)."""
    from lightly_mcp.app import pipeline
    from tests.tiny import tiny_recipe

    out = tmp_path_factory.mktemp("tiny_dense")
    return pipeline.pretrain(tiny_recipe(), out, progress=False)


@pytest.fixture(scope="session")
def tiny_pruned(tmp_path_factory: pytest.TempPathFactory, tiny_dense: Path) -> Path:
    """The tiny recipe's MCP checkpoint (4 steps from ``tiny_dense``)."""
    from lightly_mcp.app import pipeline
    from tests.tiny import tiny_recipe

    out = tmp_path_factory.mktemp("tiny_pruned")
    return pipeline.prune(tiny_recipe(), tiny_dense, out, progress=False)


@pytest.fixture(scope="session")
def tiny_exported(tmp_path_factory: pytest.TempPathFactory, tiny_pruned: Path) -> Path:
    """A run folder whose ``export/`` holds ``tiny_pruned`` exported."""
    import io

    from rich.console import Console

    from lightly_mcp.app import pipeline
    from tests.tiny import tiny_recipe

    out = tmp_path_factory.mktemp("tiny_exported")
    pipeline.export_stage(tiny_recipe(), tiny_pruned, out, Console(file=io.StringIO()))
    return out
