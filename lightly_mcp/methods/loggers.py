"""A CSV logger whose ``metrics.csv`` survives a resumed run and is written
atomically.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from lightly_mcp.errors import OutputFolderError
from lightly_mcp.io.files import disk_errors_named, write_text_atomic


def _refuse_link(path: str) -> None:
    if os.path.islink(path):
        raise OutputFolderError(
            f"'{path}' is a symbolic link; lightly-mcp never writes through links: "
            "delete it (or move it out) or use another --out folder."
        )


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv``, atomically.

    Lightning's writer deletes the file it finds, so a stage resumed from
    ``last.ckpt`` would keep only the curve after the resume. This one keeps the
    rows and their columns, and at the first row the resumed run logs (step ``s``)
    drops the rows with step ≥ ``s``: the interrupted run logged them after the
    checkpoint it resumes from, and the resumed run logs those steps again.

    Lightning's writer also appends to the file in place (through a symbolic link
    there, and leaving a torn row on a full disk); this one rewrites the whole file
    through :func:`lightly_mcp.io.files.write_text_atomic`, and refuses a link.
    """

    def __init__(self, log_dir: str) -> None:
        self._rows: list[dict[str, Any]] = []
        self._trim_pending = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Reads the existing rows instead of deleting them."""
        _refuse_link(self.log_dir)
        _refuse_link(self.metrics_file_path)
        _refuse_link(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE))
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            self._rows = list(reader)
            self.metrics_keys = sorted(reader.fieldnames or [])
        self._trim_pending = True

    def log_metrics(
        self, metrics_dict: dict[str, float], step: int | None = None
    ) -> None:
        """Records metrics, first trimming the kept rows at ``step`` (see above)."""
        if self._trim_pending and step is not None:
            self._rows = [row for row in self._rows if _step(row) < step]
            self._trim_pending = False
        super().log_metrics(metrics_dict, step)

    def save(self) -> None:
        """Writes every row so far to ``metrics.csv`` atomically."""
        if not self.metrics:
            return
        self._record_new_keys()
        self._rows.extend(self.metrics)
        self.metrics = []
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self._rows)
        write_text_atomic(self.metrics_file_path, text.getvalue())

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Records hyperparameters in ``hparams.yaml``, written atomically."""
        self.hparams.update(params)
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        with disk_errors_named(path):
            fd, tmp = tempfile.mkstemp(dir=self.log_dir, prefix=".hparams.yaml.")
            os.close(fd)
            try:
                save_hparams_to_yaml(tmp, self.hparams)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise


def _step(row: dict[str, Any]) -> int:
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
