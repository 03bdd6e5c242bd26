from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightly.models.batchnorm import SplitBatchNorm
from torch import nn

from lightly_mcp.formats.export import compact_and_check
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.pruning.batchnorm import (
    ShuffleBatchNorm,
    merge_split_batchnorm,
    use_split_batchnorm,
)
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
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


def _random_masks(groups: list, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for group in groups:
        mask = torch.zeros(group.num_channels, dtype=torch.bool)
        keep = torch.randperm(group.num_channels, generator=generator)
        mask[keep[: group.num_kept(0.5)]] = True
        masks.append(mask)
    return masks


def test_compact_keeps_split_batchnorm_equal_in_train_and_eval_mode() -> None:
    torch.manual_seed(0)
    net = randomize_batchnorm(TinyConvNet())
    assert use_split_batchnorm(net, 2) == 4
    net.double().train()
    with torch.no_grad():  # the two splits' statistics now differ
        net(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    example = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    groups = find_channel_groups(net, example)
    masks = _random_masks(groups, seed=1)
    subnet = MomentumSubnet(net, groups, masks).train()
    small = compact(net, groups, masks, example).train()
    splits = [m for m in small.modules() if isinstance(m, SplitBatchNorm)]
    assert len(splits) == 4 and all(m.num_splits == 2 for m in splits)
    assert small.stem[1].num_features < 8  # really pruned

    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        masked_out, small_out = subnet(x), small(x)
    assert masked_out.abs().max() > 0.1
    assert (masked_out - small_out).abs().max() <= 1e-5  # train mode
    # Eval mode, with the running statistics both updated by the step above.
    subnet.eval()
    small.eval()
    y = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        masked_out, small_out = subnet(y), small(y)
        assert (masked_out - small_out).abs().max() <= 1e-5
        merge_split_batchnorm(small)  # deployment form: plain BatchNorm2d
        assert not any(isinstance(m, SplitBatchNorm) for m in small.modules())
        assert (masked_out - small(y)).abs().max() <= 1e-5


def test_mcp_with_split_batchnorm_trains_and_compacts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY, split_batch_norm=2, pruning_ratio=0.5, frq=0, dr=0, input_size=16
    )
    assert any(isinstance(m, SplitBatchNorm) for m in model.backbone_momentum.modules())
    trainer(tmp_path, max_steps=2).fit(model, loader())
    compact = model.compact_momentum_subnet().train()
    assert any(isinstance(m, SplitBatchNorm) for m in compact.modules())
    model.subnet.train()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(compact(x), model.subnet(x), atol=1e-5)
    # Export's compact model is plain BatchNorm2d and matches in eval mode.
    deployed = compact_and_check(model, model.subnet.masks, fold=False).model
    assert not any(isinstance(m, SplitBatchNorm) for m in deployed.modules())
    model.subnet.eval()
    with torch.no_grad():
        assert torch.allclose(deployed(x[:2]), model.subnet(x[:2]), atol=1e-5)


def _split_pair(splits: int, channels: int) -> tuple[SplitBatchNorm, ShuffleBatchNorm]:
    torch.manual_seed(0)
    reference = SplitBatchNorm(channels, splits)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
        reference.running_mean.normal_()
    layout_aware = ShuffleBatchNorm(channels, splits)
    layout_aware.load_state_dict(reference.state_dict())
    return reference, layout_aware


def test_shuffle_batchnorm_channels_last_equals_lightly_in_train_mode() -> None:
    reference, layout_aware = _split_pair(splits=4, channels=6)
    x = torch.randn(16, 6, 5, 3) * 3 + 2
    grad = torch.randn_like(x)
    contiguous = x.clone().requires_grad_(True)
    channels_last = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    expected = reference(contiguous)
    (expected * grad).sum().backward()
    out = layout_aware(channels_last)
    (out * grad).sum().backward()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert channels_last.grad is not None and contiguous.grad is not None
    assert channels_last.grad.is_contiguous(memory_format=torch.channels_last)
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected, **close)  # type: ignore[arg-type]
    torch.testing.assert_close(channels_last.grad, contiguous.grad, **close)  # type: ignore[arg-type]
    for name in ("weight", "bias"):
        ours, theirs = getattr(layout_aware, name).grad, getattr(reference, name).grad
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    # Running statistics: per split, after the same update.
    torch.testing.assert_close(
        layout_aware.running_mean,
        reference.running_mean,
        **close,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(
        layout_aware.running_var,
        reference.running_var,
        **close,  # type: ignore[arg-type]
    )
    # lightly's own layer cannot take the layout (its view fails).
    with pytest.raises(RuntimeError, match="view"):
        reference(x.contiguous(memory_format=torch.channels_last))


def test_mcp_step_in_channels_last_equals_contiguous() -> None:
    """Loss and gradients of an MCP step (compact subnet keys) do not depend on the
    layout; float64 so that the comparison is tight.
    """
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = MCP(
            backbone="torchvision/mobilenet_v2",
            backbone_kwargs={"small_input": True, "width_multiplier": 0.25},
            batch_size_per_device=16,
            memory_bank_size=32,
            projection_hidden_dim=16,
            projection_dim=8,
            projection_batch_norm=True,
            split_batch_norm=4,
            pruning_ratio=0.5,
            frq=0,
            dr=0,
            input_size=16,
            channels_last=channels_last,
        ).double()
        assert all(
            type(m) is ShuffleBatchNorm
            for m in model.backbone.modules()
            if isinstance(m, nn.BatchNorm2d)
        )
        generator = torch.Generator().manual_seed(1)
        views = [
            torch.randn(16, 3, 16, 16, dtype=torch.float64, generator=generator)
            for _ in range(2)
        ]
        with pytest.warns(UserWarning, match="self.log"):
            loss = model.training_step((views, None), 0)
        loss.backward()
        assert model.subnet.uses_compact_keys(), model.subnet.compact_failure
        grads = [p.grad for p in model.backbone.parameters()]
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
