"""The preflight: late-stage failures found in seconds, before any training, and
nothing written (``lightly_mcp.app.preflight``, ``--dry-run``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightly_mcp.app import preflight as preflight_module
from lightly_mcp.app.cli import main
from lightly_mcp.app.preflight import PreflightError, for_command, preflight
from lightly_mcp.formats import export as export_module
from lightly_mcp.formats.export import ExportError
from lightly_mcp.methods.checkpoints import read_checkpoint
from tests.helpers import MAX_MESSAGE, message_length
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
        "evaluation pass (dense, subnet, compact, raw_pixels, random_init)",
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
    assert message.startswith(
        "lightly-mcp: error: export stage (preflight; nothing written): "
    )
    assert "Compact output shape (4, 346)" in message
    assert message_length(message) <= MAX_MESSAGE
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


def test_preflight_is_seeded_and_leaves_the_callers_random_state(
    tmp_path: Path,
) -> None:
    """The same recipe gives the same preflight (its own RNGs are seeded with the
    recipe's seed), and the caller's random state is restored, a failure included.
    Before, the preflight drew from whatever state the process had, so the same
    command passed or failed from one call to the next."""
    import random

    import numpy as np

    recipe = tiny_recipe()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    saved: list[dict] = []
    export_stage = preflight_module._export

    def keep(recipe: object, checkpoint: Path, *args: object) -> dict:
        saved.append(read_checkpoint(checkpoint)["state_dict"])
        return export_stage(recipe, checkpoint, *args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preflight_module, "_export", keep)
        preflight(recipe, "prune", None)
        torch.rand(7)  # a caller's draws between two preflights change nothing
        preflight(recipe, "prune", None)
    assert len(saved) == 2
    for key, value in saved[0].items():
        assert torch.equal(value, saved[1][key]), key
    with pytest.raises(PreflightError):
        preflight(tiny_recipe({"mcp.frozen_blocks": 2}), "prune", None)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()


@pytest.mark.parametrize("seed", [11])
def test_a_few_images_do_not_make_the_preflight_diverge(seed: int) -> None:
    """With the tiny recipe (BatchNorm over 4 images at 1x1 resolution), this seed's
    unclipped preflight steps blew the weights up to NaN and the preflight refused a
    recipe whose real run trains; its steps now clip their gradients."""
    result = preflight(tiny_recipe({"seed": seed}), "pretrain", None)
    assert any("MCP steps with an ADMM update" in line for line in result.checked)


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

    root = Path(__file__).resolve().parents[2]
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
