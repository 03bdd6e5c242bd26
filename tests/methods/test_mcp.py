from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightly_mcp.errors import MCPWarning
from lightly_mcp.methods.checkpoints import CheckpointError
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.masks import parameter_multipliers
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
    # Blocks of 2 steps in 4: one update after step 2, none at the last step.
    assert int(model.admm.num_updates) == 1
    assert 0 < float(metrics["kept_parameter_fraction"]) < 1
    # (frq=1, dr=0) alternates: half the keys came from the subnet.
    assert model.transition.subnet_fraction == pytest.approx(0.5)


@pytest.mark.parametrize("frq, expected", [(0, 1.0), (1000, 0.0)])
def test_key_source_follows_transition(
    tmp_path: Path, frq: int, expected: float
) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        frq=frq,
        dr=0,
        recalibration_batches=0,
        compact_keys=False,  # the masked subnet runs the momentum encoder's modules
    )
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
def test_small_theta_response_is_reported_once_and_a_settling_mask_is_not(
    ratio: float,
) -> None:
    torch.manual_seed(0)
    model = MCP(**TINY, pruning_ratio=ratio, frq=0, dr=0)
    most = sum(
        2 * min(g.num_kept(ratio), g.num_channels - g.num_kept(ratio))
        for g in model.groups
    )
    # θ_q fixed between updates (no θ-step, response 0): the warning states the
    # measured response against the threshold and the fix ...
    with pytest.warns(
        MCPWarning, match=r"moved only 0% of the way to Z - U.*above 29%.*rho_response"
    ):
        assert model.admm_update() == 0  # Z⁰ = Π(θ⁰): the first update changes nothing
    # ... and U carries the dropped channels back into the projection: the dropped
    # set swaps at every update.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for _ in range(3):
            changed = model.admm_update()
            assert model.mask_churn_fraction(changed) >= 0.5
    assert changed <= most

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
    assert fresh.block_history == model.block_history and len(fresh.block_history) == 2
    # Updates after steps 1 and 2, none after the last step (3).
    assert fresh.admm.rho == pytest.approx(model.admm.rho) == pytest.approx(0.01 * 4)
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
    # The longer run updates after step 4 (its last step, 5, is skipped); step 3
    # ended the first run, which had no update there.
    assert int(fresh.admm.num_updates) == 3


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
        expected = model.subnet(x)
        err = float((compact(x) - expected).abs().max())
    # Export's criterion: relative to the output scale (recalibrated statistics of
    # 8 tiny images make some outputs large).
    assert err <= 1e-4 * max(1.0, float(expected.abs().max()))


def _record_keys(model: MCP, also: Any = None) -> list[bool]:
    """Whether each training step's keys came from the momentum subnet."""
    keys: list[bool] = []
    step = model.training_step

    def recorded(batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = step(batch, batch_idx)
        keys.append(model._use_subnet)
        if also is not None:
            also()
        return loss

    model.training_step = recorded  # type: ignore[method-assign]
    return keys


def _record_updates(model: MCP) -> list[tuple[int, int, float]]:
    """(steps done, channels changed, ‖θ_q − Z‖ / ‖θ_q‖) at every ADMM update."""
    rows: list[tuple[int, int, float]] = []
    update = model.admm_update

    def recorded() -> int:
        changed = update()
        distance = model.admm.relative_distance(model.backbone)
        rows.append((model.global_step, changed, distance))
        return changed

    model.admm_update = recorded  # type: ignore[method-assign]
    return rows


@pytest.mark.parametrize("rho_response", [1.0, None])
def test_derived_rho_lets_the_mask_settle_and_theta_become_sparse(
    tmp_path: Path, rho_response: float | None
) -> None:
    """With ρ derived for a response of 1 per block the mask stops changing and θ_q
    approaches Z; with the paper's ρ = 0.01 on the same short blocks it does not."""
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        sgd_momentum=0.0,  # short blocks: momentum would overshoot (test_schedule)
        pruning_ratio=0.5,
        rho_response=rho_response,
        admm_interval=4,
        admm_interval_unit="steps",
        lr_schedule="block_step",
        transition="stable_mask",
        recalibration_batches=0,
    )
    rows = _record_updates(model)
    trainer(tmp_path, max_steps=24).fit(model, loader())
    assert [done for done, _, _ in rows] == [4, 8, 12, 16, 20]
    assert [r["step"] for r in model.block_history] == [4, 8, 12, 16, 20]
    assert [r["channels_changed"] for r in model.block_history] == [
        float(c) for _, c, _ in rows
    ]
    changed = [c for _, c, _ in rows]
    distances = [d for _, _, d in rows]
    if rho_response is not None:
        assert changed[1:] == [0, 0, 0, 0]
        assert model._mask_stable  # stable_mask: subnet keys after the first block
        assert distances[-1] < 0.2 * distances[0]
        assert model.predicted_response(0) == pytest.approx(1.0)
    else:
        assert all(c > 0 for c in changed[1:])  # the mask cycles
        assert distances[-1] > 0.9


def test_block_learning_rate_restarts_and_accumulation_updates_once(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        admm_interval=3,
        admm_interval_unit="steps",
        lr_schedule="block_step",
        frq=0,
        dr=0,
        recalibration_batches=0,
    )
    rows = _record_updates(model)
    rates: list[float] = []

    class Rates(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # type: ignore[no-untyped-def]
            rates.append(optimizer.param_groups[0]["lr"])

    # 4 batches per epoch, 2 per optimizer step: 2 steps per epoch, 9 steps.
    fit = trainer(tmp_path, max_steps=9, accumulate_grad_batches=2, callbacks=[Rates()])
    fit.fit(model, loader(n=32))
    base = 0.06 * 8 / 256
    assert rates == pytest.approx([base, base * 0.1, base * 0.01] * 3)
    assert [done for done, _, _ in rows] == [3, 6]  # once per block, none at 9
    assert int(model.admm.num_updates) == 2


def test_frozen_phase_uses_subnet_keys_and_the_support_penalty(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        admm_interval=2,
        admm_interval_unit="steps",
        frozen_blocks=2,
        frq=1000,  # the paper's transition would use the full encoder throughout
        dr=0,
        recalibration_batches=0,
    )
    penalties: list[tuple[float, float]] = []

    def penalty() -> None:
        support = float(model.admm.support_penalty(model.backbone))
        penalties.append((support, float(model.admm(model.backbone))))

    keys = _record_keys(model, also=penalty)
    trainer(tmp_path, max_steps=8).fit(model, loader())
    assert keys == [False] * 4 + [True] * 4
    assert int(model.admm.num_updates) == 2  # after steps 2 and 4, none after
    logged = float(model.trainer.callback_metrics["admm_loss"])
    support, admm = penalties[-1]
    assert support != pytest.approx(admm)
    assert logged == pytest.approx(support, rel=1e-3)


def test_hard_frozen_mask_trains_the_query_as_the_compact_network(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        admm_interval=2,
        admm_interval_unit="steps",
        frozen_blocks=2,
        frozen_mask="hard",
        transition="stable_mask",
        recalibration_batches=0,
    )
    zero_at_step_start: list[bool] = []

    def dropped_are_zero() -> None:
        kept = parameter_multipliers(
            dict(model.backbone.named_parameters()), model.groups, model.admm.masks
        )
        params = dict(model.backbone.named_parameters())
        zero_at_step_start.append(
            all(
                bool((params[n][kept[n].expand_as(params[n]) == 0] == 0).all())
                for n in model.admm.param_names
            )
        )

    _record_keys(model, also=dropped_are_zero)
    trainer(tmp_path, max_steps=8).fit(model, loader())
    # Steps 0-3 train with ADMM (θ_q dense); every frozen step starts exactly sparse.
    assert zero_at_step_start == [False] * 4 + [True] * 4
    assert float(model.trainer.callback_metrics["admm_loss"]) == 0.0
    # The query encoder now computes what its compact copy computes.
    example = torch.randn(4, 3, 16, 16)
    query = model.backbone.eval()
    small = compact(query, model.groups, model.admm.masks, example[:1])
    with torch.no_grad():
        torch.testing.assert_close(small(example), query(example), rtol=1e-5, atol=1e-5)


def test_stable_mask_transition_waits_for_a_mask_that_holds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        admm_interval=2,
        admm_interval_unit="steps",
        transition="stable_mask",
        recalibration_batches=0,
    )
    keys = _record_keys(model)
    # θ_q is not moved by ρ = 0.01 in 2 steps: the first update changes nothing
    # (Z⁰ = Π(θ⁰)) but that is no evidence, the mask then cycles, and the keys stay
    # with the full encoder until no update is left (step 6 on).
    rows = _record_updates(model)
    trainer(tmp_path, max_steps=8).fit(model, loader())
    assert [c > 0 for _, c, _ in rows] == [False, True, True]
    assert keys == [False] * 6 + [True] * 2


def test_training_ends_with_recalibrated_subnet_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MCP(**TINY, pruning_ratio=0.5, frq=0, dr=0, recalibration_batches=2)
    data = loader()
    trainer(tmp_path, max_steps=2).fit(model, data)
    got = {k: v.clone() for k, v in model.subnet.buffers_dict().items()}
    # The same recalibration again, from the same images, gives the same values.
    expected = model.recalibrate_subnet(data, 2)
    assert expected == 2
    for name, value in model.subnet.buffers_dict().items():
        if "num_batches_tracked" not in name:
            assert torch.allclose(value, got[name], atol=1e-6), name
    encoder = dict(model.backbone_momentum.named_buffers())
    assert not torch.allclose(
        got["net.bn1.running_var"], encoder["net.bn1.running_var"]
    )


def test_your_own_backbone_module_trains_saves_and_loads_with_it(
    tmp_path: Path,
) -> None:
    from lightly_mcp.errors import InputError
    from lightly_mcp.methods.checkpoints import read_checkpoint
    from tests.methods.test_backbones import _PooledCNN

    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY.items() if k not in ("backbone", "backbone_kwargs")}
    model = MCP(backbone=_PooledCNN(), pruning_ratio=0.5, round_to=1, **kwargs)
    assert model.hparams["backbone"] == "module/_PooledCNN"
    assert model.backbone.feature_dim == 8 and len(model.groups) == 1
    run = trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    run.fit(model, loader())
    path = tmp_path / "mcp.ckpt"
    run.save_checkpoint(path)
    saved = read_checkpoint(path)  # weights_only: no module pickled in it
    assert saved["hyper_parameters"]["backbone"] == "module/_PooledCNN"
    with pytest.raises(InputError, match="pass the module again"):
        MCP.load_from_checkpoint(path, weights_only=True)
    loaded = MCP.load_from_checkpoint(path, weights_only=True, backbone=_PooledCNN())
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    # Exported from memory: the compact network of the module, folded and checked.
    from lightly_mcp import export

    report = export(loaded, tmp_path / "export", latency=False)
    assert report["backbone"] == "module/_PooledCNN"
    assert (tmp_path / "export" / "model.pt2").is_file()
    assert report["compact"]["params"] < report["dense"]["params"]


# --- schedule="converging" --------------------------------------------------------------
def _converging(**kwargs: Any) -> MCP:
    tiny = {
        **TINY,
        "backbone": "torchvision/mobilenet_v2",
        "backbone_kwargs": {"width_multiplier": 0.25},
        "sgd_momentum": 0.9,
    }
    return MCP(pruning_ratio=0.5, round_to=1, schedule="converging", **tiny, **kwargs)


def test_converging_blocks_follow_the_momentum_and_the_run() -> None:
    from lightly_mcp.methods.options import converging_blocks

    assert converging_blocks(200, 0.99) == (2, 100)  # the quickstart's
    assert converging_blocks(1200, 0.99) == (4, 300)  # the accuracy grid's
    assert converging_blocks(20000, 0.99) == (4, 5000)
    assert converging_blocks(100, 0.9) == (3, 34)


def test_converging_schedule_lays_out_its_blocks_from_the_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _converging()
    assert {
        k: model.hparams[k]
        for k in ("lr_schedule", "frozen_blocks", "transition", "rho_response")
    } == {
        "lr_schedule": "block_cosine",
        "frozen_blocks": 1,
        "transition": "stable_mask",
        "rho_response": 1.0,
    }
    run = trainer(tmp_path, max_steps=200)
    run.fit(model, loader(n=64, batch_size=8))
    schedule = model.block_schedule()
    assert (schedule.block_steps, schedule.num_blocks) == (100, 2)
    assert model.hparams["admm_interval"] == 100
    assert [b["step"] for b in model.block_history] == [100.0]  # block 2 frozen
    path = tmp_path / "converging.ckpt"
    run.save_checkpoint(path)
    reloaded = MCP.load_from_checkpoint(path, weights_only=True)
    assert reloaded.hparams["schedule"] == "converging"


def test_converging_schedule_refuses_a_short_run_with_the_shortest_that_works(
    tmp_path: Path,
) -> None:
    from lightly_mcp.errors import InputError

    with pytest.raises(InputError, match="sets admm_interval_unit, lr_schedule"):
        _converging(transition="paper", frq=3, frozen_blocks=2)
    with pytest.raises(InputError) as refused:
        trainer(tmp_path, max_steps=20).fit(_converging(), loader(n=64, batch_size=8))
    message = str(refused.value)
    assert "this run has 20" in message
    shortest = int(message.split("at least ")[1].split()[0])
    assert 40 < shortest < 400
    torch.manual_seed(0)
    trainer(tmp_path / "ok", max_steps=shortest).fit(
        _converging(), loader(n=64, batch_size=8)
    )
