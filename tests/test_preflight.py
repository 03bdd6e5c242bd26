"""The preflight: late-stage failures found in seconds, before any training, and
nothing written (``lightly_mcp.preflight``, ``--dry-run``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightly_mcp import export as export_module
from lightly_mcp.checkpoints import read_checkpoint
from lightly_mcp.cli import main
from lightly_mcp.export import ExportError
from lightly_mcp.preflight import PreflightError, for_command, preflight
from tests.tiny import tiny_recipe, write_tiny


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_dry_run_checks_every_stage_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_tiny(tmp_path, {"eval.baselines": True})
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--dry-run", "--quiet"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    for check in (
        "one MoCo v2 step",
        "MCP schedule (2 steps in 2 ADMM blocks of 1,",
        "MCP steps with an ADMM update",
        "export self-check",
        "evaluation pass (dense, subnet, compact, baselines)",
        "dry run: nothing was trained or written",
    ):
        assert check in printed, check
    assert not out.exists()


def test_a_broken_late_stage_is_caught_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_dense: Path,
) -> None:
    """As the export of ``keep_output_dim: false`` was before 4e5d0ce: it failed
    only after the whole prune stage."""

    def broken(*args: object, **kwargs: object) -> None:
        raise ExportError(
            "Compact output shape (4, 346) differs from the momentum subnet's."
        )

    monkeypatch.setattr(export_module, "compact_and_check", broken)
    recipe = write_tiny(tmp_path, {"pretrain.dense_checkpoint": str(tiny_dense)})
    out = tmp_path / "run"
    message = _error(capsys, ["run", str(recipe), "--out", str(out), "--quiet"])
    assert message.startswith("lightly-mcp: error: the export stage would fail: ")
    assert "Compact output shape (4, 346)" in message
    assert "before any training" in message
    assert not (out / "prune").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        # Too short for SGD momentum: refused at train start, here before it.
        ({"mcp.rho_response": 1.0}, r"ADMM blocks of 1 steps are too short"),
        ({"mcp.frozen_blocks": 2}, r"frozen_blocks \(2\) must be smaller than the "),
        ({"data.subset": 4}, r"batch size 8 is larger than the training set"),
    ],
)
def test_recipe_errors_of_late_stages_come_before_training(
    tmp_path: Path,
    override: dict,
    expected: str,
    tiny_dense: Path,
) -> None:
    recipe = tiny_recipe(override)
    with pytest.raises(PreflightError, match=expected):
        preflight(recipe, "prune", None)
    assert not any(tmp_path.iterdir())


def test_preflight_leaves_the_run_unchanged(
    tmp_path: Path,
    tiny_dense: Path,
    tiny_pruned: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same prune stage after the preflight as without it (``tiny_pruned``)."""
    recipe = write_tiny(tmp_path)
    out = tmp_path / "run"
    argv = ["prune", str(recipe), "--from", str(tiny_dense), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    assert "preflight passed" in capsys.readouterr().out
    states = [
        read_checkpoint(path)["state_dict"]
        for path in (tiny_pruned, out / "prune" / "final.ckpt")
    ]
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_preflight_only_before_training(tmp_path: Path, tiny_dense: Path) -> None:
    recipe = tiny_recipe({"pretrain.dense_checkpoint": str(tiny_dense)})
    out = tmp_path / "run"
    (out / "prune").mkdir(parents=True)
    (out / "prune" / "done.json").write_text(json.dumps({}))
    assert for_command("run", recipe, out) is None  # nothing left to train
    assert for_command("prune", recipe, out, tiny_dense) is None
    assert not (out / "pretrain").exists()


def test_the_quickstart_as_shipped_passes_its_preflight_on_both_data_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real quickstart's schedule (its blocks, frozen block, derived ρ) holds on
    Fashion-MNIST and on the digits fallback, whose epochs are much shorter."""
    from lightly_mcp.data import FASHION_MNIST_ROOT

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipe names the shipped checkpoint relatively
    (tmp_path / "empty").mkdir()
    sources = [["--set", f"data.root={tmp_path / 'empty'}"]]  # digits
    if Path(FASHION_MNIST_ROOT).is_dir():
        sources.append([])
    for extra in sources:
        out = tmp_path / "run"
        argv = ["run", "recipes/quickstart.yaml", "--out", str(out), "--dry-run"]
        assert main([*argv, "--quiet", *extra]) == 0, extra
        printed = " ".join(capsys.readouterr().out.split())
        assert "MCP schedule (200 steps in 2 ADMM blocks of 100," in printed, extra
        assert not out.exists()
