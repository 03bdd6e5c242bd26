from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import ChannelGroup
from lightly_mcp.pruning.measure import count_parameters
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from tests.conftest import TinyConvNet, randomize_batchnorm


def _torchvision(name: str) -> nn.Module:
    model = getattr(torchvision.models, name)()
    if hasattr(model, "fc"):
        model.fc = nn.Identity()
    else:
        model.classifier = nn.Identity()
    return model


BACKBONES = {
    "torchvision/mobilenet_v2": lambda: _torchvision("mobilenet_v2"),
    "torchvision/resnet18": lambda: _torchvision("resnet18"),
    "timm/resnet18": lambda: timm.create_model("resnet18", num_classes=0),
    "timm/efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=0),
}


def _random_masks(
    groups: list[ChannelGroup], ratio: float, seed: int
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for group in groups:
        keep = torch.randperm(group.num_channels, generator=generator)
        mask = torch.zeros(group.num_channels, dtype=torch.bool)
        mask[keep[: group.num_kept(ratio)]] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_forward_equals_physically_pruned_network(name: str, mode: str) -> None:
    torch.manual_seed(0)
    encoder = randomize_batchnorm(BACKBONES[name]()).double()
    example = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    groups = find_channel_groups(encoder, example)
    masks = _random_masks(groups, 0.6, seed=1)
    compact_model = compact(encoder, groups, masks, example)
    # (ResNets keep their output residual group, hence the loose bound.)
    assert count_parameters(compact_model) < 0.8 * count_parameters(encoder)

    subnet = MomentumSubnet(encoder, groups, masks)
    encoder.train(mode == "train")
    compact_model.train(mode == "train")
    weights_before = {k: v.clone() for k, v in encoder.named_parameters()}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        masked_out = subnet(x)
        compact_out = compact_model(x)
    assert masked_out.shape == compact_out.shape
    assert (masked_out - compact_out).abs().max() <= 1e-5
    assert masked_out.abs().max() > 0.1  # the comparison is not between zeros
    # The dense encoder is really different from the subnet and was not overwritten.
    with torch.no_grad():
        dense_out = copy.deepcopy(encoder)(x)
    assert (dense_out - masked_out).abs().max() > 1e-2
    for key, value in encoder.named_parameters():
        assert torch.equal(value, weights_before[key]), key


def test_masking_only_conv_filters_is_not_enough(tiny_net: nn.Module) -> None:
    """Guards the reason every member (norm bias included) is masked."""
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    masks = _random_masks(groups, 0.5, seed=0)
    compact_model = compact(tiny_net, groups, masks, torch.randn(1, 3, 8, 8)).eval()
    tiny_net.eval()
    x = torch.randn(3, 3, 8, 8)
    subnet = MomentumSubnet(tiny_net, groups, masks)
    params = subnet.masked_parameters()
    # Undo the masking of the norm layers' bias: the forward must then differ.
    for name in list(params):
        if name.endswith("bn.bias") or name == "stem.1.bias":
            params[name] = tiny_net.get_parameter(name)
    with torch.no_grad():
        full = torch.func.functional_call(tiny_net, params, (x,))
        assert torch.allclose(subnet(x), compact_model(x), atol=1e-5)
        assert not torch.allclose(full, compact_model(x), atol=1e-3)


def test_channel_reentering_the_mask_finds_real_weights(tiny_net: nn.Module) -> None:
    tiny_net.eval()
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    full_masks = [torch.ones(g.num_channels, dtype=torch.bool) for g in groups]
    subnet = MomentumSubnet(tiny_net, groups, _random_masks(groups, 0.5, seed=0))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        masked = subnet(x)
        subnet.set_masks(full_masks)
        assert torch.equal(subnet(x), tiny_net(x))
        assert not torch.allclose(masked, tiny_net(x))


def test_momentum_update_reaches_the_subnet(tiny_net: nn.Module) -> None:
    """The subnet reads the encoder's current weights, not a snapshot."""
    tiny_net.eval()
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    subnet = MomentumSubnet(tiny_net, groups, _random_masks(groups, 0.5, seed=0))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = subnet(x)
        tiny_net.head.weight.mul_(2.0)
        assert not torch.allclose(before, subnet(x))


def test_masks_are_buffers_and_round_trip(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    masks = _random_masks(groups, 0.5, seed=3)
    subnet = MomentumSubnet(tiny_net, groups, masks)
    state = subnet.state_dict()
    num_buffers = len(list(tiny_net.buffers()))
    assert set(state) == {f"mask_{g}" for g in range(len(groups))} | {
        f"stat_{i}" for i in range(num_buffers)
    }
    assert not any(k.startswith("_encoder") for k in state)
    restored = MomentumSubnet(tiny_net, groups)
    restored.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    tiny_net.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), subnet(x))


def test_set_masks_validates_shapes(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    subnet = MomentumSubnet(tiny_net, groups)
    with pytest.raises(ValueError, match="masks for"):
        subnet.set_masks([])
    bad = [torch.ones(g.num_channels + 1, dtype=torch.bool) for g in groups]
    with pytest.raises(ValueError, match="expected"):
        subnet.set_masks(bad)


def test_compact_preserves_requires_grad_and_original(tiny_net: nn.Module) -> None:
    tiny_net.stem.requires_grad_(False)
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    small = compact(
        tiny_net, groups, _random_masks(groups, 0.5, 0), torch.randn(1, 3, 8, 8)
    )
    assert not any(p.requires_grad for p in small.stem.parameters())
    assert all(p.requires_grad for p in small.block.parameters())
    for key, value in tiny_net.state_dict().items():
        assert torch.equal(value, state[key])
    assert isinstance(small, TinyConvNet)


def test_eval_mode_reaches_the_encoder(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    subnet = MomentumSubnet(tiny_net.train(), groups)
    subnet.eval()
    assert not tiny_net.training and not tiny_net.stem[1].training
    subnet.train()
    assert tiny_net.training


def test_subnet_and_encoder_keep_separate_statistics(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    masks = _random_masks(groups, 0.5, seed=0)
    subnet = MomentumSubnet(tiny_net, groups, masks).train()
    encoder_stats = {k: v.clone() for k, v in tiny_net.named_buffers()}
    subnet(torch.randn(6, 3, 8, 8))
    for name, value in tiny_net.named_buffers():
        assert torch.equal(value, encoder_stats[name]), name  # encoder untouched
    subnet_stats = {k: v.clone() for k, v in subnet.buffers_dict().items()}
    assert not torch.equal(
        subnet_stats["stem.1.running_mean"], encoder_stats["stem.1.running_mean"]
    )
    tiny_net(torch.randn(6, 3, 8, 8))  # a full-encoder forward
    for name, value in subnet.buffers_dict().items():
        assert torch.equal(value, subnet_stats[name]), name  # subnet untouched


def test_dropped_channel_statistics_are_frozen_and_reentry_is_safe(
    tiny_net: nn.Module,
) -> None:
    example = torch.randn(1, 3, 8, 8)
    groups = find_channel_groups(tiny_net, example)
    first = _random_masks(groups, 0.5, seed=0)
    subnet = MomentumSubnet(tiny_net, groups, first).train()
    residual = [i for i, g in enumerate(groups) if "stem.1.weight" in g.param_names][0]
    dropped = ~first[residual]
    before = subnet.buffers_dict()["stem.1.running_var"].clone()
    for _ in range(20):
        subnet(torch.randn(6, 3, 8, 8))
    after = subnet.buffers_dict()["stem.1.running_var"]
    assert torch.equal(after[dropped], before[dropped])  # frozen, not driven to 0
    assert not torch.equal(after[~dropped], before[~dropped])
    # Every channel re-enters: the eval forward stays equal to the compact network.
    subnet.set_masks([~m | m for m in first])
    subnet.eval()
    small = compact(subnet.materialize(), groups, subnet.masks, example).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(subnet(x), small(x), atol=1e-5)


def test_recalibration_gives_the_subnets_own_batch_statistics(
    tiny_net: nn.Module,
) -> None:
    """Running statistics after recalibration = per-batch mean and unbiased variance
    of the subnet's own BatchNorm inputs, averaged over the batches."""
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    masks = _random_masks(groups, 0.5, seed=1)
    subnet = MomentumSubnet(tiny_net, groups, masks).eval()
    batches = [
        torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i))
        for i in range(3)
    ]
    before = {k: v.clone() for k, v in subnet.buffers_dict().items()}
    encoder_before = {k: v.clone() for k, v in tiny_net.named_buffers()}

    # Direct computation on a dense copy with the masked weights, in train mode.
    reference = subnet.materialize().train()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in reference.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_pre_hook(
                lambda _m, args, name=name: inputs.setdefault(name, []).append(args[0])
            )
    with torch.no_grad():
        for x in batches:
            reference(x)

    assert subnet.recalibrate(iter(batches), num_batches=5) == 3
    assert not subnet.training  # mode restored
    stats = subnet.buffers_dict()
    dropped = {n: i for n, i in subnet._norm_statistics([~m for m in masks])}
    for name, seen in inputs.items():
        mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
        var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen]).mean(0)
        kept = torch.ones_like(mean, dtype=torch.bool)
        if f"{name}.running_mean" in dropped:
            kept[dropped[f"{name}.running_mean"]] = False
        got_mean, got_var = stats[f"{name}.running_mean"], stats[f"{name}.running_var"]
        assert torch.allclose(got_mean[kept], mean[kept], atol=1e-5), name
        assert torch.allclose(got_var[kept], var[kept], rtol=1e-4, atol=1e-6), name
        # Dropped channels keep their statistics.
        old_var = before[f"{name}.running_var"]
        assert torch.equal(got_var[~kept], old_var[~kept]), name
    for name, value in tiny_net.named_buffers():
        assert torch.equal(value, encoder_before[name]), name  # encoder untouched


def test_reentering_channel_gets_the_full_encoders_statistics(
    tiny_net: nn.Module,
) -> None:
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    first = _random_masks(groups, 0.5, seed=0)
    subnet = MomentumSubnet(tiny_net, groups, first).train()
    for _ in range(5):
        subnet(torch.randn(6, 3, 8, 8))  # the subnet's statistics drift
    g = [i for i, grp in enumerate(groups) if "stem.1.weight" in grp.param_names][0]
    kept_before = subnet.buffers_dict()["stem.1.running_var"].clone()
    swapped = [m.clone() for m in first]
    swapped[g] = ~first[g]  # dropped channels re-enter, kept ones leave
    subnet.set_masks(swapped)
    after = subnet.buffers_dict()["stem.1.running_var"]
    encoder = dict(tiny_net.named_buffers())["stem.1.running_var"]
    entering = swapped[g]
    assert torch.equal(after[entering], encoder[entering])
    assert torch.equal(after[~entering], kept_before[~entering])
