"""Every recipe key has a non-default case that runs the stage it affects.

The keys are read from the recipe's dataclasses (``lightly_mcp.app.recipe``), so a key
added without a case in ``CASES`` fails ``test_every_recipe_key_has_a_case`` (and its
own parametrized case). Each case starts from the tiny recipe (``tests/tiny.py``),
sets one key (plus what that value needs to be valid), and runs only the stages the
key affects: pretraining, MCP from scratch, or export and evaluation from the tiny MCP
checkpoint shared by the session.
"""

from __future__ import annotations

import dataclasses
import io
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lightly_mcp.app import pipeline
from lightly_mcp.app.recipe import Recipe
from lightly_mcp.methods.checkpoints import read_checkpoint
from tests.tiny import tiny_recipe

Results = dict[str, Any]


def recipe_keys() -> list[str]:
    """``section.key`` of every field of the recipe's sections, and ``seed``."""
    hints = typing.get_type_hints(Recipe)
    keys = []
    for section in dataclasses.fields(Recipe):
        cls = hints[section.name]
        if dataclasses.is_dataclass(cls):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)]
        else:
            keys.append(section.name)
    return keys


def default_of(key: str) -> Any:
    """The dataclass default of ``key``."""
    node: Any = Recipe()
    for part in key.split("."):
        node = getattr(node, part)
    return node


@dataclass(frozen=True)
class Case:
    """A non-default value, what it needs, the stages it affects, a check."""

    value: Any
    stages: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Path, Results], None] | None = None
    #: ``{"module.ATTRIBUTE": value}`` patched for the case (to keep it fast).
    patches: dict[str, Any] = field(default_factory=dict)


# --- checks ------------------------------------------------------------------------
def _done(out: Path, stage: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / stage / "done.json").read_text())
    return data


def _steps(out: Path, stage: str) -> int:
    return int(read_checkpoint(out / stage / "final.ckpt")["global_step"])


def _hparam(stage: str, name: str, expected: Any) -> Callable[[Path, Results], None]:
    def check(out: Path, results: Results) -> None:
        saved = read_checkpoint(out / stage / "final.ckpt")["hyper_parameters"]
        assert saved[name] == expected, (name, saved[name])

    return check


def _backbone_kwarg(name: str, expected: Any) -> Callable[[Path, Results], None]:
    def check(out: Path, results: Results) -> None:
        saved = read_checkpoint(out / "prune" / "final.ckpt")["hyper_parameters"]
        assert saved["backbone_kwargs"].get(name) == expected, saved["backbone_kwargs"]

    return check


def _eval_setting(name: str, expected: Any) -> Callable[[Path, Results], None]:
    def check(out: Path, results: Results) -> None:
        settings = results["evaluate"]["models"]["compact"]["settings"]
        assert settings[name] == expected, settings

    return check


def _data(text: str) -> Callable[[Path, Results], None]:
    def check(out: Path, results: Results) -> None:
        assert text in _done(out, "prune")["data"], _done(out, "prune")["data"]

    return check


def _fashion_mnist_files(tmp: Path) -> str:
    from tests.data.writers import write_fashion_mnist

    write_fashion_mnist(tmp / "fashion", n_train=40, n_test=10)
    return str(tmp / "fashion")


def _kept_multiple_of(n: int) -> Callable[[Path, Results], None]:
    def check(out: Path, results: Results) -> None:
        for group in results["export"]["kept_channels"]:
            assert group["kept"] % n == 0 or group["kept"] == group["total"], group

    return check


def _aligned(out: Path, results: Results) -> None:
    """``mcp.round_to: 4`` (the default is 8): every group keeps a multiple of 4 (or
    all its channels, or n_g when it is smaller than 4), and some group keeps a count
    that 8 would not have given.
    """
    _hparam("prune", "round_to", 4)(out, results)
    groups = results["export"]["kept_channels"]
    for group in groups:
        kept, total = group["kept"], group["total"]
        assert kept % 4 == 0 or kept == total or total < 4, group
    assert any(g["kept"] % 8 and g["kept"] != g["total"] for g in groups), groups


def _narrower_features(out: Path, results: Results) -> None:
    report = results["export"]
    assert report["compact"]["feature_dim"] < report["dense"]["feature_dim"]


def _evaluated(name: str, value: Any) -> Callable[[Path, Results], None]:
    def check(out: Path, results: Results) -> None:
        models = results["evaluate"]["models"]
        assert models["compact"][name] == value, models["compact"]

    return check


def _epoch_checkpoints(out: Path, results: Results) -> None:
    assert sorted(p.name for p in (out / "pretrain" / "epochs").iterdir()) == [
        "epoch=001.ckpt"
    ]


def _in_pytorch(out: Path, results: Results) -> None:
    runtimes = results["evaluate"]["runtime"]
    assert runtimes and set(runtimes.values()) == {"torch"}, runtimes


def _transfer(out: Path, results: Results) -> None:
    """The in-domain evaluation has classes 0-4; ``held_out_classes`` the others."""
    evaluated = results["evaluate"]
    assert "train classes 0-4 of 10" in evaluated["data"], evaluated["data"]
    assert set(evaluated["transfer"]) == {"held_out_classes", "digits"}
    held = evaluated["transfer"]["held_out_classes"]
    assert "digits train classes 5-9 of 10" in held["data"], held["data"]
    assert "digits test classes 5-9 of 10" in held["data"], held["data"]
    for part in (evaluated, held, evaluated["transfer"]["digits"]):
        scores = part["models"]["compact"]
        assert 0 <= scores["knn_top1"] <= 1 and scores["num_test"] == 24, scores
    assert held["models"]["compact"] != evaluated["models"]["compact"]


def _converging(out: Path, results: Results) -> None:
    saved = read_checkpoint(out / "prune" / "final.ckpt")["hyper_parameters"]
    assert saved["schedule"] == "converging", saved["schedule"]
    assert (saved["lr_schedule"], saved["frozen_blocks"]) == ("block_cosine", 1)
    assert (saved["transition"], saved["admm_interval"]) == ("stable_mask", 4)


def _baselines_skipped(out: Path, results: Results) -> None:
    assert "baselines" not in results["evaluate"]


#: The tiny recipe already holds some non-default values (digits, 16 px, width
#: 0.25, ...); their cases run with that value. ``"tmp"`` in a value is replaced by
#: the case's temporary folder.
CASES: dict[str, Case] = {
    "seed": Case(1, ("prune",), check=_data("random subset, seed 1")),
    # data
    "data.kind": Case("digits", ("prune",), check=_data("digits train")),
    "data.root": Case(  # auto with a root without Fashion-MNIST: the digits fallback
        "tmp",
        ("prune",),
        {"data.kind": "auto"},
        check=_data("no Fashion-MNIST in"),
    ),
    "data.input_size": Case(24, ("prune",), check=_hparam("prune", "input_size", 24)),
    "data.subset": Case(24, ("prune",), check=_data("24 of 1438 images")),
    "data.download": Case(  # files present: nothing is fetched
        True,
        ("prune",),
        {"data.kind": "fashion_mnist", "data.root": "fashion_mnist_files"},
        check=_data("fashion_mnist train"),
    ),
    "data.num_workers": Case(1, ("prune",)),
    "data.min_scale": Case(0.5, ("prune",)),
    "data.batched_augment": Case(False, ("prune",)),
    "data.classes": Case([0, 1, 2, 3, 4], ("prune",), check=_data("classes 0-4 of 10")),
    # backbone (MCP from scratch)
    "backbone.name": Case(
        "torchvision/resnet18",
        ("prune",),
        {"backbone.width_multiplier": None},
        check=_hparam("prune", "backbone", "torchvision/resnet18"),
    ),
    "backbone.small_input": Case(
        False, ("prune",), check=_backbone_kwarg("small_input", False)
    ),
    "backbone.width_multiplier": Case(
        0.75, ("prune",), check=_backbone_kwarg("width_multiplier", 0.75)
    ),
    "backbone.weights": Case("tiny_dense", ("prune",)),
    # pretrain
    "pretrain.dense_checkpoint": Case(
        "tiny_dense",
        ("prune",),
        check=lambda out, r: _done(out, "prune")["dense_load_report"][0].startswith(
            "format:"
        ),
    ),
    "pretrain.epochs": Case(
        2, ("pretrain",), check=lambda out, r: _steps(out, "pretrain") == 4
    ),
    "pretrain.max_steps": Case(
        1, ("pretrain",), check=lambda out, r: _steps(out, "pretrain") == 1
    ),
    "pretrain.batch_size": Case(
        16, ("pretrain",), check=_hparam("pretrain", "batch_size_per_device", 16)
    ),
    "pretrain.lr": Case(0.1, ("pretrain",), check=_hparam("pretrain", "lr", 0.1)),
    "pretrain.weight_decay": Case(
        1e-3, ("pretrain",), check=_hparam("pretrain", "weight_decay", 1e-3)
    ),
    # Model settings shared by both methods: MCP's stage runs MoCo v2's code too.
    "pretrain.temperature": Case(
        0.2, ("prune",), check=_hparam("prune", "temperature", 0.2)
    ),
    "pretrain.momentum": Case(0.9, ("prune",), check=_hparam("prune", "momentum", 0.9)),
    "pretrain.memory_bank_size": Case(
        0, ("prune",), check=_hparam("prune", "memory_bank_size", 0)
    ),
    "pretrain.projection_hidden_dim": Case(
        24, ("prune",), check=_hparam("prune", "projection_hidden_dim", 24)
    ),
    "pretrain.projection_dim": Case(
        12, ("prune",), check=_hparam("prune", "projection_dim", 12)
    ),
    "pretrain.projection_batch_norm": Case(
        False, ("prune",), check=_hparam("prune", "projection_batch_norm", False)
    ),
    "pretrain.split_batch_norm": Case(
        2, ("prune", "export"), check=_hparam("prune", "split_batch_norm", 2)
    ),
    "pretrain.symmetric_loss": Case(
        True, ("prune",), check=_hparam("prune", "symmetric_loss", True)
    ),
    "pretrain.warmup_epochs": Case(
        2, ("pretrain",), check=_hparam("pretrain", "warmup_epochs", 2)
    ),
    "pretrain.keep_every_n_epochs": Case(1, ("pretrain",), check=_epoch_checkpoints),
    # mcp
    "mcp.pruning_ratio": Case(
        0.3,
        ("prune",),
        check=lambda out, r: _done(out, "prune")["pruning_ratio"] == 0.3,
    ),
    "mcp.round_to": Case(4, ("prune", "export"), check=_aligned),
    "mcp.target_params": Case(
        0.6,
        ("prune",),
        {"mcp.pruning_ratio": None},
        check=lambda out, r: 0 < _done(out, "prune")["pruning_ratio"] < 1,
    ),
    "mcp.rho": Case(0.05, ("prune",), check=_hparam("prune", "rho", 0.05)),
    "mcp.rho_growth": Case(1.5, ("prune",), check=_hparam("prune", "rho_growth", 1.5)),
    # Long enough blocks for SGD momentum (too short ones: tests/app/test_preflight.py):
    # blocks of 4 steps with the paper's restarting rate, a small response.
    "mcp.rho_response": Case(
        0.05,
        ("prune",),
        {"mcp.lr_schedule": "block_step", "mcp.admm_interval": 4, "mcp.epochs": 4},
        check=_hparam("prune", "rho_response", 0.05),
    ),
    "mcp.admm_interval": Case(
        3, ("prune",), check=_hparam("prune", "admm_interval", 3)
    ),
    "mcp.admm_interval_unit": Case(
        "steps", ("prune",), check=_hparam("prune", "admm_interval_unit", "steps")
    ),
    "mcp.lr_schedule": Case(
        "block_cosine",
        ("prune",),
        check=_hparam("prune", "lr_schedule", "block_cosine"),
    ),
    "mcp.frozen_blocks": Case(
        1, ("prune",), check=_hparam("prune", "frozen_blocks", 1)
    ),
    "mcp.frozen_mask": Case(
        "hard",
        ("prune",),
        {"mcp.frozen_blocks": 1},
        check=_hparam("prune", "frozen_mask", "hard"),
    ),
    "mcp.transition": Case(
        "stable_mask", ("prune",), check=_hparam("prune", "transition", "stable_mask")
    ),
    "mcp.frq": Case(2, ("prune",), check=_hparam("prune", "frq", 2)),
    "mcp.dr": Case(2, ("prune",), check=_hparam("prune", "dr", 2)),
    "mcp.schedule": Case(  # 8 steps: blocks of 4, rho for a response small enough
        "converging",
        ("prune",),
        {
            "mcp.admm_interval": 1,
            "mcp.admm_interval_unit": "epochs",
            "mcp.rho_response": 0.001,
            "mcp.max_steps": 8,
            "mcp.epochs": 4,
        },
        check=_converging,
    ),
    "mcp.mask_updates": Case(
        "fixed", ("prune",), check=_hparam("prune", "mask_updates", "fixed")
    ),
    "mcp.recalibration_batches": Case(
        0, ("prune",), check=_hparam("prune", "recalibration_batches", 0)
    ),
    "mcp.keep_output_dim": Case(False, ("prune", "export"), check=_narrower_features),
    "mcp.compact_keys": Case(
        False, ("prune",), check=_hparam("prune", "compact_keys", False)
    ),
    "mcp.epochs": Case(2, ("prune",), check=lambda out, r: _steps(out, "prune") == 4),
    "mcp.max_steps": Case(
        1, ("prune",), check=lambda out, r: _steps(out, "prune") == 1
    ),
    "mcp.batch_size": Case(
        16, ("prune",), check=_hparam("prune", "batch_size_per_device", 16)
    ),
    "mcp.lr": Case(0.1, ("prune",), check=_hparam("prune", "lr", 0.1)),
    "mcp.weight_decay": Case(
        1e-3, ("prune",), check=_hparam("prune", "weight_decay", 1e-3)
    ),
    # export (from the shared MCP checkpoint)
    # A widening after training (MCP's counts are multiples of 8 already).
    "export.round_to": Case(16, ("export",), check=_kept_multiple_of(16)),
    "export.recalibrate_bn": Case(
        True, ("export",), check=lambda out, r: r["export"]["bn_recalibrated"]
    ),
    "export.latency": Case(
        False, ("export",), check=lambda out, r: r["export"]["speedup"]["bs1"] is None
    ),
    "export.torchscript": Case(
        True,
        ("export",),
        check=lambda out, r: "model.ts" in r["export"]["files"]["written"],
    ),
    "export.latency_repeats": Case(
        1,
        ("export",),
        {"export.latency": True},
        check=lambda out, r: (
            r["export"]["speedup"]["bs1"] > 0
            and r["export"]["speedup"]["at_224"]["bs1"] is None
        ),
    ),
    "export.latency_at_224": Case(
        True,
        ("export",),
        {"export.latency": True, "export.latency_repeats": 1},
        check=lambda out, r: r["export"]["speedup"]["at_224"]["bs1"] > 0,
        patches={
            "lightly_mcp.formats.export.DEPLOY_RESOLUTION": 24
        },  # not 224 px (speed)
    ),
    # eval (the shared MCP checkpoint and its export)
    "eval.k": Case(5, ("evaluate",), check=_eval_setting("k", 5)),
    "eval.temperature": Case(
        0.5, ("evaluate",), check=_eval_setting("temperature", 0.5)
    ),
    "eval.linear_epochs": Case(
        2, ("evaluate",), check=_eval_setting("linear_epochs", 2)
    ),
    "eval.batch_size": Case(16, ("evaluate",)),
    "eval.train_subset": Case(32, ("evaluate",), check=_evaluated("num_train", 32)),
    "eval.test_subset": Case(16, ("evaluate",), check=_evaluated("num_test", 16)),
    "eval.baselines": Case(False, ("evaluate",), check=_baselines_skipped),
    "eval.runtime": Case("torch", ("evaluate",), check=_in_pytorch),
    "eval.transfer": Case(
        ["held_out_classes", "digits"],
        ("evaluate",),
        {"data.classes": [0, 1, 2, 3, 4]},
        check=_transfer,
    ),
    # trainer
    "trainer.accelerator": Case("cpu", ("prune",)),
    "trainer.devices": Case("auto", ("prune",)),
    "trainer.strategy": Case("single_device", ("prune",)),
    "trainer.precision": Case("bf16-mixed", ("prune",)),
    "trainer.channels_last": Case(
        False, ("prune",), check=_hparam("prune", "channels_last", False)
    ),
    "trainer.log_every_n_steps": Case(
        1,
        ("prune",),
        check=lambda out, r: (out / "prune" / "logs" / "metrics.csv").is_file(),
    ),
}

KEYS = recipe_keys()


def test_every_recipe_key_has_a_case() -> None:
    missing = sorted(set(KEYS) - set(CASES))
    assert not missing, f"recipe keys without a case in CASES: {missing}"
    assert not set(CASES) - set(KEYS), "cases of keys the recipe does not have"


def _resolve(value: Any, tmp: Path, tiny_dense: Path) -> Any:
    if value == "tmp":
        (tmp / "empty").mkdir(exist_ok=True)
        return str(tmp / "empty")
    if value == "tiny_dense":
        return str(tiny_dense)
    if value == "fashion_mnist_files":
        return _fashion_mnist_files(tmp)
    return value


@pytest.mark.parametrize("key", KEYS)
def test_recipe_key(
    key: str,
    tmp_path: Path,
    tiny_dense: Path,
    tiny_pruned: Path,
    tiny_exported: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = CASES.get(key)
    if case is None:
        pytest.fail(f"recipe key '{key}' has no case: add one to CASES")
    for target, patched in case.patches.items():
        monkeypatch.setattr(target, patched)
    value = _resolve(case.value, tmp_path, tiny_dense)
    assert value != default_of(key), f"the case of {key} is its default"
    overrides = {
        k: _resolve(v, tmp_path, tiny_dense) for k, v in {**case.extra}.items()
    }
    overrides[key] = value
    recipe = tiny_recipe(overrides)
    assert _get(recipe, key) == value != default_of(key)
    results = _run_stages(
        recipe, case.stages, tmp_path / "run", tiny_dense, tiny_pruned, tiny_exported
    )
    if case.check is not None:
        assert case.check(tmp_path / "run", results) is not False, key


def _get(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _run_stages(
    recipe: Recipe,
    stages: tuple[str, ...],
    out: Path,
    tiny_dense: Path,
    tiny_pruned: Path,
    tiny_exported: Path,
) -> Results:
    """Runs the stages a key affects, each from the previous one's output or, when
    it did not run, from the session's tiny checkpoints and export."""
    results: Results = {}
    dense = recipe.pretrain.dense_checkpoint
    if "pretrain" in stages:
        results["pretrain"] = dense = pipeline.pretrain(recipe, out, progress=False)
    pruned = tiny_pruned
    if "prune" in stages:
        pruned = pipeline.prune(
            recipe, Path(dense) if dense else None, out, progress=False
        )
    exported = out
    if "export" in stages:
        quiet = Console(file=io.StringIO())
        results["export"] = pipeline.export_stage(recipe, pruned, out, quiet)
    elif "evaluate" in stages:
        exported = tiny_exported
        results["export"] = pipeline.read_json(exported / "export" / "report.json")
    if "evaluate" in stages:
        networks = pipeline.load_backbone_for_eval(pruned, recipe)
        networks["compact"] = pipeline.exported_compact(
            recipe, pruned, exported, results["export"]
        )
        results["evaluate"] = pipeline.evaluate(
            networks,
            recipe,
            out / "eval" / "eval.json",
            progress=False,
            baselines=recipe.eval.baseline_names,
        )
    return results
