from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lightly_mcp.checkpoints import CheckpointError
from lightly_mcp.errors import MCPWarning
from lightly_mcp.mcp import MCP
from lightly_mcp.moco_v2 import MoCoV2
from tests.helpers import TINY, loader, trainer


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_fit_runs_with_finite_losses_and_logs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        frq=1,
        dr=0,
        admm_interval=2,
        admm_interval_unit="steps",
    )
    fit = trainer(tmp_path, max_steps=4)
    fit.fit(model, loader())
    metrics = fit.callback_metrics
    for key in (
        "train_loss",
        "admm_loss",
        "rho",
        "kept_parameter_fraction",
        "channels_changed",
        "admm_distance",
    ):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    assert int(model.criterion.memory_bank.bank_ptr) == 32 % 64
    assert int(model.admm.num_updates) == 2
    assert 0 < float(metrics["kept_parameter_fraction"]) < 1
    # (frq=1, dr=0) alternates: half the keys came from the subnet.
    assert model.transition.subnet_fraction == pytest.approx(0.5)


@pytest.mark.parametrize("frq, expected", [(0, 1.0), (1000, 0.0)])
def test_key_source_follows_transition(
    tmp_path: Path, frq: int, expected: float
) -> None:
    torch.manual_seed(0)
    model = MCP(**TINY, pruning_ratio=0.5, frq=frq, dr=0)
    subnet_calls = _count_calls(model.subnet)
    full_calls = _count_calls(model.backbone_momentum)
    fit = trainer(tmp_path, max_steps=4)
    fit.fit(model, loader())
    assert float(fit.callback_metrics["subnet_keys_epoch"]) == pytest.approx(expected)
    assert subnet_calls[0] == int(4 * expected)
    # The subnet runs the momentum encoder's modules through functional_call.
    assert full_calls[0] == 4


def test_admm_shrinks_pruned_channels_and_masks_have_exact_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(
        **{**TINY, "lr": 1.0},
        pruning_ratio=0.5,
        rho=5.0,
        frq=0,
        dr=0,
        admm_interval=1,
        admm_interval_unit="steps",
    )

    def dropped_norm() -> float:
        z = model.admm.z()
        total = 0.0
        for name in model.admm.param_names:
            theta = model.backbone.get_parameter(name).detach()
            total += float(theta[z[name] == 0].pow(2).sum())
        return total

    before = dropped_norm()
    fit = trainer(tmp_path, max_steps=8)
    fit.fit(model, loader())
    assert dropped_norm() < 0.5 * before
    for group, mask in zip(model.groups, model.admm.masks):
        assert int(mask.sum()) == group.num_kept(0.5)
    for a, b in zip(model.admm.masks, model.subnet.masks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_oscillating_mask_is_reported_once_and_a_settling_one_is_not(
    ratio: float,
) -> None:
    torch.manual_seed(0)
    model = MCP(**TINY, pruning_ratio=ratio, frq=0, dr=0)
    most = sum(
        2 * min(g.num_kept(ratio), g.num_channels - g.num_kept(ratio))
        for g in model.groups
    )
    assert model.admm_update() == 0  # Z⁰ = Π(θ⁰): the first update changes nothing
    # θ_q fixed between updates (no θ-step): U carries the dropped channels back
    # into the projection and the dropped set swaps at every update.
    with pytest.warns(
        MCPWarning, match=r"oscillating .* mcp.admm_interval and mcp.rho"
    ):
        for _ in range(3):
            changed = model.admm_update()
            assert model.mask_churn_fraction(changed) >= 0.5
    assert changed <= most
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.admm_update()  # warned once only

    # θ_q moved onto Z − U before every update (exact ADMM θ-step): the mask settles.
    settled = MCP(**TINY, pruning_ratio=ratio, frq=0, dr=0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        for _ in range(5):
            z, u = settled.admm.z(), settled.admm.u()
            for name in settled.admm.param_names:
                settled.backbone.get_parameter(name).copy_(z[name] - u[name])
            assert settled.admm_update() == 0


def test_moco_checkpoint_loads_and_first_keys_equal_dense_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    moco = MoCoV2(**TINY)
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(moco, loader())
    path = tmp_path / "dense.ckpt"
    fit.save_checkpoint(path)

    mcp = MCP(**TINY, pruning_ratio=0.5, frq=3, dr=1, dense_checkpoint=str(path))
    for part in ("backbone", "backbone_momentum", "projection_head_momentum"):
        for a, b in zip(
            getattr(mcp, part).state_dict().values(),
            getattr(moco, part).state_dict().values(),
        ):
            assert torch.equal(a, b)
    assert torch.equal(mcp.criterion.memory_bank.bank, moco.criterion.memory_bank.bank)
    x = torch.randn(8, 3, 16, 16)
    mcp._use_subnet = mcp.transition.step()
    assert not mcp._use_subnet
    moco.train(), mcp.train()
    torch.manual_seed(1)
    dense_keys = moco.forward_key_encoder(x)
    torch.manual_seed(1)
    mcp_keys = mcp.forward_key_encoder(x)
    assert torch.allclose(dense_keys, mcp_keys, atol=1e-6)
    # ... and the subnet gives different keys.
    mcp._use_subnet = True
    torch.manual_seed(1)
    assert not torch.allclose(dense_keys, mcp.forward_key_encoder(x), atol=1e-3)


def test_checkpoint_of_other_backbone_is_refused(tmp_path: Path) -> None:
    moco = MoCoV2(**TINY)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(moco, loader())
    path = tmp_path / "dense.ckpt"
    fit.save_checkpoint(path)
    other = {**TINY, "backbone": "torchvision/resnet34"}
    with pytest.raises(CheckpointError, match="resnet18.*resnet34"):
        MCP(**other, dense_checkpoint=str(path))


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        MCP(**TINY, dense_checkpoint=str(path))


def test_resume_restores_all_mcp_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        frq=2,
        dr=1,
        rho_growth=2.0,
        admm_interval=1,
        admm_interval_unit="steps",
    )
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(model, loader())
    path = tmp_path / "mcp.ckpt"
    fit.save_checkpoint(path)

    torch.manual_seed(123)
    fresh = MCP(
        **TINY,
        pruning_ratio=0.5,
        frq=2,
        dr=1,
        rho_growth=2.0,
        admm_interval=1,
        admm_interval_unit="steps",
    )
    checkpoint = torch.load(path, weights_only=True)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.transition.state_dict() == model.transition.state_dict()
    assert fresh.admm.rho == pytest.approx(model.admm.rho) == pytest.approx(0.01 * 8)
    for a, b in zip(fresh.admm.masks, model.admm.masks):
        assert torch.equal(a, b)
    for a, b in zip(fresh.subnet.masks, model.subnet.masks):
        assert torch.equal(a, b)
    for name in model.admm.param_names:
        assert torch.equal(fresh.admm.u()[name], model.admm.u()[name])
    assert torch.equal(
        fresh.criterion.memory_bank.bank, model.criterion.memory_bank.bank
    )
    # Trainer.fit(ckpt_path=...) continues from there.
    resumed = trainer(tmp_path, max_steps=5)
    resumed.fit(fresh, loader(), ckpt_path=str(path))
    assert fresh.transition.iteration == 5
    assert int(fresh.admm.num_updates) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_ratio": 1.0}, r"pruning_ratio must be in \[0, 1\)"),
        ({"rho": -0.1}, "rho must be >= 0"),
        ({"frq": -1}, "frq must be an integer >= 0"),
        ({"dr": -1}, "dr must be an integer >= 0"),
        ({"admm_interval": 0}, "admm_interval must be an integer >= 1"),
        ({"admm_interval_unit": "hours"}, "admm_interval_unit must be one of"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MCP(**TINY, **kwargs)


BACKBONES = [
    "torchvision/mobilenet_v2",
    "torchvision/resnet18",
    "torchvision/resnet34",
    "torchvision/resnet50",
    "timm/resnet18",
    "timm/mobilenetv2_100",
    "timm/efficientnet_b0",
]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_work_inside_mcp(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = MCP(
        **{**TINY, "backbone": name}, pruning_ratio=0.5, frq=0, dr=0, input_size=16
    )
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(model, loader(n=8))
    assert torch.isfinite(fit.callback_metrics["train_loss"])
    compact = model.compact_momentum_subnet().eval()
    model.subnet.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(compact(x), model.subnet(x), atol=1e-4)
