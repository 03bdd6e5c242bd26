"""A stage of ``lightly-mcp run`` that fails after others finished: what finished is
kept and the message names the command that continues (``lightly_mcp.app.continuation``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightly_mcp.app import pipeline
from lightly_mcp.app.cli import main
from lightly_mcp.app.continuation import continue_commands, finished_stages
from lightly_mcp.formats.export import ExportError
from tests.tiny import write_tiny


def test_failed_export_keeps_the_pruned_model_and_names_the_commands(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_dense: Path,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ExportError("The compact model does not match the masked subnet.")

    recipe = write_tiny(tmp_path, {"pretrain.dense_checkpoint": str(tiny_dense)})
    out = tmp_path / "run"
    run = ["run", str(recipe), "--out", str(out), "--quiet", "--no-preflight"]
    with monkeypatch.context() as patch:  # a failure the preflight cannot see
        patch.setattr(pipeline, "export_stage", broken)
        assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("lightly-mcp")]  # no warnings
    assert len(lines) == 1 and "Traceback" not in "".join(err), err
    message = lines[0]
    pruned = out / "prune" / "final.ckpt"
    assert message.startswith(
        "lightly-mcp: error: The compact model does not match the masked subnet. "
        f"Kept what finished: prune ({pruned})."
    )
    assert f"`lightly-mcp run {recipe} --out {out}` (finished stages are skipped)" in (
        message
    )
    # The recipe's export options (latency: false) come with it.
    export_command = f"lightly-mcp export {pruned} --out {out / 'export'} --no-latency"
    assert f"`{export_command}`" in message
    assert pruned.is_file() and (out / "prune" / "done.json").is_file()

    # The named commands continue from the kept checkpoint: nothing is retrained.
    mtime = pruned.stat().st_mtime
    assert main(export_command.split()[1:]) == 0
    assert main(run) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["prune"] < 1.0 and report["stages"]["export"] < 1.0
    assert pruned.stat().st_mtime == mtime
    assert 0.0 <= report["compact"]["knn_top1"] <= 1.0


def _finish(out: Path, *stages: str) -> None:
    files = {
        "pretrain": ["pretrain/done.json", "pretrain/final.ckpt"],
        "prune": ["prune/done.json", "prune/final.ckpt"],
        "export": ["export/report.json"],
    }
    for stage in stages:
        for name in files[stage]:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("{}")


def test_the_command_that_continues_follows_the_last_finished_stage(
    tmp_path: Path,
) -> None:
    out, recipe = tmp_path / "o", tmp_path / "r.yaml"
    rerun = ["run", str(recipe), "--out", str(out), "--set", "mcp.rho=0.1"]
    assert continue_commands(out, rerun, recipe) == []  # nothing finished
    _finish(out, "pretrain")
    again = f"`lightly-mcp run {recipe} --out {out} --set mcp.rho=0.1`"
    assert continue_commands(out, rerun, recipe) == [
        f"{again} (finished stages are skipped)",
        f"`lightly-mcp prune {recipe} --from {out}/pretrain/final.ckpt --out {out}`",
    ]
    _finish(out, "prune", "export")
    assert set(finished_stages(out)) == {"pretrain", "prune", "export"}
    assert continue_commands(out, rerun, recipe)[1] == (
        f"`lightly-mcp evaluate {out}/export {recipe} --out {out}/eval-compact`"
    )


def test_export_options_follow_the_recipe() -> None:
    from lightly_mcp.app.continuation import export_options

    assert export_options(None, True) == []
    assert export_options(8, False) == ["--round-to", "8", "--no-latency"]
    assert export_options(None, True, latency_at_224=True) == ["--latency-at-224"]
    assert export_options(4, True, torchscript=True) == [
        "--round-to",
        "4",
        "--torchscript",
    ]
    # Nothing is timed without latency, at 224 px neither.
    assert export_options(None, False, latency_at_224=True) == ["--no-latency"]
