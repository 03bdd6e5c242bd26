"""Exact resume, divergence, unsafe files and signals (the reliability issue)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback

from lightly_mcp.checkpoints import CheckpointError, read_checkpoint
from lightly_mcp.cli import main
from lightly_mcp.mcp import MCP
from lightly_mcp.moco_v2 import TrainingDivergedError
from tests.helpers import TINY, loader, trainer
from tests.test_cli import TINY_RECIPE

MCP_ARGS = dict(
    pruning_ratio=0.5,
    frq=3,
    dr=1,
    admm_interval=3,
    admm_interval_unit="steps",
    rho=0.05,
    input_size=16,
)


def _model() -> MCP:
    torch.manual_seed(0)
    return MCP(**TINY, **MCP_ARGS)


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """4 epochs straight == 2 epochs + checkpoint + resume for 2 more (7 steps of
    transition and 2 ADMM updates happen on each side of the split)."""
    straight = _model()
    trainer(tmp_path / "a", max_epochs=4).fit(straight, loader(n=32))

    class StopAfterTwoEpochs(Callback):
        """An interruption: the run is configured for 4 epochs (the LR schedule
        depends on it) but stops after 2."""

        def on_train_epoch_end(self, trainer: pl.Trainer, module: object) -> None:
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    first = _model()
    fit = trainer(tmp_path / "b", max_epochs=4, callbacks=[StopAfterTwoEpochs()])
    fit.fit(first, loader(n=32))
    assert first.transition.iteration == 8
    path = tmp_path / "half.ckpt"
    fit.save_checkpoint(path)
    torch.manual_seed(999)  # the resumed run must not depend on the caller's RNG
    resumed = MCP(**TINY, **MCP_ARGS)
    resumed_fit = trainer(tmp_path / "c", max_epochs=4)
    resumed_fit.fit(resumed, loader(n=32), ckpt_path=str(path), weights_only=True)

    assert resumed.transition.state_dict() == straight.transition.state_dict()
    assert resumed.transition.iteration == 16
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    bank_a, bank_b = straight.criterion.memory_bank, resumed.criterion.memory_bank
    assert torch.allclose(bank_a.bank, bank_b.bank, atol=1e-6)
    assert torch.equal(bank_a.bank_ptr, bank_b.bank_ptr)
    opt_a = straight.trainer.optimizers[0].state_dict()["state"]
    opt_b = resumed_fit.optimizers[0].state_dict()["state"]
    for key in opt_a:
        assert torch.allclose(
            opt_a[key]["momentum_buffer"], opt_b[key]["momentum_buffer"], atol=1e-6
        )
    lr_a = straight.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    lr_b = resumed_fit.lr_scheduler_configs[0].scheduler.state_dict()
    assert lr_a["last_epoch"] == lr_b["last_epoch"]


def test_nan_loss_stops_with_the_likely_cause(tmp_path: Path) -> None:
    model = MCP(**TINY, **{**MCP_ARGS, "rho": 1e38})
    with pytest.raises(TrainingDivergedError, match="rho is probably too large"):
        trainer(tmp_path, max_steps=3).fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        read_checkpoint(path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    for argv in (
        ["export", str(path), "--out", str(tmp_path / "e")],
        ["prune", str(recipe), "--from", str(path), "--out", str(tmp_path / "p")],
        ["evaluate", str(path), str(recipe), "--out", str(tmp_path / "v")],
    ):
        assert main(argv) == 2
        assert "cannot be read safely" in capsys.readouterr().err
    assert not marker.exists()


def test_plain_state_dict_where_a_checkpoint_is_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_model().state_dict(), path)
    assert main(["export", str(path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert not (tmp_path / "e").exists()


def test_truncated_resume_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    stage = tmp_path / "run" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["pretrain", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot resume pretrain" in err and "Delete" in err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightly_mcp", *args]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_run_survives_sigterm_and_sigkill(tmp_path: Path, sig: signal.Signals) -> None:
    recipe = dict(TINY_RECIPE)
    recipe["mcp"] = {**TINY_RECIPE["mcp"], "epochs": 40}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        _cli("run", str(path), "--out", str(out), "--quiet"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until MCP has written an end-of-epoch checkpoint, then interrupt it.
    _wait_for(out / "prune" / "last.ckpt", process)
    pretrain_mtime = (out / "pretrain" / "final.ckpt").stat().st_mtime
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert process.returncode == 143, err
        assert "stopped by SIGTERM" in err and "Run the same command again" in err
    else:
        assert process.returncode == -signal.SIGKILL
    interrupted = read_checkpoint(out / "prune" / "last.ckpt")  # complete, not torn
    assert interrupted["global_step"] >= 4
    assert not (out / "prune" / "done.json").exists()

    finish = subprocess.run(
        _cli("run", str(path), "--out", str(out), "--quiet", "--set", "mcp.epochs=40"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finish.returncode == 0, finish.stderr
    assert (out / "report.json").is_file()
    assert (out / "pretrain" / "final.ckpt").stat().st_mtime == pretrain_mtime
    done = read_checkpoint(out / "prune" / "final.ckpt")
    assert done["global_step"] == 40 * 4  # 64 images / batch 16, 40 epochs
