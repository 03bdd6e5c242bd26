"""Tests of lightly_mcp.app.assemble: the data, models and trainer a recipe describes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightly_mcp.app.assemble import (
    evaluation_data,
    export_recalibration_data,
    mcp_model,
    moco_kwargs,
    trainer_for,
    training_data,
)
from lightly_mcp.errors import RecipeError
from lightly_mcp.methods import mcp as mcp_module
from lightly_mcp.methods import moco_v2 as moco_module
from lightly_mcp.methods.backbones import build_backbone
from lightly_mcp.methods.callbacks import KeepEpochCheckpoints
from lightly_mcp.methods.loggers import ResumableCSVLogger
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from lightly_mcp.pruning.pruning_ratio import removed_fraction, solve_pruning_ratio
from tests.tiny import tiny_recipe


def test_moco_kwargs_take_the_stages_schedule() -> None:
    recipe = tiny_recipe(
        {
            "pretrain.lr": 0.3,
            "pretrain.batch_size": 4,
            "pretrain.warmup_epochs": 2,
            "mcp.lr": 0.1,
            "mcp.batch_size": 8,
        }
    )
    pretrain, prune = moco_kwargs(recipe, "pretrain"), moco_kwargs(recipe, "mcp")
    assert (pretrain["lr"], pretrain["batch_size_per_device"]) == (0.3, 4)
    assert (prune["lr"], prune["batch_size_per_device"]) == (0.1, 8)
    assert (pretrain["warmup_epochs"], prune["warmup_epochs"]) == (2, 0)
    shared = {k: v for k, v in pretrain.items() if k not in ("lr", "warmup_epochs")}
    assert shared.pop("batch_size_per_device") == 4
    assert shared["backbone"] == "torchvision/mobilenet_v2"
    assert shared["backbone_kwargs"] == {
        "small_input": False,
        "width_multiplier": 0.25,
    }
    assert all(prune[k] == v for k, v in shared.items() if k != "weight_decay")


def test_mcp_model_takes_the_recipes_mcp_section() -> None:
    recipe = tiny_recipe(
        {
            "mcp.pruning_ratio": 0.3,
            "mcp.rho": 0.05,
            "mcp.frozen_blocks": 1,
            "mcp.transition": "stable_mask",
            "mcp.keep_output_dim": False,
        }
    )
    torch.manual_seed(0)
    model = mcp_model(recipe)
    h = model.hparams
    assert (h["pruning_ratio"], h["rho"], h["frozen_blocks"]) == (0.3, 0.05, 1)
    assert (h["transition"], h["keep_output_dim"]) == ("stable_mask", False)
    assert h["input_size"] == 16 and h["dense_checkpoint"] is None
    assert "target_params" not in h
    for key, value in moco_kwargs(recipe, "mcp").items():
        assert h[key] == value, key


def test_target_params_is_solved_with_one_build_and_one_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = tiny_recipe({"mcp.pruning_ratio": None, "mcp.target_params": 0.6})
    calls = {"build": 0, "trace": 0}
    build, trace = moco_module.build_backbone, mcp_module.find_channel_groups

    def counted_build(*args: Any, **kwargs: Any) -> Any:
        calls["build"] += 1
        return build(*args, **kwargs)

    def counted_trace(*args: Any, **kwargs: Any) -> Any:
        calls["trace"] += 1
        return trace(*args, **kwargs)

    monkeypatch.setattr(moco_module, "build_backbone", counted_build)
    monkeypatch.setattr(mcp_module, "find_channel_groups", counted_trace)
    model = mcp_model(recipe)
    assert calls == {"build": 1, "trace": 1}
    ratio = model.hparams["pruning_ratio"]
    assert "target_params" not in model.hparams
    # The ratio a separately built backbone gives (as before: built twice).
    backbone = build_backbone(
        "torchvision/mobilenet_v2", small_input=False, width_multiplier=0.25
    )
    example = torch.randn(1, 3, 16, 16)
    groups = find_channel_groups(backbone, example)
    round_to = model.hparams["round_to"]
    assert ratio == solve_pruning_ratio(
        backbone, groups, 0.6, "params", 16, example, round_to=round_to
    )
    assert model.admm.pruning_ratio == ratio
    removed = removed_fraction(
        backbone, groups, ratio, "params", 16, example, round_to=round_to
    )
    assert removed >= 0.6
    assert 1.0 - model.kept_parameter_fraction >= 0.6
    # A checkpoint's hyper-parameters rebuild the model without solving again.
    monkeypatch.setattr(mcp_module, "solve_pruning_ratio", None)
    again = MCP(**dict(model.hparams))
    assert again.hparams["pruning_ratio"] == ratio


def test_training_data_refuses_a_batch_larger_than_the_data() -> None:
    recipe = tiny_recipe()
    dataset, loader = training_data(recipe, 8)
    assert len(dataset) == 16 and loader.batch_size == 8
    views, *_ = next(iter(loader))
    assert len(views) == 2 and views[0].shape == (8, 3, 16, 16)
    with pytest.raises(RecipeError, match="batch size 17 is larger"):
        training_data(recipe, 17)


def test_evaluation_data_and_recalibration_data() -> None:
    recipe = tiny_recipe()
    bank, test, description, has_labels = evaluation_data(recipe)
    assert (len(bank.dataset), len(test.dataset), has_labels) == (48, 24, True)
    assert "digits" in description
    images, labels = next(iter(test))[:2]
    assert images.shape[1:] == (3, 16, 16) and labels.dtype == torch.long
    assert export_recalibration_data(recipe) is None  # recalibrate_bn is off
    on = export_recalibration_data(tiny_recipe({"export.recalibrate_bn": True}))
    assert on is not None and on.batch_size == recipe.mcp.batch_size


def test_trainer_for_writes_into_the_stage_folder(tmp_path: Path) -> None:
    recipe = tiny_recipe()
    trainer = trainer_for(recipe, tmp_path, epochs=3, max_steps=-1, progress=False)
    (last,) = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert Path(last.dirpath) == tmp_path and last.filename == "last"
    assert trainer.max_epochs == 3
    # metrics.csv survives a resume (tests/methods/test_loggers.py)
    assert isinstance(trainer.loggers[0], ResumableCSVLogger)
    assert Path(trainer.loggers[0].log_dir) == tmp_path / "logs"
    assert not any(isinstance(c, KeepEpochCheckpoints) for c in trainer.callbacks)
    kept = trainer_for(recipe, tmp_path, 3, 10, False, keep_every_n_epochs=2)
    assert kept.max_steps == 10
    assert any(isinstance(c, KeepEpochCheckpoints) for c in kept.callbacks)
