"""Ships a dense MoCo v2 checkpoint of a pretrain run into the repository.

Writes ``TARGET`` (state_dict, hyper-parameters and queue only: what MCP starts from;
no optimizer state) and ``TARGET`` with suffix ``.provenance.json`` (command, recipe,
commit, training time, kNN / linear top-1 from ``benchmarks/pretraining_curve.py``,
machine, sha256). ``lightly_mcp.methods.checkpoints.read_checkpoint`` verifies the
sha256 whenever the file is loaded.

Usage:
    python benchmarks/ship_dense_checkpoint.py runs/dense_mobilenetv2 --epoch 16 \
        --curve benchmarks/pretraining/curve.json \
        --target pretrained/fashion_mnist_mobilenetv2_w0.5.ckpt --commit <sha>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lightly_mcp.app.recipe import read_recipe_file
from lightly_mcp.formats.loading import module_from_checkpoint
from lightly_mcp.formats.shipping import ship_checkpoint
from lightly_mcp.methods.checkpoints import read_checkpoint

MAX_BYTES = 20 * 1024 * 1024


def git_head() -> str:
    """The current commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="output folder of lightly-mcp pretrain")
    parser.add_argument(
        "--epoch",
        type=int,
        default=None,
        help="ship pretrain/epochs/epoch=NNN.ckpt (default: the last kept epoch)",
    )
    parser.add_argument("--curve", type=Path, required=True, help="curve.json")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument(
        "--recipe",
        default="recipes/fashion_mnist_dense_mobilenetv2.yaml",
        help="the recipe file the run was started with",
    )
    parser.add_argument(
        "--commit", default=None, help="commit the run was made with (default: HEAD)"
    )
    parser.add_argument("--note", default="", help="free text kept in the provenance")
    args = parser.parse_args(argv)
    stage_dir = args.run / "pretrain"
    kept = sorted((stage_dir / "epochs").glob("epoch=*.ckpt"))
    if args.epoch is None and not kept:
        parser.error(f"no epoch checkpoints in '{stage_dir / 'epochs'}'.")
    source = (
        kept[-1]
        if args.epoch is None
        else stage_dir / "epochs" / f"epoch={args.epoch:03d}.ckpt"
    )
    data = read_checkpoint(source)
    # Saved at the end of a training epoch: "epoch" is that epoch, counted from 0.
    epoch = int(data["epoch"]) + 1
    curve = json.loads(args.curve.read_text())
    rows = {row["epoch"]: row for row in curve["epochs"]}
    if epoch not in rows:
        parser.error(
            f"{args.curve} has no evaluation of epoch {epoch}; run "
            "benchmarks/pretraining_curve.py with --epochs including it."
        )
    row = rows[epoch]
    recipe = read_recipe_file(stage_dir / "recipe.yaml")
    command = f"lightly-mcp pretrain {args.recipe} --out {args.run}"
    regenerate = command + (
        f" && python benchmarks/ship_dense_checkpoint.py {args.run} "
        + f"--epoch {epoch} --curve {args.curve} --target {args.target}"
    )
    features = module_from_checkpoint(data, source).backbone_momentum.feature_dim
    record = {
        "what": "dense MoCo v2 (momentum and query encoders, projection heads, "
        "queue); no optimizer state",
        "backbone": recipe["backbone"],
        "feature_dim": features,
        "command": command,
        "recipe_file": args.recipe,
        "recipe": recipe,
        "commit": args.commit or git_head(),
        "checkpoint_of_run": str(source.relative_to(args.run)),
        "epoch": epoch,
        "epochs_in_recipe": recipe["pretrain"]["epochs"],
        "global_step": int(data["global_step"]),
        "train_seconds": round(float(row["train_seconds"]), 1),
        "knn_top1": row["knn_top1"],
        "linear_top1": row["linear_top1"],
        "evaluation": curve["evaluation"]
        + f"; kNN k={row['settings']['k']}, t={row['settings']['temperature']}, "
        f"linear probe {row['settings']['linear_epochs']} epochs",
        "baselines": {
            "raw_pixels": {
                "knn_top1": curve["raw_pixels"]["knn_top1"],
                "linear_top1": curve["raw_pixels"].get("linear_top1"),
            },
            "random_init": {
                "knn_top1": rows[0]["knn_top1"],
                "linear_top1": rows[0]["linear_top1"],
            },
        },
        "environment": curve["environment"],
        "note": args.note,
        "regenerate": regenerate,
    }
    record = ship_checkpoint(data, args.target, record)
    if record["bytes"] > MAX_BYTES:
        print(
            f"warning: {args.target} is {record['bytes'] / 2**20:.1f} MiB, above the "
            "20 MiB the repository accepts.",
            file=sys.stderr,
        )
    print(json.dumps({k: record[k] for k in ("file", "bytes", "sha256")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
