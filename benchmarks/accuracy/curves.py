"""Training curves of the accuracy grid's runs: loss, mask churn, ‖θ_q − Z‖ / ‖θ_q‖,
θ-response per ADMM block.

Reads every run's CSV log: ``OUT/metrics/<name>_seed<k>.csv`` (the copy the grid
commits when a row finishes), else ``OUT/runs/<name>_seed<k>/logs/metrics.csv``
(Lightning's CSVLogger: one row every ``trainer.log_every_n_steps`` steps; ADMM
quantities are the latest update's value at that step), and the per-block record
(``admm_blocks``) of every MCP row's result JSON. Writes

- ``OUT/training_curves.png``: InfoNCE loss of every row (seed 0), and for the MCP
  rows the channels whose mask changed at an ADMM update (mask churn),
  ``‖θ_q − Z‖ / ‖θ_q‖`` over the output-side parameters and the measured θ-response
  α of every block;
- ``OUT/training_curves.md``: per run, the loss at the start and the end (mean of
  the first / last three logged values), the churn and the relative distance at the
  first and last logged update; then per MCP run the table of its ADMM blocks
  (``convergence.table``).

Usage:
    python benchmarks/accuracy/curves.py benchmarks/accuracy/results
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import table as block_table  # noqa: E402

Series = dict[str, list[tuple[int, float]]]


def read_metrics(path: Path) -> Series:
    """``{column: [(step, value), ...]}`` of a CSVLogger file, empty cells skipped."""
    series: Series = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for column, value in row.items():
                if column in ("epoch", "step") or value in ("", None):
                    continue
                series.setdefault(column, []).append((step, float(value)))
    return series


def run_series(folder: Path) -> dict[str, Series]:
    """Metrics of every run, by run name: the committed copies in
    ``folder/metrics``, then the run folders under ``folder/runs``."""
    paths = {p.stem: p for p in sorted((folder / "metrics").glob("*.csv"))}
    for metrics in sorted((folder / "runs").glob("*/logs/metrics.csv")):
        paths.setdefault(metrics.parents[1].name, metrics)
    return {name: read_metrics(paths[name]) for name in sorted(paths)}


def block_records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The ADMM block record (``admm_blocks``) of every result JSON that has one."""
    records = {}
    for path in sorted(folder.glob("*_seed*.json")):
        blocks = json.loads(path.read_text()).get("admm_blocks")
        if blocks:
            records[path.stem] = blocks
    return records


def _ends(values: list[tuple[int, float]], n: int = 3) -> tuple[float, float]:
    first = statistics.fmean(v for _, v in values[:n])
    last = statistics.fmean(v for _, v in values[-n:])
    return first, last


def summary_table(runs: dict[str, Series]) -> str:
    lines = [
        "| run | steps | InfoNCE start → end | channels changed, first → "
        "last logged update | ‖θ_q − Z‖ / ‖θ_q‖ first → last |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, series in runs.items():
        loss = series.get("train_loss", [])
        if not loss:
            continue
        start, end = _ends(loss)
        churn = series.get("channels_changed", [])
        distance = series.get("admm_relative_distance", [])
        churn_text = f"{churn[0][1]:.0f} → {churn[-1][1]:.0f}" if churn else "–"
        dist_text = f"{distance[0][1]:.3f} → {distance[-1][1]:.3f}" if distance else "–"
        lines.append(
            f"| {name} | {loss[-1][0] + 1} | {start:.3f} → {end:.3f} | "
            f"{churn_text} | {dist_text} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    runs: dict[str, Series], blocks: dict[str, list[dict[str, Any]]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    for name, series in runs.items():
        if not name.endswith("_seed0"):
            continue
        label = name.removesuffix("_seed0")
        style = "-" if label.startswith("mcp") else "--"
        columns = ("train_loss", "channels_changed", "admm_relative_distance")
        for ax, column in zip(axes, columns):
            values = series.get(column, [])
            if values:
                steps, ys = zip(*values)
                ax.plot(steps, ys, style, label=label, linewidth=1.2)
    for name, records in blocks.items():
        if name.endswith("_seed0"):
            steps = [r["step"] for r in records]
            alphas = [r.get("theta_response", float("nan")) for r in records]
            axes[3].plot(steps, alphas, "o-", label=name.removesuffix("_seed0"))
    axes[3].axhline(0.29, color="grey", linewidth=0.8, linestyle=":")
    axes[0].set_title("InfoNCE loss (training)")
    axes[1].set_title("mask churn: channels changed per ADMM update")
    axes[2].set_title("‖θ_q − Z‖ / ‖θ_q‖ (output-side parameters)")
    axes[3].set_title("measured θ-response α per block (mask holds above 0.29)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if blocks:
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_curves(folder: Path) -> str:
    # Finished rows only (a row in progress has a log but no result yet).
    runs = {
        k: v for k, v in run_series(folder).items() if (folder / f"{k}.json").is_file()
    }
    blocks = block_records(folder)
    table = summary_table(runs)
    for name, records in blocks.items():
        table += f"\n### ADMM blocks of {name}\n\n{block_table(records)}\n"
    header = (
        "# Training curves of the accuracy grid\n\n"
        "Made by `python benchmarks/accuracy/curves.py "
        f"{folder}` from the runs' CSV logs (one row every 20 steps) and the "
        "MCP rows' per-block records.\n\n"
    )
    tmp = folder / "training_curves.md.tmp"
    tmp.write_text(header + table)
    tmp.replace(folder / "training_curves.md")
    if runs or blocks:
        plot(runs, blocks, folder / "training_curves.png")
    return table


if __name__ == "__main__":
    print(write_curves(Path(sys.argv[1] if len(sys.argv) > 1 else "results")))
