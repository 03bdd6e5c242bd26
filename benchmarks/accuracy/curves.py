"""Training curves of the accuracy grid's runs: loss, mask churn, ‖θ_q − Z‖.

Reads ``OUT/runs/<name>_seed<k>/logs/metrics.csv`` (Lightning's CSVLogger: one row
every ``trainer.log_every_n_steps`` steps; ADMM quantities are the latest update's
value at that step, so with updates every 8 steps and a row every 20 steps some
updates are not shown) and writes

- ``OUT/training_curves.png``: InfoNCE loss of every row (seed 0), and for the MCP
  rows the channels whose mask changed at an ADMM update (mask churn) and
  ``‖θ_q − Z‖`` over the output-side parameters;
- ``OUT/training_curves.md``: per run, the loss at the start and the end (mean of
  the first / last three logged values), the churn and the distance at the first
  and last logged update.

Usage:
    python benchmarks/accuracy/curves.py benchmarks/accuracy/results
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

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
    """Metrics of every run under ``folder/runs``, by run name."""
    runs = {}
    for metrics in sorted((folder / "runs").glob("*/logs/metrics.csv")):
        runs[metrics.parents[1].name] = read_metrics(metrics)
    return runs


def _ends(values: list[tuple[int, float]], n: int = 3) -> tuple[float, float]:
    first = statistics.fmean(v for _, v in values[:n])
    last = statistics.fmean(v for _, v in values[-n:])
    return first, last


def summary_table(runs: dict[str, Series]) -> str:
    lines = [
        "| run | steps | InfoNCE start → end | channels changed, first → "
        "last logged update | ‖θ_q − Z‖ first → last |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, series in runs.items():
        loss = series.get("train_loss", [])
        if not loss:
            continue
        start, end = _ends(loss)
        churn = series.get("channels_changed", [])
        distance = series.get("admm_distance", [])
        churn_text = f"{churn[0][1]:.0f} → {churn[-1][1]:.0f}" if churn else "–"
        dist_text = f"{distance[0][1]:.2f} → {distance[-1][1]:.2f}" if distance else "–"
        lines.append(
            f"| {name} | {loss[-1][0] + 1} | {start:.3f} → {end:.3f} | "
            f"{churn_text} | {dist_text} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, Series], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, series in runs.items():
        if not name.endswith("_seed0"):
            continue
        label = name.removesuffix("_seed0")
        style = "-" if label.startswith("mcp") else "--"
        columns = ("train_loss", "channels_changed", "admm_distance")
        for ax, column in zip(axes, columns):
            values = series.get(column, [])
            if values:
                steps, ys = zip(*values)
                ax.plot(steps, ys, style, label=label, linewidth=1.2)
    axes[0].set_title("InfoNCE loss (training)")
    axes[1].set_title("mask churn: channels changed per ADMM update")
    axes[2].set_title("‖θ_q − Z‖ (output-side parameters)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_curves(folder: Path) -> str:
    runs = run_series(folder)
    table = summary_table(runs)
    header = (
        "# Training curves of the accuracy grid\n\n"
        "Made by `python benchmarks/accuracy/curves.py "
        f"{folder}` from the runs' CSV logs (one row every 20 steps).\n\n"
    )
    tmp = folder / "training_curves.md.tmp"
    tmp.write_text(header + table)
    tmp.replace(folder / "training_curves.md")
    if runs:
        plot(runs, folder / "training_curves.png")
    return table


if __name__ == "__main__":
    print(write_curves(Path(sys.argv[1] if len(sys.argv) > 1 else "results")))
