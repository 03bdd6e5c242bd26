from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from lightly_mcp.methods.backbones import build_backbone
from lightly_mcp.pruning.admm import ADMMRegularizer, project_onto_channel_budget
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import ChannelGroup, channel_scores
from lightly_mcp.pruning.masks import GroupMasks, parameter_multipliers
from lightly_mcp.pruning.measure import count_parameters
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from lightly_mcp.pruning.pruning_ratio import removed_fraction, solve_pruning_ratio
from tests.conftest import (
    ConcatNet,
    GroupedConvNet,
    TinyConvNet,
    randomize_batchnorm,
)

INPUT = torch.randn(1, 3, 8, 8)


def _groups(net: nn.Module) -> list[ChannelGroup]:
    return find_channel_groups(net, INPUT)


def _brute_force_projection(
    tensors: dict[str, torch.Tensor], group: ChannelGroup, keep: int
) -> torch.Tensor:
    """Mask minimising ||x - P(x)||^2 over all subsets of `keep` channels."""
    best, best_cost = None, float("inf")
    for subset in itertools.combinations(range(group.num_channels), keep):
        mask = torch.zeros(group.num_channels, dtype=torch.bool)
        mask[list(subset)] = True
        cost = 0.0
        for member in group.members:
            t = tensors[member.param_name].movedim(member.dim, 0)
            index = torch.tensor(member.channel_index)
            cost += float(t[index[~mask]].pow(2).sum())
        if cost < best_cost:
            best, best_cost = mask, cost
    assert best is not None
    return best


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7])
def test_projection_keeps_n_g_channels_idempotent_and_optimal(
    tiny_net: nn.Module, ratio: float
) -> None:
    groups = _groups(tiny_net)
    tensors = {n: p.detach().clone() for n, p in tiny_net.named_parameters()}
    projected, masks = project_onto_channel_budget(tensors, groups, ratio)
    for group, mask in zip(groups, masks):
        assert int(mask.sum()) == group.num_kept(ratio)
        # Dropped channels are zero in every member; kept ones are unchanged.
        for member in group.members:
            out = projected[member.param_name].movedim(member.dim, 0)
            original = tensors[member.param_name].movedim(member.dim, 0)
            assert torch.all(out[~mask] == 0)
            assert torch.equal(out[mask], original[mask])
        assert torch.equal(
            mask, _brute_force_projection(tensors, group, int(mask.sum()))
        )
    again, masks_again = project_onto_channel_budget(
        {**tensors, **projected}, groups, ratio
    )
    for name in projected:
        assert torch.equal(again[name], projected[name])
    for a, b in zip(masks, masks_again):
        assert torch.equal(a, b)


def test_projection_ranks_by_all_members_including_norm_and_depthwise() -> None:
    net = TinyConvNet()
    groups = _groups(net)
    residual = [g for g in groups if "dw.weight" in g.param_names][0]
    tensors = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    # Channel 3 is large only in the depthwise filter, channel 5 only in a BN bias.
    tensors["dw.weight"][3] = 10.0
    tensors["dw_bn.bias"][5] = 10.0
    tensors["stem.0.weight"][1] = 0.1
    _, masks = project_onto_channel_budget(tensors, [residual], 0.75)
    assert masks[0].nonzero().flatten().tolist() == [3, 5]


def test_regularizer_initialises_z_as_projection_and_u_zero(
    tiny_net: nn.Module,
) -> None:
    groups = _groups(tiny_net)
    admm = ADMMRegularizer(tiny_net, groups, pruning_ratio=0.5, rho=0.1)
    params = dict(tiny_net.named_parameters())
    expected, masks = project_onto_channel_budget(params, groups, 0.5)
    for name, z in admm.z().items():
        assert torch.equal(z, expected[name])
        assert torch.count_nonzero(admm.u()[name]) == 0
    for a, b in zip(admm.masks, masks):
        assert torch.equal(a, b)
    # loss = rho/2 * sum ||theta - Z + U||^2, a reference computation:
    reference = sum((params[n] - expected[n]).pow(2).sum() for n in admm.param_names)
    assert torch.allclose(admm(tiny_net), 0.05 * reference)


def test_loss_gradient_is_rho_times_residual(tiny_net: nn.Module) -> None:
    groups = _groups(tiny_net)
    admm = ADMMRegularizer(tiny_net, groups, pruning_ratio=0.5, rho=0.2)
    admm(tiny_net).backward()
    z = admm.z()
    for name in admm.param_names:
        param = tiny_net.get_parameter(name)
        assert param.grad is not None
        assert torch.allclose(param.grad, 0.2 * (param.detach() - z[name]))
    # Parameters outside every group get no gradient from the penalty.
    assert tiny_net.get_parameter("head.weight").grad is None


def test_update_follows_admm_equations(tiny_net: nn.Module) -> None:
    groups = _groups(tiny_net)
    admm = ADMMRegularizer(tiny_net, groups, pruning_ratio=0.5, rho=0.1, rho_growth=2)
    with torch.no_grad():
        for p in tiny_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = {n: p.detach().clone() for n, p in tiny_net.named_parameters()}
    u_old = {n: u.clone() for n, u in admm.u().items()}
    old_masks = [m.clone() for m in admm.masks]
    changed = admm.update(tiny_net)
    expected_z, expected_masks = project_onto_channel_budget(
        {n: params[n] + u_old[n] for n in admm.param_names}, groups, 0.5
    )
    for name in admm.param_names:
        assert torch.allclose(admm.z()[name], expected_z[name])
        # ρ doubled after the update: the scaled dual is rescaled by ρ_old / ρ_new.
        assert torch.allclose(
            admm.u()[name], 0.5 * (u_old[name] + params[name] - expected_z[name])
        )
    assert changed == sum(
        int((a != b).sum()) for a, b in zip(old_masks, expected_masks)
    )
    assert admm.rho == pytest.approx(0.2)
    assert int(admm.num_updates) == 1


def test_fixed_mask_keeps_the_starts_mask_and_projects_onto_it(
    tiny_net: nn.Module,
) -> None:
    groups = _groups(tiny_net)
    admm = ADMMRegularizer(
        tiny_net, groups, pruning_ratio=0.5, rho=0.1, fixed_mask=True
    )
    start = [m.clone() for m in admm.masks]
    _, magnitude = project_onto_channel_budget(
        {n: p.detach() for n, p in tiny_net.named_parameters()}, groups, 0.5
    )
    assert all(torch.equal(a, b) for a, b in zip(start, magnitude))
    for _ in range(3):
        with torch.no_grad():  # moves that a new projection would follow
            for p in tiny_net.parameters():
                p.add_(2.0 * torch.randn_like(p))
        params = {n: p.detach().clone() for n, p in tiny_net.named_parameters()}
        u_old = {n: u.clone() for n, u in admm.u().items()}
        shifted = {n: params[n] + u_old[n] for n in admm.param_names}
        _, projected = project_onto_channel_budget(shifted, groups, 0.5)
        assert any(not torch.equal(a, b) for a, b in zip(projected, start))
        assert admm.update(tiny_net) == 0
        assert all(torch.equal(a, b) for a, b in zip(admm.masks, start))
        phi = parameter_multipliers(shifted, groups, start)
        for name in admm.param_names:
            expected_z = shifted[name] * phi[name]
            torch.testing.assert_close(admm.z()[name], expected_z)
            torch.testing.assert_close(admm.u()[name], shifted[name] - expected_z)
    assert "fixed_mask=True" in repr(admm)


def test_admm_drives_toy_problem_to_sparse_solution() -> None:
    torch.manual_seed(0)
    net = TinyConvNet()
    groups = _groups(net)
    x = torch.randn(16, 3, 8, 8)
    target = torch.randn(16, 6)
    admm = ADMMRegularizer(net, groups, pruning_ratio=0.5, rho=0.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    distances, changes = [], []
    for _ in range(12):
        for _ in range(25):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(net(x), target) + admm(net)
            loss.backward()
            optimizer.step()
        changes.append(admm.update(net))
        distances.append(admm.distance(net))
    assert distances[-1] < 0.2 * distances[0]
    assert changes[-3:] == [0, 0, 0]
    for group, mask in zip(groups, admm.masks):
        assert int(mask.sum()) == group.num_kept(0.5)


def test_state_dict_round_trip(tiny_net: nn.Module) -> None:
    groups = _groups(tiny_net)
    admm = ADMMRegularizer(tiny_net, groups, pruning_ratio=0.5, rho=0.1, rho_growth=1.5)
    with torch.no_grad():
        for p in tiny_net.parameters():
            p.mul_(-1.3)
    admm.update(tiny_net)
    clone = ADMMRegularizer(TinyConvNet(), groups, pruning_ratio=0.5)
    clone.load_state_dict(admm.state_dict())
    assert clone.rho == pytest.approx(0.15)
    for a, b in zip(clone.masks, admm.masks):
        assert torch.equal(a, b)
    for name in admm.param_names:
        assert torch.equal(clone.u()[name], admm.u()[name])
    assert torch.equal(clone(tiny_net), admm(tiny_net))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_ratio": 1.0}, r"pruning_ratio must be in \[0, 1\)"),
        ({"pruning_ratio": -0.5}, r"pruning_ratio must be in \[0, 1\)"),
        ({"pruning_ratio": 0.5, "rho": -1.0}, r"rho must be >= 0"),
        ({"pruning_ratio": 0.5, "rho_growth": 0.5}, r"rho_growth must be >= 1.0"),
    ],
)
def test_invalid_arguments(
    tiny_net: nn.Module, kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ADMMRegularizer(tiny_net, _groups(tiny_net), **kwargs)


def test_mismatched_encoder_is_refused(tiny_net: nn.Module) -> None:
    admm = ADMMRegularizer(tiny_net, _groups(tiny_net), pruning_ratio=0.5)
    with pytest.raises(ValueError, match="does not match the channel groups"):
        admm.update(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_set_rho_rescales_the_scaled_dual(tiny_net: nn.Module) -> None:
    admm = ADMMRegularizer(tiny_net, _groups(tiny_net), pruning_ratio=0.5, rho=0.1)
    with torch.no_grad():
        for p in tiny_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    admm.update(tiny_net)
    dual = {n: 0.1 * u.clone() for n, u in admm.u().items()}  # ρ · U
    admm.set_rho(0.4)
    assert admm.rho == pytest.approx(0.4)
    for name, u in admm.u().items():
        assert torch.allclose(0.4 * u, dual[name])  # the dual ρ·U is unchanged
    # The cached Z − U follows.
    for name, target in zip(admm.param_names, admm._targets()):
        assert torch.allclose(target, admm.z()[name] - admm.u()[name])


def test_support_penalty_pulls_only_dropped_channels_to_zero(
    tiny_net: nn.Module,
) -> None:
    admm = ADMMRegularizer(tiny_net, _groups(tiny_net), pruning_ratio=0.5, rho=0.3)
    tiny_net.zero_grad()
    admm.support_penalty(tiny_net).backward()
    for name, z in admm.z().items():
        param = tiny_net.get_parameter(name)
        assert param.grad is not None
        dropped = z == 0  # support of Z: the dropped channels' members are zero
        expected = torch.where(dropped, 0.3 * param.detach(), torch.zeros_like(param))
        assert torch.allclose(param.grad, expected, atol=1e-6), name


@pytest.mark.parametrize("net", [GroupedConvNet, ConcatNet])
def test_projection_with_tied_channels_and_shared_parameters_is_exact(
    net: type[nn.Module],
) -> None:
    """Whole units, parameters shared by two groups; subnet equals compact."""
    torch.manual_seed(0)
    encoder = randomize_batchnorm(net()).double()
    example = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    groups = find_channel_groups(encoder, example)
    admm = ADMMRegularizer(encoder, groups, pruning_ratio=0.5)
    assert len(admm.param_names) == len(set(admm.param_names))
    params = dict(encoder.named_parameters())
    for group, mask in zip(groups, admm.masks):
        assert int(mask.sum()) == group.num_kept(0.5)
        assert not group.splits_units(mask)
        # Optimal among the masks that keep whole units.
        best = min(
            itertools.combinations(range(group.num_units), group.num_units // 2),
            key=lambda units: (
                -float(
                    channel_scores(params, group)[
                        group.mask_of_units(torch.tensor(units))
                    ].sum()
                )
            ),
        )
        assert torch.equal(mask, group.mask_of_units(torch.tensor(best)))
    z = admm.z()
    for name in admm.param_names:
        kept = parameter_multipliers(params, groups, admm.masks)[name]
        assert torch.equal(z[name], params[name].detach() * kept)
    subnet = MomentumSubnet(encoder, groups, admm.masks).eval()
    small = compact(encoder, groups, admm.masks, example).eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        masked_out, compact_out = subnet(x), small(x)
    assert (masked_out - compact_out).abs().max() <= 1e-10 * masked_out.abs().max()
    assert count_parameters(small) < count_parameters(encoder)


@pytest.fixture(scope="module")
def mobilenet_v2() -> tuple[nn.Module, list[ChannelGroup]]:
    """The quickstart's backbone (MobileNetV2 width 0.5, small-input stem), at 16 px."""
    torch.manual_seed(0)
    net = build_backbone(
        "torchvision/mobilenet_v2", small_input=True, width_multiplier=0.5
    )
    return net, find_channel_groups(net, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.76])
def test_aligned_projection_keeps_multiples_within_the_parameter_budget(
    mobilenet_v2: tuple[nn.Module, list[ChannelGroup]], ratio: float
) -> None:
    net, groups = mobilenet_v2
    example = torch.randn(1, 3, 16, 16)
    admm = ADMMRegularizer(net, groups, ratio, rho=1.0, round_to=8)
    with torch.no_grad():  # a θ far from Z: the update projects anew
        theta = {n: p + torch.randn_like(p) for n, p in net.named_parameters()}
    moved = copy.deepcopy(net)
    moved.load_state_dict(theta, strict=False)
    admm.update(moved)
    assert all(g.num_channels >= 8 for g in groups)
    for masks in (admm.group_masks, GroupMasks.leading(groups, ratio, 8)):
        kept = masks.kept_channels()
        assert all(k % 8 == 0 for k in kept), kept
        # The nearest multiple (at most half a step from n_g), or 8 at the least.
        assert all(
            abs(k - g.num_kept(ratio)) <= 4 or k == 8 for k, g in zip(kept, groups)
        )
    # The removed parameters stay within 1.5 points of the unaligned ratio's.
    requested = removed_fraction(net, groups, ratio, "params", 16, example)
    small = compact(net, groups, admm.group_masks, example)
    removed = 1 - count_parameters(small) / count_parameters(net)
    assert abs(removed - requested) < 0.015, (removed, requested)
    assert removed == removed_fraction(net, groups, ratio, "params", 16, example, 8)
    # The masked subnet is the compact network, in train and eval mode (float64:
    # train-mode BatchNorm over 4 small maps is ill-conditioned).
    net64 = copy.deepcopy(net).double()
    subnet = MomentumSubnet(net64, groups, admm.group_masks)
    small = compact(net64, groups, admm.group_masks, example.double())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for train in (False, True):
        subnet.train(train)
        small.train(train)
        with torch.no_grad():
            masked, pruned = subnet(x), small(x)
        scale = float(masked.abs().max())
        assert float((masked - pruned).abs().max()) <= 1e-9 * scale, train


def test_aligned_ratio_solved_for_a_parameter_target_meets_it(
    mobilenet_v2: tuple[nn.Module, list[ChannelGroup]],
) -> None:
    net, groups = mobilenet_v2
    example = torch.randn(1, 3, 16, 16)
    ratio = solve_pruning_ratio(
        net, groups, 0.6, "params", 16, example, tolerance=0.01, round_to=8
    )
    removed = removed_fraction(net, groups, ratio, "params", 16, example, 8)
    assert 0.6 <= removed < 0.63
    assert all(g.num_kept(ratio, 8) % 8 == 0 for g in groups)
