"""Does the ADMM mask settle? The per-block record of an MCP run, as a table.

Successor of ``admm_response.py`` for real runs: every ADMM update of an MCP training
run records the block's predicted θ-response (``ρ · Σ lr / (1 − momentum)``), its
measured response α (how far θ_q moved towards ``Z − U``: 1 − residual at the end /
residual at the start), the channels whose mask changed, and ‖θ_q − Z‖ / ‖θ_q‖ after
the update. ``MCP`` keeps that record in its checkpoint (``mcp_schedule.history``) and
the prune stage copies it into ``prune/done.json`` (``admm_blocks``). A converging run
shows α above 0.29 (the threshold at which the mask holds), no channel changing after
the first blocks, and a relative distance that falls towards 0.

Usage:
    python benchmarks/accuracy/convergence.py runs/mcp92_converging [--out FILE.md]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch

COLUMNS = (
    ("step", "step", "{:.0f}"),
    ("rho", "ρ", "{:.3g}"),
    ("predicted_response", "predicted R", "{:.2f}"),
    ("theta_response", "measured α", "{:.2f}"),
    ("channels_changed", "channels changed", "{:.0f}"),
    ("mask_churn", "churn", "{:.1%}"),
    ("admm_relative_distance", "‖θ_q − Z‖ / ‖θ_q‖", "{:.3f}"),
)


def block_history(run: Path) -> list[dict[str, Any]]:
    """The per-update records of a run folder: ``done.json``, else the checkpoint,
    else the CSV log (runs made before the record existed). ``run`` is a
    ``lightly-mcp run`` folder (its ``prune/`` stage) or an accuracy-grid row's
    folder (``results/runs/<name>_seed<k>``, the stage itself)."""
    if not (run / "prune").is_dir() and (run / "logs").is_dir():
        return _stage_history(run)
    return _stage_history(run / "prune")


def _stage_history(stage: Path) -> list[dict[str, Any]]:
    done = stage / "done.json"
    if done.is_file():
        history: list[dict[str, Any]] = json.loads(done.read_text()).get(
            "admm_blocks", []
        )
        if history:
            return history
    for name in ("final.ckpt", "last.ckpt"):
        path = stage / name
        if path.is_file():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            history = list(checkpoint.get("mcp_schedule", {}).get("history", []))
            if history:
                return history
    metrics = stage / "logs" / "metrics.csv"
    if metrics.is_file():
        return _from_csv(metrics)
    raise FileNotFoundError(f"no ADMM block record under '{stage}'.")


def _from_csv(path: Path) -> list[dict[str, Any]]:
    """Update rows of a Lightning CSV log; Lightning repeats a value logged in
    ``on_train_batch_end`` at the next logging step, so repeats are dropped."""
    records: list[dict[str, Any]] = []
    with path.open() as file:
        for row in csv.DictReader(file):
            if not row.get("theta_response"):
                continue
            record = {k: float(v) for k, v in row.items() if v and k != "epoch"}
            record["step"] += 1  # Lightning logs the step index; we count steps done
            if records and all(
                records[-1].get(k) == record.get(k)
                for k in ("theta_response", "admm_relative_distance")
            ):
                continue
            records.append(record)
    return records


def table(history: list[dict[str, Any]]) -> str:
    """A markdown table, one row per ADMM update."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---:|" * len(COLUMNS),
    ]
    for record in history:
        cells = [
            fmt.format(record[key]) if key in record else "-" for key, _, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a lightly-mcp run folder (--out)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here")
    args = parser.parse_args()
    text = table(block_history(args.run))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
