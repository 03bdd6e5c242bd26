"""Run summary (rich table) and plots (matplotlib) written next to the report."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lightly_mcp.transition import SmoothTransition


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    return format(value, spec)


def print_run_summary(report: dict[str, Any], console: Console | None = None) -> None:
    """Prints baselines, dense, subnet and compact side by side."""
    console = console or Console()
    table = Table(
        title=f"lightly-mcp: {report.get('backbone')} at r = "
        f"{_fmt(report.get('pruning_ratio'), '.3f')}"
    )
    for column in (
        "model",
        "params",
        "MACs",
        "kNN top-1",
        "linear top-1",
        "latency bs64 (ms)",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    baselines = report.get("baselines", {})
    for name, label in (("raw_pixels", "raw pixels"), ("random_init", "random init")):
        if name in baselines:
            b = baselines[name]
            table.add_row(
                label,
                "",
                "",
                _fmt(b.get("knn_top1"), ".4f"),
                _fmt(b.get("linear_top1"), ".4f"),
                "",
            )
    for name in ("dense", "subnet", "compact"):
        entry = report.get(name)
        if not isinstance(entry, dict):
            continue
        latency = (entry.get("latency_ms") or {}).get("bs64")
        table.add_row(
            {"subnet": "momentum subnet (masked)"}.get(name, name),
            _fmt(entry.get("params"), ","),
            _fmt(entry.get("macs"), ","),
            _fmt(entry.get("knn_top1"), ".4f"),
            _fmt(entry.get("linear_top1"), ".4f"),
            _fmt(latency, ".2f"),
        )
    console.print(table)
    if report.get("data"):
        # Which data was used; a fallback (e.g. digits for Fashion-MNIST) says so.
        console.print(f"data: {report['data']}")
    stages = report.get("stages", {})
    if stages:
        console.print(
            "stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
        )


def _read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return series
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def write_plots(run_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Loss curves, transition schedule and kept channels → ``run_dir/plots/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage in ("pretrain", "prune"):
        series = _read_metrics(run_dir / stage / "logs" / "metrics.csv")
        if "train_loss" in series:
            steps, values = zip(*series["train_loss"])
            axes[0].plot(steps, values, label=f"InfoNCE ({stage})")
        if "admm_loss" in series:
            steps, values = zip(*series["admm_loss"])
            axes[1].plot(steps, values, label="ADMM penalty")
    axes[0].set(title="contrastive loss", xlabel="step")
    axes[1].set(title="ADMM loss", xlabel="step", yscale="log")
    for ax in axes:
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    written.append(out / "losses.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    prune_series = _read_metrics(run_dir / "prune" / "logs" / "metrics.csv")
    steps_done = max((s for s, _ in prune_series.get("train_loss", [])), default=0)
    frq, dr = report.get("frq"), report.get("dr")
    if frq is not None and dr is not None and steps_done > 0:
        transition = SmoothTransition(int(frq), int(dr))
        sources = [transition.step() for _ in range(steps_done + 1)]
        fig, ax = plt.subplots(figsize=(10, 2.5))
        ax.step(range(1, len(sources) + 1), sources, where="post")
        ax.set(
            title=f"key source (frq={frq}, dr={dr}): 1 = momentum subnet",
            xlabel="iteration",
            yticks=[0, 1],
        )
        fig.tight_layout()
        written.append(out / "transition.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    kept = report.get("kept_channels") or []
    if kept:
        fig, ax = plt.subplots(figsize=(10, 3.5))
        index = range(len(kept))
        ax.bar(index, [g["total"] for g in kept], color="#dddddd", label="dense")
        ax.bar(index, [g["kept"] for g in kept], color="#3366cc", label="kept")
        ax.set(title="channels per group", xlabel="group", ylabel="channels")
        ax.legend()
        fig.tight_layout()
        written.append(out / "kept_channels.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
