"""A resumed stage ends with the uninterrupted stage's model, and signals stop a
command cleanly (issue 34: resume that reproduces the run).

One uninterrupted MCP stage of the tiny recipe (2 epochs of 1 step) is the
reference; each test copies its folder, puts it back in the state an interruption
leaves, runs the stage again and compares ``final.ckpt`` and the compact model.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightly_mcp.app import pipeline
from lightly_mcp.app.cli import main
from lightly_mcp.errors import StageInterrupted
from lightly_mcp.formats.loading import module_from_checkpoint
from lightly_mcp.methods.checkpoints import read_checkpoint
from lightly_mcp.methods.mcp import MCP
from tests.tiny import tiny_recipe, write_tiny

OVERRIDES = {"data.subset": 8, "mcp.epochs": 2}
"""8 images in one batch: ``last.ckpt`` after steps 1 and 2, an ADMM update after step
1 only (none at the end of training)."""


class _KeepCheckpoints(Callback):
    """Keeps ``last.ckpt`` as it is after the first epoch, and a checkpoint of the
    last epoch's end taken before MCP's end-of-training work (what a version that
    did the work in ``on_train_end`` wrote as ``last.ckpt``). Training is unchanged.
    """

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer: pl.Trainer, module: Any) -> None:
        if trainer.current_epoch == 1:
            shutil.copy(self.out / "prune" / "last.ckpt", self.out / "first_epoch.ckpt")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
        # Callbacks without a monitor run before the module's own hook.
        if trainer.current_epoch == 1:
            trainer.save_checkpoint(self.out / "unfinished.ckpt")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted prune stage's folder and two checkpoints it went through."""
    out = tmp_path_factory.mktemp("straight")
    trainer_for = pipeline.trainer_for

    def keeping(*args: Any, **kwargs: Any) -> pl.Trainer:
        trainer = trainer_for(*args, **kwargs)
        trainer.callbacks.append(_KeepCheckpoints(out))
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "trainer_for", keeping)
        final = pipeline.prune(tiny_recipe(OVERRIDES), None, out, progress=False)
    paths = {
        "out": out,
        "final": final,
        "first_epoch": out / "first_epoch.ckpt",
        "unfinished": out / "unfinished.ckpt",
    }
    assert read_checkpoint(paths["first_epoch"])["global_step"] == 1
    return paths


def _interrupted_copy(straight: dict[str, Path], tmp_path: Path) -> Path:
    """The straight run's folder as a kill after its last ``last.ckpt`` leaves it."""
    out = tmp_path / "run"
    shutil.copytree(straight["out"], out)
    (out / "prune" / "final.ckpt").unlink()
    (out / "prune" / "done.json").unlink()
    return out


def _resume(out: Path) -> Path:
    return pipeline.prune(tiny_recipe(OVERRIDES), None, out, progress=False)


def _assert_same_model(resumed: Path, straight: Path) -> None:
    """Every tensor and the MCP state of the two checkpoints are equal."""
    a = read_checkpoint(straight)
    b = read_checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == 2
    assert set(a["state_dict"]) == set(b["state_dict"])
    differing = [
        name
        for name, tensor in a["state_dict"].items()
        if not torch.allclose(tensor.float(), b["state_dict"][name].float(), atol=1e-6)
    ]
    assert differing == []
    assert a["mcp_schedule"] == b["mcp_schedule"]


def _count_recalibrations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    recalibrate = MCP.recalibrate_subnet

    def counted(self: MCP, *args: Any) -> int:
        calls.append(self.global_step)
        return recalibrate(self, *args)

    monkeypatch.setattr(MCP, "recalibrate_subnet", counted)
    return calls


def test_killed_between_last_and_final_checkpoint_resumes_to_the_same_model(
    straight: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step's ``last.ckpt`` is written, the process dies before
    ``final.ckpt``: the resumed stage has nothing left to train (Lightning calls no
    training hook), and still ends with the uninterrupted stage's model, its
    momentum subnet recalibrated, and the same compact model."""
    out = _interrupted_copy(straight, tmp_path)
    recalibrations = _count_recalibrations(monkeypatch)
    resumed = _resume(out)
    assert recalibrations == []  # done before last.ckpt was written
    _assert_same_model(resumed, straight["final"])
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs = []
    for path in (straight["final"], resumed):
        model = module_from_checkpoint(read_checkpoint(path), path)
        assert isinstance(model, MCP)
        with torch.no_grad():
            outputs.append(model.compact_momentum_subnet().eval()(x))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)


def test_a_last_step_checkpoint_without_the_end_of_training_work_gets_it_on_resume(
    straight: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``last.ckpt`` of the last step written before the end-of-training work
    (by a version that did it in ``on_train_end``): the resumed stage does it."""
    out = _interrupted_copy(straight, tmp_path)
    unfinished = read_checkpoint(straight["unfinished"])
    assert unfinished["global_step"] == 2
    assert unfinished["mcp_schedule"]["finished"] is False
    shutil.copy(straight["unfinished"], out / "prune" / "last.ckpt")
    recalibrations = _count_recalibrations(monkeypatch)
    resumed = _resume(out)
    assert recalibrations == [2]
    _assert_same_model(resumed, straight["final"])


@pytest.fixture
def restore_signals() -> Iterator[None]:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in handlers.items():
        signal.signal(number, handler)


def test_resume_from_mid_training_and_a_sigterm_at_its_end_reproduce_the_run(
    straight: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_signals: None,
) -> None:
    """Resumed from the first epoch's ``last.ckpt``, the stage gets a SIGTERM during
    the subnet's BatchNorm recalibration (after the last step): it stops with the
    finished model in ``last.ckpt`` and no ``final.ckpt``; the next run ends with
    the uninterrupted run's model."""
    out = _interrupted_copy(straight, tmp_path)
    shutil.copy(straight["first_epoch"], out / "prune" / "last.ckpt")
    recalibrate = MCP.recalibrate_subnet

    def terminated(self: MCP, *args: Any) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return recalibrate(self, *args)

    monkeypatch.setattr(MCP, "recalibrate_subnet", terminated)
    with pytest.raises(StageInterrupted, match="stopped by SIGTERM at step 2") as stop:
        _resume(out)
    assert stop.value.exit_code == 143
    assert not (out / "prune" / "final.ckpt").exists()
    monkeypatch.undo()
    _assert_same_model(out / "prune" / "last.ckpt", straight["final"])
    _assert_same_model(_resume(out), straight["final"])


def test_ctrl_c_during_training_exits_130_saying_what_is_kept(
    straight: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_signals: None,
) -> None:
    out = _interrupted_copy(straight, tmp_path)
    shutil.copy(straight["first_epoch"], out / "prune" / "last.ckpt")
    recipe = write_tiny(tmp_path, OVERRIDES)

    def ctrl_c(self: MCP, *args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(MCP, "training_step", ctrl_c)
    sigterm = signal.getsignal(signal.SIGTERM)
    argv = ["prune", str(recipe), "--out", str(out), "--quiet", "--no-preflight"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"lightly-mcp: stage 'prune' interrupted by Ctrl-C at step 1; kept its last "
        f"end-of-epoch checkpoint '{out / 'prune' / 'last.ckpt'}'. Run the same "
        "command again to continue."
    ]
    assert read_checkpoint(out / "prune" / "last.ckpt")["global_step"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is sigterm


def test_sigterm_outside_training_exits_143_and_cleans_up(
    straight: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_signals: None,
) -> None:
    """A SIGTERM during an export raises where it lands: the temporary folder is
    removed and the command exits 143 with one line."""
    from lightly_mcp.formats import export

    build = export._build

    def terminated(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)

    monkeypatch.setattr(export, "_build", terminated)
    argv = ["export", str(straight["final"]), "--out", str(tmp_path / "e")]
    assert main([*argv, "--no-latency", "--quiet"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "lightly-mcp: stopped by SIGTERM; run the same command again to continue."
    ]
    assert list(tmp_path.iterdir()) == []
