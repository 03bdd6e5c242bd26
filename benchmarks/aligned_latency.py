"""Latency of hardware-aligned pruning: the compact model with MCP's ``round_to`` = 8
against ``round_to`` = 1 (exactly ``n_g`` channels per group), same ratio.

The quickstart's backbone (MobileNetV2 width 0.5, small-input stem, 32 px) with the
weights of the shipped dense checkpoint (``pretrained/fashion_mnist_mobilenetv2_w0.
5.ckpt``, its momentum encoder, shuffle-BN merged) is pruned by the masks MCP starts
from, ``Z⁰ = Π(θ⁰)`` (``project_onto_channel_budget``: the top-``n_g`` channels by
norm, aligned with ``round_to``), without training: the architecture, hence the
latency, is what an MCP run at that ratio and ``round_to`` exports. Every model is
compacted, BatchNorm-folded and checked as export does (``fold_and_check``), then
timed in eager PyTorch and ONNX Runtime (``deployed_forms``), all models and forms
interleaved in one process (``measure_latency``: medians), at batch 64 and 1,
twice: wall time, and the thread's CPU time (``time.thread_time``; with one thread,
PyTorch's and ONNX Runtime's work runs on the calling thread), which leaves out the
time other processes of a shared machine take the core.

Usage (on a shared machine, one thread keeps the timings comparable):
    PYTHONPATH=. .venv/bin/python benchmarks/aligned_latency.py --threads 1 \\
        --out benchmarks/results/aligned_latency.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import cpu_model  # noqa: E402

from lightly_mcp.formats.export import fold_and_check  # noqa: E402
from lightly_mcp.formats.loading import module_from_checkpoint  # noqa: E402
from lightly_mcp.formats.runtimes import deployed_forms  # noqa: E402
from lightly_mcp.methods.checkpoints import read_checkpoint  # noqa: E402
from lightly_mcp.pruning.admm import project_onto_channel_budget  # noqa: E402
from lightly_mcp.pruning.batchnorm import merge_split_batchnorm  # noqa: E402
from lightly_mcp.pruning.compaction import compact  # noqa: E402
from lightly_mcp.pruning.measure import count_macs, count_parameters, measure_latency  # noqa: E402
from lightly_mcp.pruning.prunable_groups import find_channel_groups  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "pretrained" / "fashion_mnist_mobilenetv2_w0.5.ckpt"
FORMS = ("eager", "onnxruntime")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.76])
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    moco = module_from_checkpoint(read_checkpoint(args.checkpoint), args.checkpoint)
    dense = moco.backbone_momentum.eval()
    merge_split_batchnorm(dense)
    example = torch.randn(1, 3, args.size, args.size)
    groups = find_channel_groups(dense, example)
    params = dict(dense.named_parameters())

    nets: dict[str, torch.nn.Module] = {"dense": dense}
    kept = {"dense": [g.num_channels for g in groups]}
    for ratio in args.ratios:
        for round_to in args.round_to:
            name = f"r = {ratio}, round_to {round_to}"
            _, masks = project_onto_channel_budget(params, groups, ratio, round_to)
            nets[name] = compact(dense, groups, masks, example).eval()
            kept[name] = masks.kept_channels()
    rows: dict[str, dict[str, Any]] = {}
    runners = {}
    for name, net in nets.items():
        folded, _ = fold_and_check(net, args.size)
        forms, skipped = deployed_forms(folded, args.size, forms=FORMS)
        if skipped:
            raise SystemExit(f"{name}: could not build {skipped}")
        for form, run in forms.items():
            runners[f"{name}|{form}"] = run
        rows[name] = {
            "params": count_parameters(net),
            "macs": count_macs(net, args.size),
            "kept_channels": kept[name],
            "groups_not_multiple_of_8": sum(k % 8 != 0 for k in kept[name]),
        }
    for batch in (64, 1):
        shape = (batch, 3, args.size, args.size)
        for key, clock in (
            ("latency_ms", time.perf_counter),
            ("cpu_ms", time.thread_time),
        ):
            times = measure_latency(runners, shape, args.repeats, clock=clock)
            for runner, ms in times.items():
                name, form = runner.split("|")
                rows[name].setdefault(key, {}).setdefault(form, {})[f"bs{batch}"] = ms

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    ).stdout.strip()
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "size": args.size,
        "checkpoint": str(args.checkpoint.relative_to(REPO))
        if args.checkpoint.is_relative_to(REPO)
        else str(args.checkpoint),
        "rows": rows,
    }
    _print_table(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    dense = rows["dense"]
    for key, what in (("cpu_ms", "CPU time"), ("latency_ms", "wall time")):
        print(f"\n{what} (median ms), best form against the dense model's best form")
        print(
            "| model | params | MACs @32 | groups not ×8 | eager bs64 | ORT bs64 | "
            "eager bs1 | ORT bs1 | speedup bs64 | speedup bs1 |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def best(row: dict[str, Any], batch: str, key: str = key) -> float:
            return min(form[batch] for form in row[key].values())

        for name, row in rows.items():
            ms = row[key]
            print(
                f"| {name} | {row['params']:,} | {row['macs'] / 1e6:.2f} M | "
                f"{row['groups_not_multiple_of_8']} of {len(row['kept_channels'])} | "
                f"{ms['eager']['bs64']:.1f} | {ms['onnxruntime']['bs64']:.1f} | "
                f"{ms['eager']['bs1']:.2f} | {ms['onnxruntime']['bs1']:.2f} | "
                f"{best(dense, 'bs64') / best(row, 'bs64'):.2f}× | "
                f"{best(dense, 'bs1') / best(row, 'bs1'):.2f}× |"
            )


if __name__ == "__main__":
    main()
