"""Hostile output folders (issue 34, items 3, 4, 6-10): no write through a link,
atomic writes, ``--restart`` deleting only what runs wrote, an export that never
replaces a folder it did not create, the user's own files refused, and outputs
reused only with their provenance."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightly_mcp.app import pipeline
from lightly_mcp.app.cli import main
from lightly_mcp.app.run_folder import STAGES, check_recipe, clear_outputs, output_lock
from lightly_mcp.errors import OutputFolderError
from tests.helpers import MAX_MESSAGE, message_length
from tests.tiny import tiny_recipe, write_tiny


def _one_error_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> str:
    """The one line the command printed; at most 200 characters, paths aside."""
    lines = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if line.startswith("lightly-mcp")
    ]
    assert len(lines) == 1, lines
    assert lines[0].startswith("lightly-mcp: error: ")
    message = lines[0].removeprefix("lightly-mcp: error: ")
    assert len(message.replace(str(tmp_path), "T")) <= 200, message
    return lines[0]


# --- 3: no write through a symbolic link --------------------------------------------
def test_links_in_the_run_folder_are_never_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightly_mcp.app.recipe import dump_recipe
    from lightly_mcp.methods.loggers import ResumableCSVLogger

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    (out / "prune" / "logs").mkdir(parents=True)

    (out / ".lock").symlink_to(victim)
    with pytest.raises(OutputFolderError, match="is a symbolic link"):
        with output_lock(out):
            pass
    (out / ".lock").unlink()

    (out / "recipe.yaml").symlink_to(victim)
    dump_recipe(tiny_recipe(), out / "recipe.yaml")  # replaces the link itself
    assert not (out / "recipe.yaml").is_symlink()
    (out / "recipe.yaml").unlink()

    metrics = out / "prune" / "logs" / "metrics.csv"
    metrics.symlink_to(victim)
    logger = ResumableCSVLogger(str(out / "prune"), name="logs", version="")
    with pytest.raises(OutputFolderError, match="is a symbolic link"):
        logger.log_metrics({"train_loss": 1.0}, step=0)
        logger.save()
    recipe = write_tiny(tmp_path)
    argv = ["run", str(recipe), "--out", str(out), "--quiet", "--no-preflight"]
    assert main(argv) == 2
    line = _one_error_line(capsys, tmp_path)
    assert f"'{metrics}' is a symbolic link" in line
    assert victim.read_text() == "precious\n"


# --- 4: a full disk during a checkpoint save ----------------------------------------
def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightly_mcp.app.assemble import trainer_for

    stage = tmp_path / "prune"
    stage.mkdir()
    trainer = trainer_for(tiny_recipe(), stage, 1, -1, progress=False)
    io_plugin = trainer.strategy.checkpoint_io
    last = stage / "last.ckpt"
    io_plugin.save_checkpoint({"step": 1}, last)
    before = last.read_bytes()
    big = {"step": 2, "weights": torch.zeros(1 << 18)}  # 1 MB

    # A real mid-file failure: writes past 64 kB fail (EFBIG), as on a full disk.
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))
    try:
        with pytest.raises(OutputFolderError) as caught:
            io_plugin.save_checkpoint(big, last)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    message = str(caught.value)
    assert f"cannot write '{last}'" in message and "another --out" in message
    assert message_length(message) <= MAX_MESSAGE
    assert last.read_bytes() == before
    assert sorted(p.name for p in stage.iterdir()) == ["last.ckpt"]  # no temp file

    # ENOSPC in the middle of the file: the same, and the message says the disk.
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, file: Any) -> None:
            self.file = file

        def write(self, data: Any) -> int:
            self.file.write(bytes(data)[:1000])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *args: object) -> None:
            self.file.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OutputFolderError, match="the disk is full"):
        io_plugin.save_checkpoint(big, last)
    assert last.read_bytes() == before
    assert sorted(p.name for p in stage.iterdir()) == ["last.ckpt"]


# --- 6: --restart deletes only what runs wrote ---------------------------------------
USER_FILES = (
    "export/model.onnx.backup",
    "export/model.onnx_versions/v1.onnx",
    ".export-mine/notes.txt",
    ".report.json.mine",
    ".done.json.mine",
    "prune/.final.ckpt.tmp",
    "recipe.yaml",
)


def test_restart_deletes_only_the_files_runs_wrote(tmp_path: Path) -> None:
    for out, with_manifest in ((tmp_path / "old", False), (tmp_path / "new", True)):
        for name in USER_FILES:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("mine")
        ours = ["prune/final.ckpt", "prune/done.json", "export/model.pt2"]
        for name in ours:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            if with_manifest:
                from lightly_mcp.app import manifest

                manifest.write_file(out, name, b"ours")
            else:  # a folder of an older lightly-mcp: no manifest
                (out / name).write_bytes(b"ours")
        events = out / "prune" / "tensorboard" / "events.out.tfevents.1.host.2.0"
        events.parent.mkdir(parents=True)
        events.write_bytes(b"ours")
        if with_manifest:
            manifest.record(out, ["prune/tensorboard/events.out.tfevents.1.host.2.0"])
        clear_outputs(out, "prune")
        for name in USER_FILES:
            assert (out / name).read_text() == "mine", (out, name)
        for name in ours:
            assert not (out / name).exists(), (out, name)
        assert events.exists() != with_manifest
    # A listed record the user has changed since is theirs now: kept.
    from lightly_mcp.app import manifest

    out = tmp_path / "new"
    manifest.write_json(out, "report.json", {"ours": True})
    (out / "report.json").write_text("my notes")
    clear_outputs(out, "pretrain")
    assert (out / "report.json").read_text() == "my notes"


# --- 7: export never replaces a folder it did not create -----------------------------
def test_export_keeps_a_folder_created_while_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightly_mcp.formats import export as export_module

    out = tmp_path / "exported"
    # The temporary folder of an export killed earlier (SIGKILL) is cleaned; a
    # folder of the user's with a similar name is not.
    stale = tmp_path / ".export-k1ll3d"
    stale.mkdir()
    (stale / ".lightly-mcp-export-in-progress").write_text("")  # the marker
    (stale / "model.pt").write_bytes(b"partial")
    (tmp_path / ".export-mine").mkdir()
    (tmp_path / ".export-mine" / "notes.txt").write_text("mine")

    class Report:
        def to_dict(self) -> dict[str, Any]:
            return {"files": {"written": ["model.pt2"]}}

    def build_while_the_user_creates_out(
        model: Any, masks: Any, folder: Path, **k: Any
    ) -> Any:
        (folder / "model.pt2").write_bytes(b"program")
        out.mkdir()
        (out / "mine.txt").write_text("mine")
        return Report()

    # Only the folder handling is real: the model is not read nor built.
    monkeypatch.setattr(export_module, "load_mcp_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(export_module, "export_masks", lambda *a, **k: [])
    monkeypatch.setattr(export_module, "_build", build_while_the_user_creates_out)
    with pytest.raises(export_module.ExportError, match="while the export ran"):
        export_module.export(tmp_path / "mcp.ckpt", out, latency=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export-mine", "exported"]
    assert (tmp_path / ".export-mine" / "notes.txt").read_text() == "mine"


# --- 8: the user's own files at the paths a run writes -------------------------------
def test_run_refuses_to_overwrite_the_users_recipe_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "project"
    recipe = write_tiny(folder)
    text = "# my comments\n" + recipe.read_text()
    recipe.write_text(text)
    argv = ["run", str(recipe), "--out", str(folder), "--quiet", "--no-preflight"]
    assert main(argv) == 2
    assert "the recipe" in _one_error_line(capsys, tmp_path)
    assert recipe.read_text() == text
    (folder / "report.json").write_text('{"mine": 1}')
    other = write_tiny(tmp_path / "elsewhere")
    argv[1] = str(other)
    assert main(argv) == 2
    line = _one_error_line(capsys, tmp_path)
    assert f"'{folder / 'report.json'}'" in line and "not written by" in line
    assert recipe.read_text() == text
    assert (folder / "report.json").read_text() == '{"mine": 1}'


# --- 9: outputs whose recorded recipe is missing -------------------------------------
def test_outputs_without_their_recorded_recipe_are_not_reused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "done.json").write_text("{}")
    (out / "pretrain" / "final.ckpt").write_bytes(b"")
    with pytest.raises(OutputFolderError, match="recorded recipe .* is missing"):
        check_recipe(tiny_recipe({"mcp.pruning_ratio": 0.2}), out, STAGES)


def test_recorded_recipe_messages_are_short_and_name_the_record(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    (out / "prune").mkdir(parents=True)
    (out / "prune" / "last.ckpt").write_bytes(b"")
    recipe = tiny_recipe({"mcp.pruning_ratio": 0.2})
    with pytest.raises(OutputFolderError) as missing:
        check_recipe(recipe, out, STAGES)
    message = str(missing.value)
    assert "prune/last.ckpt" in message and "prune/recipe.yaml is missing" in message
    assert message.count(str(out)) == 1 and message_length(message) <= MAX_MESSAGE
    (out / "prune" / "recipe.yaml").write_bytes(b"\x00\xff: [garbage")
    with pytest.raises(OutputFolderError) as garbage:
        check_recipe(recipe, out, STAGES)
    message = str(garbage.value)
    assert "prune/recipe.yaml cannot be read" in message and "--restart" in message
    assert message_length(message) <= MAX_MESSAGE
    other = tiny_recipe({"mcp.pruning_ratio": 0.4, "seed": 7, "mcp.lr": 0.5})
    (out / "prune" / "recipe.yaml").write_text(yaml.safe_dump(other.to_dict()))
    with pytest.raises(OutputFolderError) as differs:
        check_recipe(recipe, out, STAGES)
    message = str(differs.value)
    assert "another recipe (prune/recipe.yaml)" in message and "more" in message
    assert message.count(str(out)) == 1 and message_length(message) <= MAX_MESSAGE


# --- 10: eval.json reused only from this run, with the same provenance ---------------
def test_eval_json_is_reused_only_when_this_run_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff{not json")
    with pytest.raises(OutputFolderError, match="garbage.json' cannot be read"):
        pipeline.read_json(garbage)

    # Every stage but the evaluation is faked: only the reuse rule is tested.
    ckpt = out / "prune" / "final.ckpt"
    monkeypatch.setattr(pipeline, "pretrain", lambda *a, **k: out / "pretrain" / "f")
    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: ckpt)
    monkeypatch.setattr(pipeline, "export_stage", lambda *a, **k: {})
    monkeypatch.setattr(pipeline, "write_plots", lambda *a, **k: [])
    net = torch.nn.Identity()
    monkeypatch.setattr(
        pipeline,
        "load_backbone_for_eval",
        lambda *a, **k: {"dense": net, "subnet": net},
    )
    monkeypatch.setattr(pipeline, "exported_compact", lambda *a, **k: net)
    evaluated: list[int] = []

    def fake_evaluate(networks: Any, recipe: Any, out_file: Path, *a: Any) -> Any:
        evaluated.append(recipe.eval.k)
        result = {"knn_top1": recipe.eval.k / 100, "linear_top1": 0.0}
        results = {"data": {}, "models": dict.fromkeys(networks, result)}
        results["provenance"] = a[3]  # (device, progress, baselines, provenance, ...)
        from lightly_mcp.io.files import write_json_atomic

        write_json_atomic(out_file, results)
        return results

    monkeypatch.setattr(pipeline, "evaluate", fake_evaluate)
    monkeypatch.setattr(pipeline, "check_recipe", lambda *a, **k: None)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"model")

    # Another model's evaluation (as `lightly-mcp evaluate ... --out OUT/eval`
    # writes it) is refused, never taken as this run's.
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text(
        json.dumps(
            {"data": {}, "models": {"dense": {"knn_top1": 0.9, "linear_top1": 0}}}
        )
    )
    with pytest.raises(OutputFolderError, match="eval.json' was not written by"):
        pipeline.run(tiny_recipe(), out, progress=False)
    os.unlink(out / "eval" / "eval.json")

    report = pipeline.run(tiny_recipe({"eval.k": 5}), out, progress=False)
    assert report["dense"]["knn_top1"] == 0.05 and evaluated == [5]
    pipeline.run(tiny_recipe({"eval.k": 5}), out, progress=False)  # reused
    assert evaluated == [5]
    report = pipeline.run(tiny_recipe({"eval.k": 7}), out, progress=False)
    assert report["dense"]["knn_top1"] == 0.07 and evaluated == [5, 7]
    ckpt.write_bytes(b"another model")  # same path, other file: evaluated again
    pipeline.run(tiny_recipe({"eval.k": 7}), out, progress=False)
    assert evaluated == [5, 7, 7]


# --- smaller: --out names the file system refuses ------------------------------------
def test_an_out_name_too_long_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_tiny(tmp_path)
    out = tmp_path / ("x" * 300)
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    assert "too long" in _one_error_line(capsys, tmp_path)
