"""The accuracy benchmark's registry, its protocol and its report (the methods it
compares: tests/benchmarking/test_baselines.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.accuracy import main, report
from lightly_mcp.app.assemble import moco_kwargs
from lightly_mcp.app.recipe import load_recipe
from lightly_mcp.methods.checkpoints import read_checkpoint
from lightly_mcp.methods.moco_v2 import MoCoV2
from tests.helpers import TINY, loader, trainer


def test_registry_names() -> None:
    assert list(main.METHODS) == [
        "dense",
        "typical_pruning",
        "scratch_small",
        "random_mask",
        "supervised_small",
        "transfer_pruning",
        "scratch_small_budget_x2",
        "mcp_r0.31",
        "mcp_r0.52",
        "mcp_r0.76",
        "mcp_r0.76_budget_x2",
        "distill",
        "pruned_distill",
        "mcp_r0.76_rho_x10",
        "mcp_r0.76_rho_x0.1",
        "mcp_r0.76_frq100_dr1",
        "mcp_r0.76_frq1_dr0",
        "mcp_r0.76_frq0_dr0",
        "mcp_r0.52_round_to8",
        "mcp_r0.76_round_to8",
        "mcp_t0.9264_round_to8",
        "mcp_r0.76_frozen_hard",
        "mcp_r0.76_fixed_mask",
    ]
    for entry in main.METHODS.values():
        assert callable(entry["model"]) and entry["transform"] is not None
    seeds = {name: e["seeds"] for name, e in main.METHODS.items() if e["seeds"] > 1}
    assert seeds == {
        "dense": 3,
        "typical_pruning": 3,
        "scratch_small": 3,
        "mcp_r0.76": 3,
        "distill": 3,
        "mcp_r0.76_frq1_dr0": 3,
    }


def test_grid_runs_the_headline_question_first() -> None:
    order = main.grid_order(list(main.METHODS), None)
    assert (
        len(order) == len(set(order)) == sum(e["seeds"] for e in main.METHODS.values())
    )
    first = {"dense", "typical_pruning", "scratch_small", "mcp_r0.76", "distill"}
    assert {name for name, _ in order[:5]} == first
    assert all(seed == 0 for _, seed in order[:7])
    assert [name for name, _ in order[5:7]] == ["mcp_r0.31", "mcp_r0.52"]
    assert {pair for pair in order[7:17]} == {
        (name, seed) for name in first for seed in (1, 2)
    }
    # Distillation's budget is MCP's time: MCP's seed runs before it.
    for seed in range(3):
        assert order.index(("mcp_r0.76", seed)) < order.index(("distill", seed))
    names = [name for name, _ in order]
    assert names.index("mcp_r0.76") < names.index("pruned_distill")
    # An ablation's extra seeds run after every ablation's seed 0.
    assert order[-4:] == [
        ("mcp_r0.76_frozen_hard", 0),
        ("mcp_r0.76_fixed_mask", 0),
        ("mcp_r0.76_frq1_dr0", 1),
        ("mcp_r0.76_frq1_dr0", 2),
    ]
    # The budget rows run after the paper's rows, before the ablations.
    names = [name for name, _ in order]
    for budget_row in ("scratch_small_budget_x2", "mcp_r0.76_budget_x2"):
        assert names.index("transfer_pruning") < names.index(budget_row)
        assert names.index(budget_row) < names.index("mcp_r0.76_rho_x10")
    assert main.grid_order(["mcp_r0.76"], 1) == [("mcp_r0.76", 0)]


def test_mcp_rows_use_the_recipes_converging_schedule() -> None:
    recipe = load_recipe(main.RECIPE)
    m = recipe.mcp
    assert (m.admm_interval, m.admm_interval_unit) == (300, "steps")
    assert main.pruning_steps(recipe) == 1200
    assert 300 >= 3 / (1 - recipe.pretrain.momentum) - 1e-9  # θ_k follows θ_q
    ctx = main.Context(
        recipe=recipe,
        dense_checkpoint=main.dense_checkpoint(Path("unused"), [], 0, progress=False),
        seed=0,
    )
    base = main.mcp_builder(main.R92)(ctx).hparams
    assert base["rho_response"] == m.rho_response == 2.0
    assert (base["lr_schedule"], base["frozen_blocks"], base["transition"]) == (
        "block_step",
        1,
        "stable_mask",
    )
    assert base["keep_output_dim"] is False
    rho = main.derived_rho(recipe)
    # R = ρ Σ lr / (1 − β): 100 steps each at 0.03, 0.003, 0.0003 in a block.
    assert rho == pytest.approx(2.0 * 0.1 / (100 * (0.03 + 0.003 + 0.0003)))
    for scale in (10.0, 0.1):
        h = main.METHODS[f"mcp_r0.76_rho_x{scale:g}"]["model"](ctx).hparams
        assert h["rho_response"] is None and h["rho"] == pytest.approx(scale * rho)
    paper = main.METHODS["mcp_r0.76_frq100_dr1"]["model"](ctx).hparams
    assert (paper["transition"], paper["frq"], paper["dr"]) == ("paper", 10, 1)
    assert main.transition_length(10, 1) <= main.PAPER_TRANSITION_FRACTION * 1200
    assert main.transition_length(11, 1) > main.PAPER_TRANSITION_FRACTION * 1200
    never = main.METHODS["mcp_r0.76_frq1_dr0"]["model"](ctx).hparams
    assert (never["transition"], never["frq"], never["dr"]) == ("paper", 1, 0)
    assert base["frozen_mask"] == "penalty"
    hard = main.METHODS["mcp_r0.76_frozen_hard"]["model"](ctx).hparams
    assert hard["frozen_mask"] == "hard" and hard["rho_response"] == 2.0


def test_budget_rows_scale_the_pruning_phase_and_keep_the_schedules_shape() -> None:
    recipe = load_recipe(main.RECIPE)
    assert main.scaled_budget(recipe, 1) is recipe
    doubled = main.scaled_budget(recipe, 2)
    assert main.pruning_steps(doubled) == 2 * main.pruning_steps(recipe) == 2400
    assert doubled.mcp.admm_interval == 2 * recipe.mcp.admm_interval == 600
    assert doubled.data == recipe.data and doubled.pretrain == recipe.pretrain
    # The same θ-response per block: ρ halves when the block's Σ lr doubles.
    assert main.derived_rho(doubled) == pytest.approx(main.derived_rho(recipe) / 2)
    assert [main.METHODS[n]["budget"] for n in main.METHODS if "budget" in n] == [2, 2]
    assert all(e["budget"] == 1 for n, e in main.METHODS.items() if "budget" not in n)
    # The small network's budget is its pretraining plus the doubled pruning phase.
    steps = main.METHODS["scratch_small_budget_x2"]["steps"]
    assert steps(doubled) == main.pretraining_steps(recipe) + 2400
    epochs = load_recipe(main.RECIPE, ["mcp.admm_interval_unit=epochs"])
    with pytest.raises(ValueError, match="admm_interval_unit: steps"):
        main.scaled_budget(epochs, 2)


def test_grid_starts_from_the_shipped_dense_model_with_its_settings(
    tmp_path: Path,
) -> None:
    recipe = load_recipe(main.RECIPE)
    for seed in (0, 1, 2):  # no pretraining: every row shares the shipped model
        path = main.dense_checkpoint(tmp_path, [], seed, progress=False)
        assert path == main.REPO / "pretrained" / "fashion_mnist_mobilenetv2_w0.5.ckpt"
    assert not any(tmp_path.iterdir())
    shipped = read_checkpoint(path)["hyper_parameters"]  # sha256-verified
    ours = moco_kwargs(recipe, "pretrain")
    for key in (
        "backbone",
        "backbone_kwargs",
        "temperature",
        "momentum",
        "memory_bank_size",
        "projection_hidden_dim",
        "projection_dim",
        "projection_batch_norm",
        "split_batch_norm",
        "batch_size_per_device",
        "lr",
        "warmup_epochs",
    ):
        assert ours[key] == shipped[key], key


def test_training_budgets_in_steps() -> None:
    recipe = load_recipe(
        main.RECIPE,
        ["data.subset=1000", "mcp.max_steps=-1", "mcp.epochs=3", "pretrain.epochs=2"],
    )
    assert main.pruning_steps(recipe) == 3 * (1000 // 128)
    assert main.pretraining_steps(recipe) == 2 * (60000 // 128)
    pruning = main.pruning_steps(recipe)
    for name, entry in main.METHODS.items():
        if name == "dense":
            assert entry["steps"] is None
        elif name in ("distill", "pruned_distill"):  # MCP's wall-clock time
            assert entry["steps"] == "mcp_wall_clock" and entry["data"] == "pruning"
        elif name in ("scratch_small", "supervised_small", "scratch_small_budget_x2"):
            # pretraining + pruning, on all images
            assert entry["data"] == "pretraining"
            assert entry["steps"](recipe) == 2 * 468 + 3 * 7
        else:  # the same pruning-phase budget for every pruning method
            assert entry["data"] == "pruning"
            assert entry["steps"](recipe) == pruning
    five = load_recipe(
        main.RECIPE, ["data.classes=[0, 1, 2, 3, 4]", "pretrain.epochs=2"]
    )
    assert main.full_training_set(five) == 30000
    assert main.pretraining_steps(five) == 2 * (30000 // 128)
    capped = load_recipe(main.RECIPE, ["mcp.max_steps=5", "pretrain.max_steps=9"])
    assert main.pruning_steps(capped) == 5
    assert main.pretraining_steps(capped) == 9


def test_transition_scaling() -> None:
    assert main.transition_length(100, 1) == 5150
    assert main.transition_length(0, 0) == 0
    assert main.scaled_frq(780) == 8  # 44 iterations <= 5.87 % of 780
    assert main.scaled_frq(4) == 1


def test_warmup_longer_than_the_run_is_clamped(tmp_path: Path) -> None:
    model = MoCoV2(**{**TINY, "warmup_epochs": 200})
    trainer(tmp_path, max_steps=2).fit(model, loader())  # lightly would raise
    assert model.trainer.global_step == 2


def test_report_mean_and_std(tmp_path: Path) -> None:
    for seed, (knn, linear) in enumerate(((0.80, 0.70), (0.82, 0.74))):
        result = {
            "name": "typical_pruning",
            "seed": seed,
            "network": "key_encoder",
            "knn_top1": knn,
            "linear_top1": linear,
            "params": 50_000,
            "macs": 1_000_000,
            "dense_params": 687_680,
            "params_removed": 1 - 50_000 / 687_680,
            "networks": {},
        }
        (tmp_path / f"typical_pruning_seed{seed}.json").write_text(json.dumps(result))
    table = report.write_report(tmp_path)
    assert "| typical_pruning | 2 | 50,000 | 92.7% | 1.00 M |" in table
    assert "81.00 ± 1.41" in table  # kNN: mean 0.81, sample std 0.01414
    assert "72.00 ± 2.83" in table
    assert (tmp_path / "results.md").is_file()


def test_training_curves_table(tmp_path: Path) -> None:
    from benchmarks.accuracy import curves

    logs = tmp_path / "runs" / "mcp_r0.76_seed0" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(
        "epoch,step,train_loss,channels_changed,admm_relative_distance\n"
        "0,19,8.0,,\n0,39,7.0,12,0.5\n0,59,6.0,,\n0,79,5.0,4,0.125\n0,99,4.0,,\n"
    )
    # A committed copy (metrics/) is read too, and wins over a run folder's log.
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "typical_pruning_seed0.csv").write_text(
        "epoch,step,train_loss\n0,9,7.5\n0,19,7.0\n"
    )
    blocks = [
        {"step": 300, "theta_response": 0.87, "channels_changed": 0, "rho": 0.06},
        {"step": 600, "theta_response": 0.81, "channels_changed": 0, "rho": 0.06},
    ]
    (tmp_path / "mcp_r0.76_seed0.json").write_text(json.dumps({"admm_blocks": blocks}))
    (tmp_path / "typical_pruning_seed0.json").write_text("{}")
    in_progress = tmp_path / "runs" / "random_mask_seed0" / "logs"  # no result yet
    in_progress.mkdir(parents=True)
    (in_progress / "metrics.csv").write_text("epoch,step,train_loss\n0,9,7.5\n")
    series = curves.read_metrics(logs / "metrics.csv")
    assert series["channels_changed"] == [(39, 12.0), (79, 4.0)]
    table = curves.write_curves(tmp_path)
    # loss: mean of the first / last three logged values; churn, distance: ends.
    assert "| mcp_r0.76_seed0 | 100 | 7.000 → 5.000 | 12 → 4 | 0.500 → 0.125 |" in table
    assert "| typical_pruning_seed0 | 20 | 7.250 → 7.250 | – | – |" in table
    assert "### ADMM blocks of mcp_r0.76_seed0" in table
    assert "random_mask" not in table
    assert "| 300 | 0.06 | - | 0.87 | 0 | - | - |" in table
    assert (tmp_path / "training_curves.md").is_file()
    assert (tmp_path / "training_curves.png").is_file()


def test_transfer_pruning_fine_tunes_prunes_and_resumes(tmp_path: Path) -> None:
    recipe = load_recipe(main.RECIPE)
    dense = main.dense_checkpoint(tmp_path, [], 0, progress=False)
    calls: list[tuple[int, str]] = []

    def fit(model: torch.nn.Module, steps: int, phase: str) -> None:
        calls.append((steps, phase))
        with torch.no_grad():  # stands in for training: a recognisable change
            model.classifier.weight.add_(torch.arange(10.0)[:, None])
            for p in model.backbone.parameters():
                p.mul_(1.5)

    ctx = main.Context(
        recipe=recipe, dense_checkpoint=dense, seed=0, run_dir=tmp_path, fit=fit
    )
    model = main.build_transfer_pruning(ctx)
    assert calls == [(main.pruning_steps(recipe), "finetune_dense")]
    finetuned = torch.load(tmp_path / "finetuned_dense.pt", weights_only=True)
    # The dense phase started from the dense model's momentum encoder.
    start = main._dense_backbone_state(ctx)
    name = next(k for k, v in start.items() if v.is_floating_point() and v.ndim == 4)
    torch.testing.assert_close(finetuned["backbone"][name], 1.5 * start[name])
    # Phase 2: the fine-tuned network, magnitude-pruned to R92, classifier sliced.
    assert isinstance(model, main.SupervisedClassifier)
    assert model.hparams["pruning_ratio"] == main.R92
    features = model.backbone.feature_dim
    assert model.classifier.weight.shape == (10, features) and features < 1280
    columns = finetuned["classifier"]["weight"]
    kept = [
        next(j for j in range(1280) if torch.equal(columns[:, j], w))
        for w in model.classifier.weight.T
    ]
    assert kept == sorted(kept)  # the kept features, in order
    # Resuming after the dense phase does not fine-tune it again.
    again = main.build_transfer_pruning(ctx)
    assert len(calls) == 1
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_report_checks_the_targets_and_flags_collapsed_seeds(tmp_path: Path) -> None:
    def write(name: str, seed: int, knn: float, linear: float, **extra: float) -> None:
        result = {
            "name": name,
            "seed": seed,
            "network": "n",
            "knn_top1": knn,
            "linear_top1": linear,
            "params": 50_000,
            "macs": 1_000_000,
            "dense_params": 687_680,
            "params_removed": 0.927,
            "networks": {},
            **extra,
        }
        (tmp_path / f"{name}_seed{seed}.json").write_text(json.dumps(result))

    write("mcp_r0.76", 0, 0.75, 0.80)
    write("mcp_r0.76", 1, 0.77, 0.80)
    write("typical_pruning", 0, 0.73, 0.78)  # kNN +3 (met), linear +2 (met)
    write("scratch_small", 0, 0.10, 0.10)  # a collapsed seed counts in the mean
    write("scratch_small", 1, 0.76, 0.79)
    write("mcp_r0.31", 0, 0.80, 0.865)
    write("dense", 0, 0.82, 0.88)  # linear −1.5: missed
    write("supervised_small", 0, 0.70, 0.75, classifier_top1=0.9)
    for seed in range(3):  # a variant with 3 seeds is checked against the targets too
        write("mcp_r0.76_frq1_dr0", seed, 0.80, 0.81)
    write("mcp_r0.76_rho_x10", 0, 0.80, 0.81)  # one seed: not checked
    table = report.write_report(tmp_path)
    assert "| scratch_small (collapsed: seed 0) | 2 |" in table
    assert "| supervised_small (its classifier) | 1 | | | | – | 90.00 | | |" in table
    lines = {line.split(" | ")[0]: line for line in table.splitlines()}
    knn = lines["| mcp_r0.76 ≥ typical_pruning + 2 (knn_top1, 2 vs 1 seeds)"]
    assert knn.endswith("| 76.00 | 73.00 | +3.00 | yes |")
    linear = lines["| mcp_r0.76 ≥ typical_pruning + 2 (linear_top1, 2 vs 1 seeds)"]
    assert linear.endswith("| +2.00 | yes |")
    scratch = lines["| mcp_r0.76 ≥ scratch_small + 2 (knn_top1, 2 vs 2 seeds)"]
    assert scratch.endswith("| 76.00 | 43.00 | +33.00 | yes |")
    variant = lines[
        "| mcp_r0.76_frq1_dr0 ≥ scratch_small + 2 (linear_top1, 3 vs 2 seeds)"
    ]
    assert variant.endswith("| 81.00 | 44.50 | +36.50 | yes |")
    assert not any(line.startswith("| mcp_r0.76_rho_x10 ≥") for line in lines)
    dense = lines["| mcp_r0.31 within 1 of dense (linear_top1)"]
    assert dense.endswith("| 86.50 | 88.00 | -1.50 | **no** |")


def test_convergence_reads_run_folders_and_grid_rows(tmp_path: Path) -> None:
    from benchmarks.accuracy import convergence

    records = [{"step": 300.0, "theta_response": 0.86, "channels_changed": 0.0}]
    run = tmp_path / "run"  # a `lightly-mcp run` folder: its prune stage
    (run / "prune").mkdir(parents=True)
    (run / "prune" / "done.json").write_text(json.dumps({"admm_blocks": records}))
    assert convergence.block_history(run) == records
    row = tmp_path / "mcp_r0.76_seed0"  # a grid row: the stage itself, CSV only
    (row / "logs").mkdir(parents=True)
    (row / "logs" / "metrics.csv").write_text(
        "epoch,step,theta_response,admm_relative_distance\n"
        "0,299,0.86,0.21\n0,319,0.86,0.21\n0,599,0.81,0.17\n"
    )
    history = convergence.block_history(row)  # the repeated log row dropped
    assert [(r["step"], r["theta_response"]) for r in history] == [
        (300.0, 0.86),
        (600.0, 0.81),
    ]
    with pytest.raises(FileNotFoundError, match="no ADMM block record"):
        convergence.block_history(tmp_path / "empty")


def test_report_has_every_evaluation_of_every_row(tmp_path: Path) -> None:
    for seed, (knn, held) in enumerate(((0.80, 0.60), (0.82, 0.64))):
        result = {
            "name": "mcp_r0.76",
            "seed": seed,
            "knn_top1": knn,
            "linear_top1": 0.9,
            "params": 10,
            "macs": 1e6,
            "params_removed": 0.9,
            "dense_params": 100,
            "data": "fashion_mnist train classes 0-4 of 10",
            "transfer": {
                "held_out_classes": {
                    "data": "fashion_mnist train classes 5-9 of 10",
                    "knn_top1": held,
                    "linear_top1": 0.7,
                }
            },
        }
        (tmp_path / f"mcp_r0.76_seed{seed}.json").write_text(json.dumps(result))
    table = report.transfer_table(report.load_results(tmp_path))
    row = next(line for line in table.splitlines() if line.startswith("| mcp_r0.76"))
    assert (
        row
        == "| mcp_r0.76 | 2 | 81.00 ± 1.41 | 90.00 ± 0.00 | 62.00 ± 2.83 | 70.00 ± 0.00 |"
    )
    assert "- held_out_classes: fashion_mnist train classes 5-9 of 10" in table
    assert "held_out_classes kNN" in report.write_report(tmp_path)
    assert report.transfer_table({"x": [{"knn_top1": 1, "linear_top1": 1}]}) == ""


def test_each_row_keeps_its_network_as_a_program(tmp_path: Path) -> None:
    from lightly_mcp.io.model_files import load_program
    from lightly_mcp.methods.backbones import build_backbone
    from lightly_mcp.pruning.batchnorm import use_split_batchnorm

    torch.manual_seed(0)
    network = build_backbone(
        "torchvision/mobilenet_v2", small_input=False, width_multiplier=0.25
    )
    use_split_batchnorm(network, 2)  # as the MoCo rows' encoders have it
    network.eval()
    name = main.save_row_model({"key_encoder": network}, tmp_path, "row", 1, 16)
    assert name == "models/row_seed1.pt2"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            load_program(tmp_path / name)(x), network(x), atol=1e-4, rtol=1e-4
        )


def test_the_transfer_grid_holds_out_five_classes_with_the_grids_budgets() -> None:
    from lightly_mcp.app.assemble import evaluation_names, held_out_classes

    transfer = load_recipe(main.HERE / "transfer.yaml")
    grid = load_recipe(main.RECIPE)
    assert transfer.data.classes == [0, 1, 2, 3, 4]
    assert held_out_classes(transfer) == [5, 6, 7, 8, 9]
    assert evaluation_names(transfer) == ["in_domain", "held_out_classes", "digits"]
    assert transfer.pretrain.dense_checkpoint.endswith("_5class.ckpt")
    # The same budgets in steps as the all-class grid.
    assert main.pretraining_steps(transfer) == main.pretraining_steps(grid) == 1404
    assert main.pruning_steps(transfer) == main.pruning_steps(grid)
    # Otherwise the same protocol.
    same = dict(transfer.to_dict(), data=None, pretrain=None, eval=None)
    assert same == dict(grid.to_dict(), data=None, pretrain=None, eval=None)
