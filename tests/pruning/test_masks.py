from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightly_mcp.formats.loading import module_from_checkpoint
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.pruning.admm import ADMMRegularizer, project_onto_channel_budget
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import ChannelGroup, channel_scores
from lightly_mcp.pruning.masks import (
    GroupMasks,
    leading_masks,
    parameter_multipliers,
    random_masks,
    register_masks,
    round_masks,
)
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from tests.conftest import GroupedConvNet
from tests.helpers import TINY

EXAMPLE = torch.randn(1, 3, 8, 8)


def _groups(net: nn.Module) -> list[ChannelGroup]:
    return find_channel_groups(net, EXAMPLE)


# --- the masks ----------------------------------------------------------------------
def test_masks_are_checked_once_with_the_messages_callers_know(
    tiny_net: nn.Module,
) -> None:
    groups = _groups(tiny_net)
    with pytest.raises(ValueError, match=f"Got 0 masks for {len(groups)} channel"):
        GroupMasks(groups, [])
    bad = [torch.ones(g.num_channels + 1, dtype=torch.bool) for g in groups]
    with pytest.raises(ValueError, match=r"Mask for group '.*' has shape \(\d+,\)"):
        GroupMasks(groups, bad)
    masks = GroupMasks(groups)
    with pytest.raises(ValueError, match="masks for"):
        masks.assign(bad[:1])
    none_kept = [torch.zeros(g.num_channels, dtype=torch.bool) for g in groups]
    masks.assign(none_kept)  # a valid mask, but not one compaction can remove
    with pytest.raises(ValueError, match="keeps no channel"):
        masks.check_compactable()
    with pytest.raises(ValueError, match="keeps no channel"):
        compact(tiny_net, groups, none_kept, EXAMPLE)


def test_masks_are_a_sequence_of_bool_buffers(tiny_net: nn.Module) -> None:
    groups = _groups(tiny_net)
    given = [torch.arange(g.num_channels) % 2 for g in groups]  # 0/1 integers
    masks = GroupMasks(groups, given)
    assert len(masks) == len(groups)
    assert all(m.dtype == torch.bool for m in masks)
    assert [torch.equal(m, g.bool()) for m, g in zip(masks, given)] == [True] * len(
        groups
    )
    assert masks[-1] is masks[len(groups) - 1]
    assert [g for g, _ in masks.items()] == groups
    assert masks.kept_channels() == [int(g.sum()) for g in given]
    assert set(masks.state_dict()) == {f"mask_{g}" for g in range(len(groups))}
    assert [b for _, b in masks.named_buffers()] == masks.tensors()
    given[0][0] = 1 - given[0][0]  # the masks were copied
    assert bool(masks[0][0]) != bool(given[0][0])


def test_constructors_match_their_definitions(tiny_net: nn.Module) -> None:
    groups = _groups(tiny_net)
    for group, mask in zip(groups, leading_masks(groups, 0.5)):
        n = group.num_kept(0.5)
        assert mask[:n].all() and not mask[n:].any()
    generator = torch.Generator().manual_seed(3)
    for group, mask in zip(groups, random_masks(groups, 0.5, seed=3)):
        order = torch.randperm(group.num_channels, generator=generator)
        expected = torch.zeros(group.num_channels, dtype=torch.bool)
        expected[order[: group.num_kept(0.5)]] = True
        assert torch.equal(mask, expected)
    params = dict(tiny_net.named_parameters())
    _, projected = project_onto_channel_budget(params, groups, 0.5)
    for group, mask, same in zip(
        groups, GroupMasks.top_k(groups, 0.5, params), projected
    ):
        scores = channel_scores(params, group)
        assert int(mask.sum()) == group.num_kept(0.5)
        assert scores[mask].min() >= scores[~mask].max()
        assert torch.equal(mask, same)
    masks = leading_masks(groups, 0.5)
    widened = masks.rounded(tiny_net, 4)
    for a, b in zip(widened, round_masks(tiny_net, groups, masks, 4)):
        assert torch.equal(a, b)
    assert all(
        k % 4 == 0 or k == g.num_channels
        for k, g in zip(widened.kept_channels(), groups)
    )


def test_top_k_keeps_tied_channels_together() -> None:
    net = GroupedConvNet()
    groups = _groups(net)
    masks = GroupMasks.top_k(groups, 0.5, dict(net.named_parameters()))
    for group, mask in masks.items():
        assert not group.splits_units(mask)
    compact(net, groups, masks, EXAMPLE)  # accepted as it is


def test_multipliers_are_computed_once_per_change(tiny_net: nn.Module) -> None:
    groups = _groups(tiny_net)
    params = dict(tiny_net.named_parameters())
    masks = GroupMasks.random(groups, 0.5, seed=0)
    first = masks.multipliers(params)
    expected = parameter_multipliers(params, groups, masks)
    assert set(first) == set(expected)
    for name, value in first.items():
        assert torch.equal(value, expected[name]) and value.dtype == params[name].dtype
    again = masks.multipliers(params)
    assert all(again[n] is first[n] for n in first)  # cached
    version = masks.version
    assert masks.assign(GroupMasks.random(groups, 0.5, seed=1)) > 0
    assert masks.version != version
    changed = masks.multipliers(params)
    assert any(not torch.equal(changed[n], first[n]) for n in first)
    doubles = masks.multipliers({n: p.double() for n, p in params.items()})
    assert all(doubles[n].dtype == torch.float64 for n in doubles)
    # Loading new masks drops the cache too.
    other = GroupMasks.random(groups, 0.5, seed=2)
    masks.load_state_dict(other.state_dict())
    for name, value in masks.multipliers(params).items():
        assert torch.equal(value, other.multipliers(params)[name])


# --- ownership ----------------------------------------------------------------------
def test_an_owner_saves_its_masks_as_its_own_keys(tiny_net: nn.Module) -> None:
    groups = _groups(tiny_net)
    owner = nn.Module()
    register_masks(owner, GroupMasks.random(groups, 0.5, seed=0))
    parent = nn.Sequential(owner)
    state = parent.state_dict()
    assert set(state) == {f"0.mask_{g}" for g in range(len(groups))}
    fresh = nn.Sequential(nn.Module())
    register_masks(fresh[0], GroupMasks(groups))
    fresh.load_state_dict(state)  # strict
    for a, b in zip(fresh[0].group_masks, owner.group_masks):
        assert torch.equal(a, b)
    # A copy saves its own masks.
    clone = copy.deepcopy(fresh)
    clone[0].group_masks.assign(GroupMasks(groups))
    assert set(clone.state_dict()) == set(state)
    assert all(bool(m.all()) for m in clone.state_dict().values())
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key])


def test_subnet_shares_the_regularizers_masks_and_follows_an_update(
    tiny_net: nn.Module,
) -> None:
    """Sharing the mask (follow_masks) equals the copy that set_masks keeps."""
    groups = _groups(tiny_net)
    admm = ADMMRegularizer(tiny_net, groups, pruning_ratio=0.5, rho=0.1)
    momentum = copy.deepcopy(tiny_net)
    shared = MomentumSubnet(momentum, groups, admm.group_masks).train()
    copied = MomentumSubnet(copy.deepcopy(momentum), groups, admm.masks).train()
    assert shared.group_masks is admm.group_masks
    assert set(shared.state_dict()) == {
        f"stat_{i}" for i in range(len(shared.buffer_names))
    }
    x = torch.randn(6, 3, 8, 8)
    for _ in range(3):
        shared(x)
        copied(x)
    with torch.no_grad():
        for p in tiny_net.parameters():
            p.add_(torch.randn_like(p))
    assert admm.update(tiny_net) > 0
    shared.follow_masks()
    copied.set_masks(admm.masks)
    for name, value in shared.buffers_dict().items():
        assert torch.equal(value, copied.buffers_dict()[name]), name
    for mode in (True, False):
        shared.train(mode)
        copied.train(mode)
        with torch.no_grad():
            assert torch.equal(shared(x), copied(x))


# --- the MCP checkpoint -------------------------------------------------------------
def _old_layout(state: dict[str, torch.Tensor], num_groups: int) -> dict:
    """The state_dict layout before the mask had one home: the subnet's copy too."""
    old = dict(state)
    for g in range(num_groups):
        old[f"subnet.mask_{g}"] = state[f"admm.mask_{g}"].clone()
    return old


def test_mcp_saves_the_masks_once_and_loads_the_old_layout() -> None:
    torch.manual_seed(0)
    model = MCP(**TINY, pruning_ratio=0.5)
    with torch.no_grad():  # masks that differ from a fresh model's
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    model.admm.update(model.backbone)
    model.subnet.follow_masks()
    model.eval()
    state = model.state_dict()
    num_groups = len(model.groups)
    assert [k for k in state if "mask" in k] == [
        f"admm.mask_{g}" for g in range(num_groups)
    ]
    assert model.subnet.group_masks is model.admm.group_masks

    old = _old_layout(state, num_groups)
    torch.manual_seed(1)
    fresh = MCP(**TINY, pruning_ratio=0.5)
    assert any(
        not torch.equal(a, b) for a, b in zip(fresh.admm.masks, model.admm.masks)
    )
    fresh.load_state_dict(old)  # strict
    fresh.eval()
    for a, b in zip(fresh.subnet.masks, model.subnet.masks):
        assert torch.equal(a, b)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh.subnet(x), model.subnet(x))
        assert torch.equal(
            fresh.compact_momentum_subnet().eval()(x),
            model.compact_momentum_subnet().eval()(x),
        )
    assert torch.equal(
        fresh.admm.support_penalty(fresh.backbone),
        model.admm.support_penalty(model.backbone),
    )

    # The loader export and evaluation use reads the old layout too.
    data = {"state_dict": old, "hyper_parameters": dict(model.hparams)}
    rebuilt = module_from_checkpoint(data, "old.ckpt")
    assert isinstance(rebuilt, MCP)
    rebuilt.eval()
    for a, b in zip(rebuilt.admm.masks, model.admm.masks):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(rebuilt.subnet(x), model.subnet(x))

    # A checkpoint from before round_to rebuilds with the counts it was trained
    # with (round_to 1), not MCP's default.
    del data["hyper_parameters"]["round_to"]
    legacy = module_from_checkpoint(data, "old.ckpt")
    assert isinstance(legacy, MCP)
    assert legacy.hparams["round_to"] == 1 and legacy.admm.round_to == 1


@pytest.mark.parametrize("round_to", [3, 4])
def test_aligned_masks_keep_whole_units_and_compact_exactly(round_to: int) -> None:
    # Units of 2 tied channels in groups of 8: multiples of lcm(2, round_to).
    torch.manual_seed(0)
    net = GroupedConvNet().eval()
    groups = _groups(net)
    params = dict(net.named_parameters())
    step = 6 if round_to == 3 else 4
    for masks in (
        GroupMasks.leading(groups, 0.5, round_to),
        GroupMasks.random(groups, 0.5, seed=1, round_to=round_to),
        GroupMasks.top_k(groups, 0.5, params, round_to),
        project_onto_channel_budget(params, groups, 0.5, round_to)[1],
    ):
        assert masks.kept_channels() == [step] * len(groups)  # nearest to 4
        masks.check_compactable()  # whole units
        small = compact(net, groups, masks, EXAMPLE)
        subnet = MomentumSubnet(net, groups, masks)
        x = torch.randn(2, *EXAMPLE.shape[1:])
        with torch.no_grad():
            assert torch.allclose(small(x), subnet(x), atol=1e-5)
