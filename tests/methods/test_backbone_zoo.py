"""The backbone zoo: timm and torchvision CNNs by name, pruned at r = 0.5 at 32 px.

Every architecture either prunes exactly (the masked momentum subnet equals the
physically pruned network, in float64, in train and eval mode) or is refused when
its channel groups are traced, before any training, with a message naming the
construct. The families: plain, residual, inverted residual, grouped, concatenating,
split, SE/attention-gated, re-parameterisable.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from lightly_mcp.app.cli import main
from lightly_mcp.methods.backbones import build_backbone
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.pruning.admm import ADMMRegularizer
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import (
    WORKING_BACKBONES,
    NoPrunableGroupsError,
    UnsupportedBackboneError,
)
from lightly_mcp.pruning.measure import count_parameters
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from tests.conftest import randomize_batchnorm
from tests.helpers import MAX_MESSAGE, message_length
from tests.tiny import write_tiny

SIZE = 32

# name -> family; each prunes exactly.
EXACT: dict[str, str] = {
    "timm/repvgg_a0": "plain, re-parameterisable",
    "timm/mobilenetv1_100": "plain (depthwise separable)",
    "torchvision/resnet18": "residual",
    "timm/resnet10t": "residual",
    "timm/darknet17": "residual",
    "timm/seresnet18": "residual, SE-gated",
    "timm/resnetblur18": "residual, anti-aliased (blur pool)",
    "torchvision/mobilenet_v2": "inverted residual",
    "torchvision/mobilenet_v3_small": "inverted residual, SE-gated",
    "torchvision/efficientnet_b0": "inverted residual, SE-gated",
    "timm/mobilenetv3_large_100": "inverted residual, SE-gated",
    "timm/mobilenetv4_conv_small": "inverted residual",
    "timm/lcnet_050": "inverted residual, SE-gated",
    "timm/mnasnet_small": "inverted residual",
    "timm/tinynet_e": "inverted residual, SE-gated",
    "timm/resnext26ts": "grouped",
    "timm/regnetx_002": "grouped",
    "timm/regnety_002": "grouped, SE-gated",
    "torchvision/regnet_x_400mf": "grouped",
    "timm/dpn48b": "grouped, concatenating",
    "torchvision/resnext50_32x4d": "grouped, residual",
    "timm/cspresnet50": "split (cross-stage partial), concatenating",
    "timm/cspresnext50": "split (cross-stage partial), grouped",
    "timm/cs3darknet_s": "split (cross-stage partial), concatenating",
    "timm/mixnet_s": "split (mixed depthwise convolutions), SE-gated",
    "timm/res2net50_26w_4s": "split (res2net: equal chunks), residual",
    "torchvision/googlenet": "concatenating",
    "torchvision/squeezenet1_1": "concatenating",
    "torchvision/densenet121": "concatenating",
    "timm/ese_vovnet19b_dw": "concatenating, SE-gated",
    "timm/dla46_c": "concatenating, residual",
    "timm/ghostnet_100": "split (concatenation and slice), SE-gated",
    "timm/repghostnet_050": "split, re-parameterisable",
    "timm/hrnet_w18_small": "multi-resolution, residual",
    "timm/convnext_atto": "residual, LayerNorm (only its MLP channels prune)",
    "timm/rexnet_100": "inverted residual on a channel slice, SE-gated",
    "timm/gcresnet33ts": "residual, global-context-gated",
    "timm/skresnet18": "split (selective kernel), attention-gated, residual",
}

# name -> (time limit, the refusal's construct)
REFUSED: dict[str, tuple[float, str]] = {
    "timm/nf_resnet26": (60.0, "weight-standardised convolution in net.stem.conv"),
    "timm/ecaresnet26t": (60.0, "ECA channel attention in net.layer1.0.se"),
    "torchvision/shufflenet_v2_x0_5": (
        60.0,
        "torch-pruning cannot trace its channel reshape (e.g. a channel shuffle)",
    ),
    # A scalar learnable bias after the activation (LearnableAffineBlock, 0 at
    # init) puts a value on every dropped channel once trained.
    "timm/hgnetv2_b0": (
        60.0,
        "group of net.stages.0.blocks.0.aggregation.0.conv is not exact",
    ),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_zoo_prunes_exactly(name: str) -> None:
    torch.manual_seed(0)
    backbone = randomize_batchnorm(build_backbone(name)).double()
    example = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    groups = find_channel_groups(backbone, example)
    admm = ADMMRegularizer(backbone, groups, pruning_ratio=0.5)
    for group, mask in zip(groups, admm.masks):
        assert int(mask.sum()) == group.num_kept(0.5)
    compact_backbone = compact(backbone, groups, admm.masks, example)
    assert count_parameters(compact_backbone) < 0.9 * count_parameters(backbone)
    subnet = MomentumSubnet(backbone, groups, admm.masks)
    # Batch 4: train-mode BatchNorm over 2 values of a 1x1 map is ill-conditioned.
    x = torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64)
    for train in (False, True):
        subnet.train(train)
        compact_backbone.train(train)
        with torch.no_grad():  # the same draws for stochastic depth and dropout
            torch.manual_seed(1)
            masked = subnet(x)
            torch.manual_seed(1)
            pruned = compact_backbone(x)
        scale = float(masked.abs().max())
        assert scale > 1e-3
        assert float((masked - pruned).abs().max()) <= 1e-5 * scale, (name, train)


@pytest.mark.parametrize("name", list(REFUSED))
def test_zoo_refuses_with_the_construct(name: str) -> None:
    time_limit, construct = REFUSED[name]
    backbone = build_backbone(name)
    example = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(UnsupportedBackboneError) as error:
        find_channel_groups(backbone, example, time_limit=time_limit)
    message = str(error.value)
    assert re.match(
        rf"{re.escape(name)} cannot be pruned exactly by MCP: .*"
        rf"{re.escape(construct)}.*; use another, e\.g\. torchvision/resnet18\.$",
        message,
    ), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, layer",
    [
        (
            "timm/lambda_resnet26t",
            "timm/lambda_resnet26t contains attention layers (net.stages.2.1.self_attn",
        ),
        ("timm/vit_tiny_patch16_224", "(net.blocks.0.attn (Attention))"),
        ("torchvision/vit_b_16", "MultiheadAttention"),
    ],
)
def test_attention_models_are_refused_at_once(name: str, layer: str) -> None:
    with torch.device("meta"):
        backbone = build_backbone(name)
    with pytest.raises(NoPrunableGroupsError, match=re.escape(layer)):
        find_channel_groups(backbone, torch.empty(1, 3, SIZE, SIZE, device="meta"))


@pytest.mark.parametrize(
    "name, construct",
    [
        ("timm/nf_resnet26", "weight-standardised convolution in net.stem.conv"),
        ("torchvision/shufflenet_v2_x0_5", "cannot trace its channel reshape"),
    ],
)
def test_mcp_refuses_at_construction(name: str, construct: str) -> None:
    with pytest.raises(UnsupportedBackboneError, match=re.escape(construct)):
        MCP(
            backbone=name,
            pruning_ratio=0.5,
            input_size=SIZE,
            batch_size_per_device=4,
            memory_bank_size=16,
        )


def test_mcp_builds_on_a_grouped_backbone_with_whole_units() -> None:
    model = MCP(
        backbone="timm/regnetx_002",
        pruning_ratio=0.5,
        round_to=8,
        input_size=SIZE,
        batch_size_per_device=4,
        memory_bank_size=16,
    )
    tied = [g for g in model.groups if g.units]
    assert tied
    for group, mask in zip(model.groups, model.admm.masks):
        assert not group.splits_units(mask)
        assert int(mask.sum()) == group.num_kept(0.5, 8)  # aligned counts
    assert model.kept_parameter_fraction < 0.6
    # Where whole units leave no multiple of 8 below the group's size (units of 3:
    # multiples of 24 in a group of 24), the group keeps n_g, unaligned, not all.
    odd = [
        (g, m)
        for g, m in zip(model.groups, model.admm.masks)
        if g.unit_size % 8 and math.lcm(g.unit_size, 8) >= g.num_channels
    ]
    assert odd
    for group, mask in odd:
        assert int(mask.sum()) == group.num_kept(0.5) < group.num_channels


def test_refusals_name_backbones_the_zoo_checks() -> None:
    named = WORKING_BACKBONES.split(", ")
    assert len(named) >= 5
    assert set(named) <= set(EXACT)


def test_zoo_covers_the_families() -> None:
    assert len(EXACT) + len(REFUSED) >= 25
    assert len(EXACT) >= 0.9 * (len(EXACT) + len(REFUSED))
    families = " ".join(EXACT.values())
    for family in (
        "plain",
        "residual",
        "inverted residual",
        "grouped",
        "concatenating",
        "split",
        "SE-gated",
        "re-parameterisable",
    ):
        assert family in families, family


def test_cli_refuses_an_unprunable_backbone_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_tiny(
        tmp_path,
        {"backbone.name": "timm/nf_resnet26", "backbone.width_multiplier": None},
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "lightly-mcp: error: prune stage (preflight; nothing written): "
        "timm/nf_resnet26 cannot be "
        "pruned exactly by MCP: weight-standardised convolution in net.stem.conv"
    )
    assert message_length(lines[0]) <= MAX_MESSAGE
    assert not out.exists()


@pytest.mark.parametrize(
    "name", ["timm/regnetx_002", "timm/dla46_c"], ids=["grouped", "concatenating"]
)
def test_cli_runs_end_to_end_on_grouped_and_concatenating_backbones(
    tmp_path: Path, name: str
) -> None:
    recipe = write_tiny(
        tmp_path,
        {
            "backbone.name": name,
            "backbone.width_multiplier": None,
            "backbone.small_input": True,
        },
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["backbone"] == name
    assert report["compact"]["params"] < report["dense"]["params"]
    # The export gates on float64 (structure); the float32 error it reports is
    # rounding of the folded weights, amplified by the BatchNorm statistics of two
    # steps on 16 tiny images (up to ~1e-4 of the output scale here).
    assert report["equivalence_max_abs_err"] <= 1e-3 * max(
        1.0, report["equivalence_output_scale"]
    )
    models = json.loads((out / "eval" / "eval.json").read_text())["models"]
    assert models["subnet"]["knn_top1"] == pytest.approx(models["compact"]["knn_top1"])
