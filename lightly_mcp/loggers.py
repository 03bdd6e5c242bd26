"""A CSV logger whose ``metrics.csv`` survives a resumed run."""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv``.

    Lightning's writer deletes the file it finds, so a stage resumed from
    ``last.ckpt`` would keep only the curve after the resume. This one keeps the
    rows and their columns, and at the first row the resumed run logs (step ``s``)
    drops the rows with step ≥ ``s``: the interrupted run logged them after the
    checkpoint it resumes from, and the resumed run logs those steps again.
    """

    def __init__(self, log_dir: str) -> None:
        self._kept: list[dict[str, str]] | None = None
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Reads the existing rows instead of deleting them."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            self._kept = list(reader)
            self.metrics_keys = sorted(reader.fieldnames or [])

    def log_metrics(
        self, metrics_dict: dict[str, float], step: int | None = None
    ) -> None:
        """Records metrics, first trimming the kept rows at ``step`` (see above)."""
        if self._kept is not None and step is not None:
            kept = [row for row in self._kept if _step(row) < step]
            with open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._kept = None
        super().log_metrics(metrics_dict, step)


def _step(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("step") or 0))
    except ValueError:
        return 0


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` holds the whole curve of a resumed stage.

    Examples:
        >>> logger = ResumableCSVLogger("run/prune", name="logs", version="")
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The writer, continuing the stage's ``metrics.csv`` where one exists."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
