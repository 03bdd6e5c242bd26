from __future__ import annotations

from pathlib import Path

import torch
from lightly.models.batchnorm import SplitBatchNorm
from torch import nn

from lightly_mcp.batchnorm import merge_split_batchnorm, use_split_batchnorm
from lightly_mcp.mcp import MCP
from tests.conftest import TinyConvNet, randomize_batchnorm
from tests.helpers import TINY, loader, trainer


def test_split_then_merge_is_identity_in_eval_mode() -> None:
    net = randomize_batchnorm(TinyConvNet()).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        reference = net(x)
    assert use_split_batchnorm(net, 4) == 4
    assert isinstance(net.stem[1], SplitBatchNorm)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-6)
    net.train()
    net(torch.randn(8, 3, 8, 8))  # per-split statistics now differ
    net.eval()
    with torch.no_grad():
        split_out = net(x)
    assert merge_split_batchnorm(net) == 4
    assert type(net.stem[1]) is nn.BatchNorm2d
    with torch.no_grad():
        assert torch.allclose(net(x), split_out, atol=1e-6)


def test_mcp_with_split_batchnorm_trains_and_compacts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY, split_batch_norm=2, pruning_ratio=0.5, frq=0, dr=0, input_size=16
    )
    assert any(isinstance(m, SplitBatchNorm) for m in model.backbone_momentum.modules())
    trainer(tmp_path, max_steps=2).fit(model, loader())
    compact = model.compact_momentum_subnet().eval()
    assert not any(isinstance(m, SplitBatchNorm) for m in compact.modules())
    model.subnet.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(compact(x), model.subnet(x), atol=1e-5)
