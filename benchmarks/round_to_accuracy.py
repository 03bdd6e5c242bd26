"""Accuracy cost of ``round_to``: kNN top-1 of the compact model an MCP checkpoint
exports, with its masks widened to channel multiples of 4, 8, 16 (or not at all).

For every ``round_to`` the compact model is rebuilt from the checkpoint exactly as
``lightly-mcp export --round-to`` builds it (``lightly_mcp.formats.export.
compact_from_checkpoint``: the trained masks widened by the dropped channels of
largest norm, compacted, checked against the masked momentum subnet; no BatchNorm
recalibration) and evaluated with the accuracy benchmark's kNN classifier
(``lightly_mcp.benchmarking.evaluation.embed`` + ``knn_top1`` with the recipe's
``eval.k`` and ``eval.temperature``, on ``lightly_mcp.app.assemble.evaluation_data``:
the 60k training images as bank, the 10k test images). Parameters and MACs are at the
recipe's input size. ``--linear`` adds the linear probe (``evaluate_backbone``, slow).

Usage (the grid's MCP run at 92.6 % parameters removed; MobileNetV2 width 0.5,
small stem, 32 px, Fashion-MNIST):
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/round_to_accuracy.py \\
        benchmarks/accuracy/results/runs/mcp_r0.76_seed1/last.ckpt \\
        --out benchmarks/results/round_to_accuracy.json
Quick check: add ``--limit 2000`` (the first-drawn 2,000 bank and test images).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import cpu_model  # noqa: E402

from lightly_mcp.app.assemble import evaluation_data  # noqa: E402
from lightly_mcp.app.recipe import load_recipe  # noqa: E402
from lightly_mcp.benchmarking.evaluation import embed, evaluate_backbone, knn_top1  # noqa: E402
from lightly_mcp.formats.export import compact_from_checkpoint  # noqa: E402
from lightly_mcp.pruning.measure import MAC_COUNTER, count_macs, count_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "fashion_mnist_mobilenetv2.yaml"


def round_to_value(text: str) -> int | None:
    """``none`` or a positive integer."""
    return None if text.lower() == "none" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="an MCP Lightning checkpoint (last.ckpt)")
    parser.add_argument(
        "--round-to",
        type=round_to_value,
        nargs="+",
        default=[None, 4, 8, 16],
        help="channel multiples; 'none' keeps the trained masks",
    )
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", help="section.key=value"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="bank and test images (quick check)"
    )
    parser.add_argument("--linear", action="store_true", help="also the linear probe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/round_to_accuracy.json")
    args = parser.parse_args()

    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.limit is not None:
        overrides += [
            f"eval.train_subset={args.limit}",
            f"eval.test_subset={args.limit}",
        ]
    recipe = load_recipe(args.recipe, overrides)
    size = recipe.data.input_size
    train_loader, test_loader, description, _ = evaluation_data(recipe)
    print(f"data: {description}", flush=True)

    rows: list[dict[str, Any]] = []
    for round_to in args.round_to:
        start = time.perf_counter()
        model = compact_from_checkpoint(args.checkpoint, round_to=round_to)
        train_x, train_y = embed(model, train_loader)
        test_x, test_y = embed(model, test_loader)
        row: dict[str, Any] = {
            "round_to": round_to,
            "knn_top1": knn_top1(
                train_x,
                train_y,
                test_x,
                test_y,
                k=recipe.eval.k,
                temperature=recipe.eval.temperature,
            ),
            "params": count_parameters(model),
            f"macs@{size}": count_macs(model, size),
            "feature_dim": int(train_x.shape[1]),
        }
        if args.linear:
            row["linear_top1"] = evaluate_backbone(
                model,
                train_loader,
                test_loader,
                k=recipe.eval.k,
                temperature=recipe.eval.temperature,
                linear_epochs=recipe.eval.linear_epochs,
            )["linear_top1"]
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        linear = f", linear {row['linear_top1']:.4f}" if args.linear else ""
        print(
            f"round_to={round_to}: kNN top-1 {row['knn_top1']:.4f}{linear}, params "
            f"{row['params']:,}, MACs @{size} {row[f'macs@{size}']:,}, features "
            f"{row['feature_dim']} ({row['seconds']:.0f} s)",
            flush=True,
        )

    base = next((r for r in rows if r["round_to"] is None), rows[0])
    for row in rows:
        row["knn_top1_change"] = row["knn_top1"] - base["knn_top1"]
        row["params_over_unrounded"] = row["params"] / base["params"]
        row["macs_over_unrounded"] = row[f"macs@{size}"] / base[f"macs@{size}"]
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": str(args.checkpoint),
        "recipe": str(args.recipe),
        "overrides": overrides,
        "data": description,
        "eval": {"k": recipe.eval.k, "temperature": recipe.eval.temperature},
        "input_size": size,
        "mac_counter": MAC_COUNTER,
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch_version": torch.__version__,
            "wall_seconds": time.perf_counter() - wall,
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n| round_to | kNN top-1 | change | params | MACs @{size} | MACs × |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['round_to']} | {100 * r['knn_top1']:.2f} % | "
            f"{100 * r['knn_top1_change']:+.2f} pt | {r['params']:,} | "
            f"{r[f'macs@{size}']:,} | {r['macs_over_unrounded']:.2f} |"
        )
    print(f"\nwrote {out} ({result['environment']['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
