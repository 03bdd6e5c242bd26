"""Lightning callbacks and plug-ins of the pipeline: a training clock, epoch
checkpoints, and atomic checkpoint files.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from lightly_mcp.errors import InputError
from lightly_mcp.io.files import write_bytes_atomic


class TrainingClock(Callback):
    """Cumulative training seconds, kept in every checkpoint.

    The time of each fit is added to what the resumed checkpoint had measured, so a
    run interrupted and resumed reports the seconds it really trained. At the end of
    every training epoch the total is logged as ``train_seconds`` (one row per epoch
    in ``metrics.csv``), which is what learning curves against wall time need.
    """

    def __init__(self) -> None:
        self.seconds_before = 0.0
        self._started: float | None = None

    @property
    def seconds(self) -> float:
        """Training seconds so far (earlier fits included)."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.seconds_before + running

    def on_train_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Starts the clock of this fit."""
        self._started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adds this fit's seconds to the total."""
        self.seconds_before = self.seconds
        self._started = None

    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Logs ``train_seconds``."""
        pl_module.log("train_seconds", self.seconds, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        """The seconds so far, saved in checkpoints."""
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continues from a checkpoint's seconds."""
        self.seconds_before = float(state_dict.get("seconds", 0.0))


class KeepEpochCheckpoints(Callback):
    """Keeps the checkpoint of every n-th training epoch as ``epoch=NNN.ckpt``.

    Files are written atomically (:class:`AtomicCheckpointIO`), so a kill never
    leaves a truncated checkpoint. Epoch numbers start at 1 (``epoch=001.ckpt`` is
    the model after one epoch).
    """

    def __init__(
        self, dirpath: str | os.PathLike[str], every_n_epochs: int = 1
    ) -> None:
        if every_n_epochs < 1:
            raise InputError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Saves ``epoch=NNN.ckpt`` when the epoch is a multiple of n."""
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs != 0 or trainer.sanity_checking:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(self.dirpath / f"epoch={epoch:03d}.ckpt"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint writer, made atomic on a local disk.

    Lightning's own writer opens the target and writes into it: a full disk leaves
    a truncated file, and a symbolic link at the target has its target overwritten.
    This one writes a temporary file in the same folder, flushes it to the disk and
    renames it over the target (:func:`lightly_mcp.io.files.atomic_write`); a full
    disk, a quota or a read-only file system is an ``OutputFolderError`` naming the
    folder, and the previous checkpoint stays intact.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        """Writes ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options.")
        buffer = io.BytesIO()  # as Lightning does; a file object hides OSErrors
        torch.save(checkpoint, buffer)
        write_bytes_atomic(path, buffer.getbuffer())
