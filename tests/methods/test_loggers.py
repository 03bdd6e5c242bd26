"""metrics.csv of a resumed stage holds the whole curve, each step once."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightly_mcp.methods.loggers import ResumableCSVLogger


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss)
        if self.current_epoch >= 1:
            self.log("late", float(self.global_step))  # a column added after resume
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class _Crash(Exception):
    pass


class _CrashInSecondEpoch(Callback):
    """Saves a checkpoint after epoch 0 (step 3), then crashes after logging more
    steps, as a killed run does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule
    ) -> None:
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 5:
            trainer.loggers[0].save()  # what it logged reached the file
            raise _Crash


def _fit(folder: Path, callbacks: list[Callback], ckpt: Path | None = None) -> None:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=ResumableCSVLogger(str(folder), name="logs", version=""),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(_Regression(), _loader(), ckpt_path=str(ckpt) if ckpt else None)


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "logs" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_resumed_stage_keeps_the_curve_before_the_resume_and_logs_each_step_once(
    tmp_path: Path,
) -> None:
    _fit(tmp_path / "straight", [])
    ckpt = tmp_path / "epoch0.ckpt"
    with pytest.raises(_Crash):
        _fit(tmp_path / "resumed", [_CrashInSecondEpoch(ckpt)])
    interrupted = _rows(tmp_path / "resumed")
    steps = [int(r["step"]) for r in interrupted]
    assert steps == list(range(len(steps))) and steps[-1] >= 3  # past the checkpoint
    _fit(tmp_path / "resumed", [], ckpt=ckpt)

    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert [int(r["step"]) for r in resumed] == list(range(9))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert set(resumed[0]) == set(straight[0]) == {"epoch", "step", "loss", "late"}
    for a, b in zip(straight, resumed, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert a["late"] == b["late"]
    # The rows before the checkpoint are the interrupted run's own.
    assert resumed[:3] == [{**row, "late": ""} for row in interrupted[:3]]


def test_a_fresh_stage_starts_a_fresh_file(tmp_path: Path) -> None:
    _fit(tmp_path / "run", [])
    _fit(tmp_path / "run", [])  # not a resume: steps start again at 0
    steps = [int(r["step"]) for r in _rows(tmp_path / "run")]
    assert steps == list(range(9))
