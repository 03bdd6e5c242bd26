from __future__ import annotations

import threading
import time

import pytest
import timm
import torch
import torchvision
from torch import nn

from lightly_mcp.errors import InputError
from lightly_mcp.methods.backbones import build_backbone
from lightly_mcp.pruning.groups import (
    NoPrunableGroupsError,
    UnsupportedBackboneError,
    align_kept_channels,
    call_with_time_limit,
    num_kept_channels,
)
from lightly_mcp.pruning.masks import masked_tensors
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from tests.conftest import (
    ConcatNet,
    CrossStageNet,
    GroupedConvNet,
    TinyConvNet,
    randomize_batchnorm,
)
from tests.helpers import MAX_MESSAGE, message_length


def test_tiny_net_groups_cover_coupled_channels(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    by_root = {g.root: g for g in groups}
    # The residual add couples the stem and the block outputs, and the depthwise
    # conv ties its channels to them too: one group of 8 channels.
    residual = [g for g in groups if "stem.0.weight" in g.param_names]
    assert len(residual) == 1
    assert set(residual[0].param_names) == {
        "stem.0.weight",
        "stem.0.bias",
        "stem.1.weight",
        "stem.1.bias",
        "block.0.weight",
        "block.1.weight",
        "block.1.bias",
        "dw.weight",
        "dw.bias",
        "dw_bn.weight",
        "dw_bn.bias",
    }
    assert residual[0].num_channels == 8
    # The head's output is the network output: kept by default.
    assert all("head.weight" not in g.param_names for g in groups)
    assert by_root["expand"].num_channels == 12
    # Every member parameter belongs to exactly one group.
    names = [n for g in groups for n in g.param_names]
    assert len(names) == len(set(names))


def test_keep_output_dim_false_includes_output_group(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(
        tiny_net, torch.randn(1, 3, 8, 8), keep_output_dim=False
    )
    assert any("head.weight" in g.param_names for g in groups)


def test_tracing_restores_mode_and_requires_grad() -> None:
    net = TinyConvNet().train()
    net.block.requires_grad_(False)
    net.expand_bn.eval()
    find_channel_groups(net, torch.randn(1, 3, 8, 8))
    assert net.training and net.block.training and not net.expand_bn.training
    assert not any(p.requires_grad for p in net.block.parameters())
    assert all(p.requires_grad for p in net.stem.parameters())


def test_frozen_backbone_still_has_groups() -> None:
    net = TinyConvNet().requires_grad_(False)
    assert len(find_channel_groups(net, torch.randn(1, 3, 8, 8))) == 2


def test_tracing_does_not_touch_batchnorm_statistics(tiny_net: nn.Module) -> None:
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    find_channel_groups(tiny_net.train(), torch.randn(2, 3, 8, 8))
    for key, value in tiny_net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_resnet18_residual_groups() -> None:
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()
    groups = find_channel_groups(backbone)
    # layer1's residual group ties conv1/bn1 of the stem and all layer1 blocks.
    stem = [g for g in groups if "bn1.bias" in g.param_names][0]
    assert stem.num_channels == 64
    assert "layer1.0.bn2.weight" in stem.param_names
    assert "layer1.1.bn2.bias" in stem.param_names
    # The last residual group reaches the output and is kept (512-d features).
    assert all("layer4.1.bn2.weight" not in g.param_names for g in groups)


def test_attention_model_is_refused_clearly() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            return self.proj(att @ v).mean(1)

    with pytest.raises(NoPrunableGroupsError, match="attention models"):
        find_channel_groups(Attention(), torch.randn(1, 4, 16))


def test_timm_vit_is_refused_clearly() -> None:
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=16, depth=1
    )
    with pytest.raises(NoPrunableGroupsError, match="not supported yet"):
        find_channel_groups(vit, torch.randn(1, 3, 32, 32))


def test_network_with_only_layernorm_channels_has_no_groups() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    with pytest.raises(NoPrunableGroupsError, match="no prunable channel group"):
        find_channel_groups(net, torch.randn(2, 8))


@pytest.mark.parametrize(
    "channels, ratio, expected",
    [
        (10, 0.0, 10),
        (10, 0.3, 7),
        (10, 0.73, 3),
        (1, 0.5, 1),
        (3, 0.99, 1),
        (64, 0.5, 32),
    ],
)
def test_num_kept_channels(channels: int, ratio: float, expected: int) -> None:
    assert num_kept_channels(channels, ratio) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_ratio_names_argument_and_range(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"pruning_ratio must be in \[0, 1\)"):
        num_kept_channels(10, ratio)


@pytest.mark.parametrize(
    "channels, kept, multiple, expected",
    [
        (192, 154, 8, 152),  # the nearest multiple
        (192, 156, 8, 160),  # a tie: the larger
        (16, 13, 8, 16),  # never above the group
        (16, 3, 8, 8),  # never below the multiple
        (8, 4, 8, 8),
        (20, 18, 8, 20),  # the whole group when it is not a multiple
        (20, 13, 8, 16),
        (4, 2, 8, 2),  # smaller than the multiple: as requested
        (10, 7, 1, 7),  # no alignment
    ],
)
def test_align_kept_channels_rule(
    channels: int, kept: int, multiple: int, expected: int
) -> None:
    assert align_kept_channels(channels, kept, multiple) == expected


def test_num_kept_aligns_whole_units_and_checks_round_to() -> None:
    groups = find_channel_groups(GroupedConvNet(), randn_8())
    for group in groups:  # 8 channels, units of 2
        assert group.num_kept(0.5, 1) == group.num_kept(0.5) == 4
        assert group.num_kept(0.3, 4) == 8  # 6 requested: 4 and 8 tie
        assert group.num_kept(0.5, 3) == 6  # multiples of lcm(2, 3) = 6
        assert group.num_kept(0.7, 8) == 8  # never below round_to
        # A group smaller than round_to cannot be aligned: the requested count.
        assert group.num_kept(0.5, 16) == 4
    for bad in (0, -8, 2.5, True):
        with pytest.raises(
            InputError, match=r"round_to must be an integer >= 1 \(1: no alignment\)"
        ):
            groups[0].num_kept(0.5, bad)  # type: ignore[arg-type]


def test_masked_tensors_zero_exactly_dropped_channels(tiny_net: nn.Module) -> None:
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8))
    params = dict(tiny_net.named_parameters())
    masks = [torch.arange(g.num_channels) % 2 == 0 for g in groups]
    masked = masked_tensors(params, groups, masks)
    for group, mask in zip(groups, masks):
        for member in group.members:
            tensor = masked[member.param_name].movedim(member.dim, 0)
            assert torch.all(tensor[~mask] == 0)
            original = params[member.param_name].movedim(member.dim, 0)
            assert torch.equal(tensor[mask], original[mask])


def test_keep_output_dim_drops_exactly_the_output_group() -> None:
    backbone = torchvision.models.mobilenet_v2()
    backbone.classifier = nn.Identity()
    kept = find_channel_groups(backbone)
    every = find_channel_groups(backbone, keep_output_dim=False)
    assert len(every) == len(kept) + 1
    (output_group,) = set(every) - set(kept)
    assert output_group.root == "features.18.0"
    assert output_group.num_channels == 1280


def test_weight_standardised_convolution_is_refused_before_tracing() -> None:
    backbone = build_backbone("timm/nf_resnet26")
    with pytest.raises(UnsupportedBackboneError) as error:
        find_channel_groups(backbone, torch.randn(1, 3, 32, 32))
    message = str(error.value)
    assert message.startswith(
        "timm/nf_resnet26 cannot be pruned exactly by MCP: weight-standardised "
        "convolution in net.stem.conv; use another, e.g. torchvision/resnet18."
    )
    assert message_length(message) <= MAX_MESSAGE
    assert "\n" not in message


def test_time_limit_refuses_a_pathological_graph_and_restores_the_model() -> None:
    # Tracing rexnet takes about a second (torch-pruning's own group search on its
    # sliced residuals ran for minutes): far longer than 0.05 s.
    backbone = build_backbone("timm/rexnet_100").train()
    backbone.net.stem.requires_grad_(False)
    # Traced before in this process (the backbone zoo, on the same pytest worker),
    # its groups would be reused without tracing, and nothing would time out.
    from lightly_mcp.pruning import prunable_groups

    prunable_groups.clear_traced_groups()
    start = time.perf_counter()
    with pytest.raises(
        UnsupportedBackboneError, match="took longer than 0.05 s of CPU time"
    ):
        find_channel_groups(backbone, torch.randn(1, 3, 32, 32), time_limit=0.05)
    assert time.perf_counter() - start < 20
    assert all(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.net.stem.parameters())
    assert all(p.requires_grad for p in backbone.net.features.parameters())


def test_call_with_time_limit_interrupts_loops_in_any_thread() -> None:
    outcome: list[object] = []

    def spin() -> None:
        while True:
            pass

    def worker() -> None:
        assert call_with_time_limit(lambda: 7, 5.0) == 7
        try:
            call_with_time_limit(spin, 0.2)
        except TimeoutError as error:
            outcome.append(str(error))
        time.sleep(0.3)  # no late interruption once the call has returned
        outcome.append("done")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=10)
    assert outcome == ["took longer than 0.2 s of CPU time", "done"]


def test_the_time_limit_counts_cpu_time_not_waiting() -> None:
    """A call that waits (a loaded machine, a low priority) is not interrupted: only
    the calling thread's CPU time counts."""

    def wait_then_return() -> int:
        time.sleep(0.5)
        return 7

    assert call_with_time_limit(wait_then_return, 0.2) == 7


class _ChannelRoll(nn.Module):
    """Moves every channel to the next position: masking and removal differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x))).roll(1, dims=1)
        return self.pool(self.conv2(x)).flatten(1)


class _FixedFilter(nn.Module):
    """A depthwise blur with a fixed (buffer) filter, as timm's BlurPool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("blur", torch.ones(8, 1, 3, 3) / 9)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.conv2d(self.conv1(x), self.blur, padding=1, groups=8)
        return self.conv2(x).mean((2, 3))


@pytest.mark.parametrize(
    "net, reason",
    [
        (_ChannelRoll, "the pruned network differs from the masked one by"),
        (_FixedFilter, "pruning fails with RuntimeError: Given groups=8"),
    ],
)
def test_groups_that_do_not_prune_exactly_are_refused_by_name(
    net: type[nn.Module], reason: str
) -> None:
    with pytest.raises(UnsupportedBackboneError) as error:
        find_channel_groups(net(), torch.randn(1, 3, 8, 8))
    message = str(error.value)
    assert message.startswith(
        f"{net.__name__} cannot be pruned exactly by MCP: removing channels of the "
        f"group of conv1 is not exact ({reason}"
    )
    # Without the check the groups are found (and would prune wrongly).
    assert [g.root for g in find_channel_groups(net(), check=False)] == ["conv1"]


def test_the_check_judges_the_architecture_not_the_weights_and_keeps_the_rng(
    tiny_net: nn.Module,
) -> None:
    # Trained weights can overflow in a forward pass (a 2-step pretraining of
    # MobileNetV2 at 16 px left 1e10 in a depthwise convolution): the check uses
    # random weights of its own, so such a model is not refused for that.
    with torch.no_grad():
        first = next(m for m in tiny_net.modules() if isinstance(m, nn.Conv2d))
        first.weight.fill_(float("inf"))
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    groups = find_channel_groups(tiny_net, torch.randn(1, 3, 8, 8, generator=None))
    after_example = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    torch.randn(1, 3, 8, 8)
    # The check drew nothing from the global generator (only the example did).
    assert torch.equal(torch.random.get_rng_state(), after_example)
    assert len(groups) >= 1
    assert torch.isinf(first.weight).all()  # the model itself is untouched


def test_large_backbones_are_checked_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightly_mcp.pruning import prunable_groups

    monkeypatch.setattr(prunable_groups, "CHECK_FLOAT64_MAX_PARAMETERS", 10)
    assert len(find_channel_groups(TinyConvNet(), torch.randn(1, 3, 8, 8))) == 2
    with pytest.raises(UnsupportedBackboneError, match="differs from the masked one"):
        find_channel_groups(_ChannelRoll(), torch.randn(1, 3, 8, 8))


def test_backbone_that_does_not_run_on_the_example_is_a_value_error() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 5), nn.Conv2d(8, 8, 5))
    with pytest.raises(ValueError, match=r"Sequential does not run on inputs of shape"):
        find_channel_groups(net, torch.randn(1, 3, 4, 4))


def test_grouped_convolution_ties_the_same_position_of_every_group() -> None:
    groups = {g.root: g for g in find_channel_groups(GroupedConvNet(), randn_8())}
    assert set(groups) == {"conv1", "conv2"}
    for group in groups.values():
        # Channel i and i + 4 sit at the same position of the two conv groups.
        assert group.units == ((0, 4), (1, 5), (2, 6), (3, 7))
        assert group.num_units == 4 and group.unit_size == 2
        assert group.num_kept(0.5) == 4
        assert group.num_kept(0.3) == 6  # 3 of 4 positions
        scores = torch.tensor([9.0, 0, 0, 5, 0, 1, 1, 0])  # units: 9, 1, 1, 5
        assert group.top_mask(scores, 4).tolist() == [1, 0, 0, 1, 1, 0, 0, 1]
        assert group.splits_units(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]).bool())
        assert not group.splits_units(group.top_mask(scores, 4))


def test_compaction_refuses_a_mask_that_splits_tied_channels() -> None:
    from lightly_mcp.pruning.compaction import compact

    net = GroupedConvNet()
    groups = find_channel_groups(net, randn_8())
    masks = [torch.ones(8, dtype=torch.bool) for _ in groups]
    masks[0][0] = False  # channel 0 without channel 4
    with pytest.raises(ValueError, match="keeps part of a set of tied channels"):
        compact(net, groups, masks, randn_8())


def test_norm_after_a_concatenation_carries_slices_of_two_groups() -> None:
    groups = {g.root: g for g in find_channel_groups(ConcatNet(), randn_8())}
    assert set(groups) == {"conv_a", "conv_b"}

    def norm_index(root: str) -> tuple[int, ...]:
        (member,) = [m for m in groups[root].members if m.param_name == "norm.weight"]
        return member.channel_index

    assert norm_index("conv_a") == (0, 1, 2, 3)
    assert norm_index("conv_b") == (4, 5, 6, 7, 8, 9)
    # Masking keeps the other group's slice of the shared parameter.
    net = ConcatNet()
    params = dict(net.named_parameters())
    ordered = [groups["conv_a"], groups["conv_b"]]
    masks = [torch.tensor([1, 0, 1, 0]).bool(), torch.tensor([0, 0, 1, 1, 1, 0]).bool()]
    masked = masked_tensors(params, ordered, masks)
    kept = [0, 2, 6, 7, 8]
    expected = torch.zeros(10)
    expected[kept] = params["norm.weight"][kept].detach()
    assert torch.equal(masked["norm.weight"], expected)


def test_groups_behind_a_split_with_several_consumers_per_chunk() -> None:
    """torch-pruning maps split consumers to chunks by their order; autograd knows."""
    net = CrossStageNet()
    groups = {g.root: g for g in find_channel_groups(net, randn_8())}
    # conv_exp's second half is tied to the block's residual: only partly coupled,
    # so it stays whole; the block's group reaches conv_exp's channels 4..7.
    assert set(groups) == {"block.0"}
    index = {m.param_name: m.channel_index for m in groups["block.0"].members}
    assert index["block.0.weight"] == (0, 1, 2, 3)
    assert index["conv_exp.weight"] == (4, 5, 6, 7)
    assert index["bn_exp.bias"] == (4, 5, 6, 7)


def randn_8() -> torch.Tensor:
    return torch.randn(1, 3, 8, 8)


class _DenseTail(nn.Module):
    """The features are a norm layer after a concatenation: two groups reach them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_a(x)
        x = self.norm(torch.cat([a, self.conv_b(torch.relu(a))], dim=1))
        return torch.relu(x).mean((2, 3))


def test_output_features_from_a_concatenation_of_two_groups() -> None:
    from lightly_mcp.pruning.compaction import compact
    from lightly_mcp.pruning.masks import output_feature_index
    from lightly_mcp.pruning.momentum_subnet import MomentumSubnet

    torch.manual_seed(0)
    net = randomize_batchnorm(_DenseTail()).double().eval()
    example = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(NoPrunableGroupsError):  # both groups reach the output
        find_channel_groups(net, example)
    groups = find_channel_groups(net, example, keep_output_dim=False)
    by_root = {g.root: g for g in groups}
    assert by_root["conv_a"].output_features == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert by_root["conv_b"].output_features == tuple((c, 4 + c) for c in range(6))
    masks = [torch.tensor([1, 0, 0, 1]).bool(), torch.tensor([0, 1, 1, 0, 0, 1]).bool()]
    masks = masks if groups[0].root == "conv_a" else masks[::-1]
    kept, dropped = output_feature_index(groups, masks, 10)
    assert kept.tolist() == [0, 3, 5, 6, 9]
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        masked = MomentumSubnet(net, groups, masks).eval()(x)
        pruned = compact(net, groups, masks, example).eval()(x)
    assert pruned.shape == (3, 5)
    assert torch.allclose(masked[:, kept], pruned, atol=1e-12)
    assert torch.all(masked[:, dropped] == 0)


class _EqualChunks(nn.Module):
    """Res2Net's pattern: a layer's channels split into equal chunks of fixed size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.conv3 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.relu(self.bn1(self.conv1(x))).chunk(2, dim=1)
        x = torch.cat([conv(c) for conv, c in zip(self.convs, chunks)], dim=1)
        return self.conv3(torch.relu(x)).mean((2, 3))


def test_a_split_into_equal_chunks_ties_the_same_position_of_every_chunk() -> None:
    groups = {g.root: g for g in find_channel_groups(_EqualChunks(), randn_8())}
    assert groups["conv1"].units == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert groups["conv1"].num_kept(0.5) == 4
    assert groups["convs.0"].units == ()  # one chunk's own group


# --- the traced groups are reused per architecture ----------------------------------
def test_a_replaced_forward_or_a_hook_is_traced_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightly_mcp.pruning import prunable_groups

    key = prunable_groups.architecture_key
    x = torch.randn(1, 3, 8, 8)
    plain = key(TinyConvNet(), x)
    assert plain is not None and plain == key(TinyConvNet(), x)
    replaced = TinyConvNet()

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        return TinyConvNet.forward(replaced, inputs)

    replaced.forward = forward  # type: ignore[method-assign]
    assert key(replaced, x) not in (None, plain)
    hooked = TinyConvNet()
    hooked.dw.register_forward_hook(lambda module, inputs, output: output * 0)
    assert key(hooked, x) is None
    strided = TinyConvNet()
    strided.dw.stride = (2, 2)
    assert key(strided, x) != plain
    assert key(TinyConvNet(), torch.randn(2, 3, 8, 8)) != plain


def test_an_architecture_is_traced_once_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run builds its backbone several times (preflight, MCP, export, evaluation):
    the second build of the same architecture reuses the groups, whatever the
    weights; another input size traces again."""
    from lightly_mcp.pruning import prunable_groups

    prunable_groups.clear_traced_groups()
    calls: list[tuple[int, ...]] = []
    trace = prunable_groups.trace_channel_groups

    def counting(model: nn.Module, inputs: torch.Tensor, *args: object) -> list:
        calls.append(tuple(inputs.shape))
        return trace(model, inputs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(prunable_groups, "trace_channel_groups", counting)
    first = find_channel_groups(TinyConvNet(), torch.randn(1, 3, 8, 8))
    torch.manual_seed(5)
    again = find_channel_groups(TinyConvNet(), torch.randn(1, 3, 8, 8))
    assert calls == [(1, 3, 8, 8)] and again == first and again is not first
    find_channel_groups(TinyConvNet(), torch.randn(1, 3, 12, 12))
    assert calls == [(1, 3, 8, 8), (1, 3, 12, 12)]
    prunable_groups.clear_traced_groups()


def test_the_command_line_shows_the_progress_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from lightly_mcp.app.cli import _progress_log

    logger = logging.getLogger("lightly_mcp.pruning.prunable_groups")
    with _progress_log(True):
        logger.info("tracing [x]")
    with _progress_log(False):  # --quiet
        logger.info("not shown")
    logger.info("not shown either")
    assert capsys.readouterr().out == "tracing [x]\n"
