"""Learning curve of a dense MoCo v2 pretraining run: kNN and linear top-1 per epoch.

Evaluates the momentum encoder (the network MCP prunes) of the epoch checkpoints a
``lightly-mcp pretrain`` run kept (``pretrain.keep_every_n_epochs``), with the run's
own recipe (eval section: kNN k / temperature, linear-probe epochs, bank = training
set), beside the raw-pixel baseline and the randomly initialised backbone (epoch 0).
Each evaluation is written to ``OUT/curve/epoch=NNN.json`` as soon as it is done, so
an interrupted call continues where it stopped. Then ``OUT/curve.json``,
``OUT/RESULTS_pretraining.md`` (table) and ``OUT/pretraining_curve.png`` are
(re)written.

Usage:
    python benchmarks/pretraining_curve.py runs/dense_mobilenetv2 \
        --epochs 1,2,4,8,12,16 --out benchmarks/pretraining
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightly
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

from lightly_mcp.app.assemble import evaluation_data, recipe_backbone  # noqa: E402
from lightly_mcp.app.recipe import load_recipe  # noqa: E402
from lightly_mcp.benchmarking.evaluation import evaluate_backbone, raw_pixel_baseline  # noqa: E402
from lightly_mcp.formats.loading import module_from_checkpoint  # noqa: E402
from lightly_mcp.io.files import write_json_atomic  # noqa: E402
from lightly_mcp.methods.checkpoints import read_checkpoint  # noqa: E402


def environment() -> dict[str, Any]:
    """Machine and library versions, for the results file."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightly": lightly.__version__,
        "pytorch_lightning": pl.__version__,
    }


def epoch_checkpoints(stage_dir: Path) -> dict[int, Path]:
    """``{epoch: path}`` of the kept epoch checkpoints (epochs counted from 1)."""
    found = {}
    for path in sorted((stage_dir / "epochs").glob("epoch=*.ckpt")):
        found[int(path.stem.split("=")[1])] = path
    return found


def evaluate_epoch(
    epoch: int, path: Path | None, recipe: Any, loaders: tuple, device: str
) -> dict[str, Any]:
    """Top-1 of the momentum encoder after ``epoch`` epochs (0: random init)."""
    e = recipe.eval
    if path is None:
        torch.manual_seed(recipe.seed)
        network = recipe_backbone(recipe)
        seconds = 0.0
    else:
        data = read_checkpoint(path)
        network = module_from_checkpoint(data, path).backbone_momentum
        seconds = float(data["callbacks"]["TrainingClock"]["seconds"])
    start = time.perf_counter()
    result = evaluate_backbone(
        network.to(device),
        loaders[0],
        loaders[1],
        device=device,
        k=e.k,
        temperature=e.temperature,
        linear_epochs=e.linear_epochs,
        seed=recipe.seed,
    )
    result.update(
        epoch=epoch,
        train_seconds=seconds,
        checkpoint=str(path) if path else None,
        eval_seconds=round(time.perf_counter() - start, 1),
    )
    return result


def write_table(out: Path, curve: dict[str, Any], command: str) -> Path:
    """``RESULTS_pretraining.md``: one row per evaluated epoch and the baselines."""
    env, run = curve["environment"], curve["run"]
    lines = [
        "# Dense MoCo v2 pretraining on Fashion-MNIST: learning curve",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['threads']} threads), "
        f"torch {env['torch']}, lightly {env['lightly']}, "
        f"pytorch-lightning {env['pytorch_lightning']}; seed {run['seed']}.",
        "",
        f"- Training: `{run['command']}` (recipe `{run['recipe']}`), "
        f"{run['train_seconds'] / 60:.1f} min of training for {run['epochs']} epochs.",
        f"- Evaluation: `{command}`. {curve['evaluation']}.",
        "",
        "| epoch | training time (min) | kNN top-1 | linear top-1 |",
        "|---:|---:|---:|---:|",
    ]
    for row in curve["epochs"]:
        name = "0 (random init)" if row["epoch"] == 0 else str(row["epoch"])
        lines.append(
            f"| {name} | {row['train_seconds'] / 60:.1f} | {row['knn_top1']:.4f} | "
            f"{row['linear_top1']:.4f} |"
        )
    raw = curve["raw_pixels"]
    lines += [
        f"| raw pixels (centred) | – | {raw['knn_top1']:.4f} | "
        f"{raw['linear_top1']:.4f} |",
        "",
    ]
    path = out / "RESULTS_pretraining.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(out: Path, curve: dict[str, Any]) -> Path | None:
    """kNN and linear top-1 against training minutes, with the baselines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = curve["epochs"]
    minutes = [r["train_seconds"] / 60 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "knn_top1", "kNN top-1 (k=200, t=0.1, 60k bank)"),
        (axes[1], "linear_top1", "linear-probe top-1"),
    ):
        ax.plot(minutes, [r[key] for r in rows], "o-", label="MoCo v2 (momentum enc.)")
        for r, m in zip(rows, minutes, strict=True):
            ax.annotate(
                f"{r['epoch']}",
                (m, r[key]),
                fontsize=7,
                xytext=(2, -10),
                textcoords="offset points",
            )
        ax.axhline(curve["raw_pixels"][key], color="grey", ls="--", label="raw pixels")
        ax.axhline(rows[0][key], color="tab:red", ls=":", label="random init")
        ax.set_title(title)
        ax.set_xlabel("training time (min), epoch numbers at the points")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on the 10k test set")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    path = out / "pretraining_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="output folder of lightly-mcp pretrain")
    parser.add_argument(
        "--epochs", default="all", help="comma-separated epochs, or 'all' (default)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/pretraining"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--recipe",
        default="recipes/fashion_mnist_dense_mobilenetv2.yaml",
        help="the recipe the run was started with (for the command in the table)",
    )
    args = parser.parse_args(argv)
    stage_dir = args.run / "pretrain"
    recipe_file = stage_dir / "recipe.yaml"
    if not recipe_file.is_file():
        parser.error(f"'{recipe_file}' does not exist: is '{args.run}' a pretrain run?")
    recipe = load_recipe(recipe_file)
    kept = epoch_checkpoints(stage_dir)
    if not kept:
        parser.error(f"no epoch checkpoints in '{stage_dir / 'epochs'}'.")
    wanted = (
        sorted(kept)
        if args.epochs == "all"
        else sorted({int(e) for e in args.epochs.split(",")})
    )
    missing = [e for e in wanted if e not in kept]
    if missing:
        parser.error(f"epochs {missing} have no checkpoint; kept: {sorted(kept)}.")
    results_dir = args.out / "curve"
    results_dir.mkdir(parents=True, exist_ok=True)
    train_loader, test_loader, description, _ = evaluation_data(recipe)
    loaders = (train_loader, test_loader)
    rows = []
    for epoch in [0, *wanted]:
        file = results_dir / f"epoch={epoch:03d}.json"
        if file.is_file():
            rows.append(json.loads(file.read_text()))
            continue
        result = evaluate_epoch(epoch, kept.get(epoch), recipe, loaders, args.device)
        write_json_atomic(file, result)
        rows.append(result)
        print(
            f"epoch {epoch:3d}: kNN {result['knn_top1']:.4f}  linear "
            f"{result['linear_top1']:.4f}  ({result['train_seconds'] / 60:.1f} min "
            f"of training; evaluated in {result['eval_seconds']:.0f} s)",
            flush=True,
        )
    raw_file = results_dir / "raw_pixels.json"
    if raw_file.is_file():
        raw = json.loads(raw_file.read_text())
    else:
        raw = raw_pixel_baseline(
            train_loader,
            test_loader,
            k=recipe.eval.k,
            temperature=recipe.eval.temperature,
            linear_epochs=recipe.eval.linear_epochs,
            seed=recipe.seed,
        )
        write_json_atomic(raw_file, raw)
    last = stage_dir / "final.ckpt"
    final = read_checkpoint(last if last.is_file() else kept[max(kept)])
    curve = {
        "environment": environment(),
        "run": {
            "command": f"lightly-mcp pretrain {args.recipe} --out {args.run}",
            "recipe": str(recipe_file),
            "seed": recipe.seed,
            "epochs": recipe.pretrain.epochs,
            "train_seconds": float(final["callbacks"]["TrainingClock"]["seconds"]),
        },
        "evaluation": f"momentum encoder; {description}",
        "epochs": rows,
        "raw_pixels": raw,
    }
    write_json_atomic(args.out / "curve.json", curve)
    command = "python benchmarks/pretraining_curve.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(write_table(args.out, curve, command))
    print(write_plot(args.out, curve))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
