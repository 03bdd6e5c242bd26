"""Reports: the export report and the run summary as rich tables, and run plots.

:class:`ExportReport` is what ``lightly_mcp.formats.export.export`` measures, written to
the export's ``report.json`` by :meth:`ExportReport.to_dict`; the run summary and the
plots (matplotlib) are written next to a pipeline run's report.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lightly_mcp.io.files import write_bytes_atomic
from lightly_mcp.pruning.transition import SmoothTransition


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    if value is None:
        return missing
    return format(value, spec)


# --- the export report --------------------------------------------------------------
# The parts of ExportReport are dataclasses whose field names, in order, are the keys
# of report.json: ``dataclasses.asdict`` writes them.
@dataclass
class PerBatch:
    """A latency (ms) or speedup at batch sizes 1 and 64; ``None`` if not timed."""

    bs1: float | None = None
    bs64: float | None = None

    def at(self, batch_size: int) -> float | None:
        """The value at ``batch_size`` (1 or 64)."""
        return {1: self.bs1, 64: self.bs64}[batch_size]


@dataclass
class FormPerBatch:
    """The name of a deployed form at batch sizes 1 and 64; ``None`` if not timed."""

    bs1: str | None = None
    bs64: str | None = None


def fastest(by_form: dict[str, PerBatch]) -> tuple[PerBatch, FormPerBatch]:
    """Per batch size, the lowest latency of ``by_form`` and the form that has it."""
    latency, form = PerBatch(), FormPerBatch()
    for key in ("bs1", "bs64"):
        timed = {f: getattr(v, key) for f, v in by_form.items() if getattr(v, key)}
        if timed:
            best = min(timed, key=timed.__getitem__)
            setattr(latency, key, timed[best])
            setattr(form, key, best)
    return latency, form


@dataclass
class Speedup(PerBatch):
    """Dense over compact latency, each in its fastest form (best against best), at
    the training and the deployment resolution.
    """

    at_224: PerBatch = field(default_factory=PerBatch)


@dataclass
class DeployMeasurements:
    """MACs and latency at the deployment resolution (224 px, the ``at_224`` key).

    ``latency_ms`` is the fastest form's (``fastest_form``), ``latency_ms_by_form``
    every timed form's.
    """

    macs: int
    latency_ms: PerBatch
    fastest_form: FormPerBatch = field(default_factory=FormPerBatch)
    latency_ms_by_form: dict[str, PerBatch] = field(default_factory=dict)


@dataclass
class NetworkMeasurements:
    """Size, cost and speed of one network (dense or compact).

    Attributes:
        params: Number of parameters of the architecture, BatchNorm included (as
            the paper counts them).
        params_deployed: Number of parameters of the deployed network, BatchNorm
            folded into the convolutions (what the exported file holds; None when
            not measured).
        macs: Multiply-accumulates of one image at the training resolution.
        feature_dim: Size of the output features.
        latency_ms: Median latency at the training resolution, in the fastest
            deployed form.
        at_224: MACs and latency at the deployment resolution.
        fastest_form: Which form ``latency_ms`` was measured in.
        latency_ms_by_form: Per deployed form (``eager``, ``torch.export``,
            ``onnxruntime``), its median latency.
    """

    params: int
    macs: int
    feature_dim: int
    latency_ms: PerBatch
    at_224: DeployMeasurements
    fastest_form: FormPerBatch = field(default_factory=FormPerBatch)
    latency_ms_by_form: dict[str, PerBatch] = field(default_factory=dict)
    params_deployed: int | None = None


@dataclass
class Alignment:
    """The compact model with its channel counts rounded up to multiples
    (``round_to``), timed in one runtime at the training resolution.

    Attributes:
        runtime: Where it was timed (``onnxruntime``).
        macs: Per multiple (``none`` for the trained masks), MACs of one image.
        latency_ms: Per multiple, median latency at batch 1 and 64.
        fastest: Per batch size, the multiple with the lowest latency.
        advice: What to export for that runtime, in one sentence.
    """

    runtime: str
    macs: dict[str, int]
    latency_ms: dict[str, PerBatch]
    fastest: FormPerBatch
    advice: str


@dataclass
class KeptChannels:
    """Channels one group keeps: ``kept`` of ``total``; ``group`` is its root."""

    group: str
    kept: int
    total: int


@dataclass
class ExportFiles:
    """The files an export wrote, and per file or format how (or why not).

    Attributes:
        written: File names, in the order written.
        notes: Per file or format (``model.pt``, ``torchscript``, ``onnx``), a note.
    """

    written: list[str]
    notes: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """``{"written": [...], **notes}``, as in ``report.json``."""
        return {"written": list(self.written), **self.notes}


@dataclass
class ExportReport:
    """What an export measured and wrote (its ``report.json``).

    Attributes:
        backbone: The backbone's name.
        pruning_ratio: The MCP run's pruning ratio.
        resolution: The training resolution (px), where the compact model is checked.
        dense: The unpruned momentum encoder.
        compact: The compact (physically pruned) model.
        speedup: Dense over compact latency, each in its fastest form.
        equivalence_max_abs_err: Max abs difference (float32) between the compact
            model and the masked momentum subnet.
        equivalence_output_scale: Max abs output, the check's tolerance scale.
        equivalence_note: How the equivalence was checked.
        kept_channels: Per channel group, the channels kept.
        torch_version: PyTorch's version.
        threads: PyTorch's CPU threads.
        device: Where latency was timed.
        mac_counter: How MACs were counted.
        files: The files written.
        bn_recalibrated: Whether BatchNorm statistics were re-estimated.
        bn_folded: Per network (dense, compact), the BatchNorm layers folded into
            convolutions.
        forms_not_timed: Per ``network/form`` that could not be built, why.
        alignment: The compact model with rounded channel counts timed under ONNX
            Runtime (when timed, without ``round_to``, and ONNX Runtime runs).
        round_to: The channel multiple the masks were widened to, if any.
        checkpoint: The MCP checkpoint exported.
        aligned_to: MCP's ``round_to``: the multiple the trained channel counts were
            chosen as (1: exactly the ratio's counts).
        admm_updates: ADMM updates the checkpoint ran (0: the mask is the dense
            weights' first projection, never trained; None: not recorded).
    """

    backbone: str
    pruning_ratio: float
    resolution: int
    dense: NetworkMeasurements
    compact: NetworkMeasurements
    speedup: Speedup
    equivalence_max_abs_err: float
    equivalence_output_scale: float
    equivalence_note: str
    kept_channels: list[KeptChannels]
    torch_version: str
    threads: int
    device: str
    mac_counter: str
    files: ExportFiles
    bn_recalibrated: bool
    round_to: int | None
    checkpoint: str
    bn_folded: dict[str, int] = field(default_factory=dict)
    forms_not_timed: dict[str, str] = field(default_factory=dict)
    alignment: Alignment | None = None
    aligned_to: int = 1
    admm_updates: int | None = None

    @property
    def untrained_mask(self) -> str | None:
        """Why the exported mask is not one MCP trained, or None."""
        if self.admm_updates != 0 or self.compact.params >= self.dense.params:
            return None
        return (
            "the checkpoint ran no ADMM update: its mask is the dense weights' first "
            "projection, not one MCP trained; train more steps than one ADMM "
            "interval (mcp.admm_interval) before exporting"
        )

    @property
    def macs_ratio(self) -> float:
        """Dense over compact MACs at the training resolution."""
        return self.dense.macs / self.compact.macs

    @property
    def params_removed(self) -> float:
        """The fraction of the dense parameters the compact model does not have."""
        return 1.0 - self.compact.params / self.dense.params

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready nested dicts, in ``report.json``'s key order."""
        return {
            "backbone": self.backbone,
            "pruning_ratio": self.pruning_ratio,
            "resolution": self.resolution,
            "dense": asdict(self.dense),
            "compact": asdict(self.compact),
            "speedup": asdict(self.speedup),
            "macs_ratio": self.macs_ratio,
            "params_removed": self.params_removed,
            "equivalence_max_abs_err": self.equivalence_max_abs_err,
            "equivalence_output_scale": self.equivalence_output_scale,
            "equivalence_note": self.equivalence_note,
            "kept_channels": [asdict(kept) for kept in self.kept_channels],
            "torch_version": self.torch_version,
            "threads": self.threads,
            "device": self.device,
            "mac_counter": self.mac_counter,
            "files": self.files.to_dict(),
            "bn_recalibrated": self.bn_recalibrated,
            "round_to": self.round_to,
            "aligned_to": self.aligned_to,
            "checkpoint": self.checkpoint,
            "bn_folded": dict(self.bn_folded),
            "forms_not_timed": dict(self.forms_not_timed),
            "alignment": asdict(self.alignment) if self.alignment else None,
            "admm_updates": self.admm_updates,
            "untrained_mask": self.untrained_mask,
        }


def export_summary_table(report: ExportReport, deploy_resolution: int) -> Table:
    """A rich table of dense vs compact size, MACs, latency and speedup.

    Args:
        report: The export report.
        deploy_resolution: The resolution of its ``at_224`` measurements; their
            latencies get rows of their own when it is not the training resolution.
    """
    size = report.resolution
    dense, comp, speed = report.dense, report.compact, report.speedup
    aligned = (
        f", channels multiples of {report.aligned_to}" if report.aligned_to > 1 else ""
    )
    table = Table(
        title=f"MCP export: {report.backbone} (pruning ratio "
        f"{report.pruning_ratio:g}{aligned})"
    )
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("compact", justify="right")
    table.add_column("dense / compact", justify="right")

    def row(label: str, d: Any, c: Any, ratio: Any, spec: str = ",") -> None:
        table.add_row(
            label,
            _fmt(d, spec, missing="-"),
            _fmt(c, spec, missing="-"),
            _fmt(ratio, ".2f", missing="-"),
        )

    row("params", dense.params, comp.params, dense.params / comp.params)
    row(f"MACs @{size}", dense.macs, comp.macs, report.macs_ratio)
    d224, c224 = dense.at_224, comp.at_224
    row("MACs @224", d224.macs, c224.macs, d224.macs / c224.macs)
    row("feature dim", dense.feature_dim, comp.feature_dim, None)

    def latency(side: Any, batch: int) -> str:
        value = side.latency_ms.at(batch)
        form = getattr(side.fastest_form, f"bs{batch}")
        return "-" if value is None else f"{value:.2f} ({form})"

    for batch in (1, 64):
        table.add_row(
            f"latency ms @{size} bs{batch}",
            latency(dense, batch),
            latency(comp, batch),
            _fmt(speed.at(batch), ".2f", missing="-"),
        )
        if size != deploy_resolution and d224.latency_ms.at(batch) is not None:
            table.add_row(
                f"latency ms @224 bs{batch}",
                latency(d224, batch),
                latency(c224, batch),
                _fmt(speed.at_224.at(batch), ".2f", missing="-"),
            )
    table.caption = (
        f"equivalence max abs err {report.equivalence_max_abs_err:.2e} "
        f"(output scale {report.equivalence_output_scale:.3g}); "
        f"threads {report.threads}; BN recalibrated: {report.bn_recalibrated}; "
        "latency: each network in its fastest form"
    )
    return table


# --- the run summary ----------------------------------------------------------------


def headline(report: dict[str, Any]) -> str | None:
    """The run's result in one plain line, or None without a dense and a compact
    model: ``compact: X % fewer parameters, Y× faster (form), kNN −a / linear −b
    points against dense``.

    The speedup is at batch 64 (batch 1 when 64 was not timed), best form against
    best form, with the compact model's form named; accuracies are the report's
    evaluation (missing parts are left out rather than guessed).
    """
    dense, compact = report.get("dense"), report.get("compact")
    if not isinstance(dense, dict) or not isinstance(compact, dict):
        return None
    parts: list[str] = []
    if dense.get("params") and compact.get("params") is not None:
        removed = 100.0 * (1.0 - compact["params"] / dense["params"])
        parts.append(f"{removed:.1f} % fewer parameters")
    speedup = report.get("speedup") or {}
    forms = compact.get("fastest_form") or {}
    for key, batch in (("bs64", 64), ("bs1", 1)):
        if speedup.get(key):
            form = forms.get(key)
            where = f"bs{batch}" + (f", {form}" if form else "")
            parts.append(f"{speedup[key]:.2f}× faster ({where})")
            break
    differences = []
    for key, label in (("knn_top1", "kNN"), ("linear_top1", "linear")):
        if dense.get(key) is not None and compact.get(key) is not None:
            points = 100.0 * (compact[key] - dense[key])
            differences.append(f"{label} {points:+.1f}")
    if differences:
        parts.append(" / ".join(differences) + " points against dense")
    return "compact: " + ", ".join(parts) if parts else None


def print_run_summary(report: dict[str, Any], console: Console | None = None) -> None:
    """Prints baselines, dense, subnet and compact side by side."""
    console = console or Console()
    line = headline(report)
    if line is not None:
        console.print(line, markup=False, highlight=False)
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
        label = {"subnet": "momentum subnet (masked)"}.get(name, name)
        if entry.get("same_as"):
            # Not evaluated: the same network (the evaluation line says why).
            label = f"momentum subnet = {entry['same_as']}"
        table.add_row(
            label,
            _fmt(entry.get("params"), ","),
            _fmt(entry.get("macs"), ","),
            _fmt(entry.get("knn_top1"), ".4f"),
            _fmt(entry.get("linear_top1"), ".4f"),
            _fmt(latency, ".2f"),
        )
    console.print(table)
    transfer = report.get("transfer") or {}
    if transfer:
        console.print(transfer_table(transfer))
    if report.get("data"):
        # Which data was used; a fallback (e.g. digits for Fashion-MNIST) says so.
        console.print(f"data: {report['data']}")
    for on, part in transfer.items():
        console.print(f"data ({on}): {part.get('data')}")
    if report.get("evaluation"):
        # What was evaluated, what reused (the subnet, cached baselines), or why not.
        console.print(f"evaluation: {report['evaluation']}")
    stages = report.get("stages", {})
    if stages:
        console.print(
            "stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
        )


def transfer_table(transfer: dict[str, Any]) -> Table:
    """The ``eval.transfer`` evaluations (name → ``{"data", "models"}``): kNN and
    linear top-1 of every model and baseline, an evaluation per block of rows.
    """
    table = Table(title="transfer evaluations (eval.transfer)")
    for column in ("evaluation", "model", "kNN top-1", "linear top-1"):
        table.add_column(column, justify="right" if "top-1" in column else "left")
    labels = {"raw_pixels": "raw pixels", "random_init": "random init"}
    for on, part in transfer.items():
        if part.get("skipped"):
            table.add_row(on, "skipped: no labels", "", "")
            continue
        for i, (name, scores) in enumerate(part.get("models", {}).items()):
            table.add_row(
                on if i == 0 else "",
                labels.get(name, name),
                _fmt(scores.get("knn_top1"), ".4f"),
                _fmt(scores.get("linear_top1"), ".4f"),
            )
    return table


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


def _save_figure(fig: Any, path: Path) -> None:
    """Saves a figure as PNG, atomically (never through a link at ``path``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())


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
    _save_figure(fig, written[-1])
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
        _save_figure(fig, written[-1])
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
        _save_figure(fig, written[-1])
        plt.close(fig)
    return written
