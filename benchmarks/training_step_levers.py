"""The quickstart's training step before and after the CPU speed levers, data included.

Each variant is one full step of ``recipes/quickstart.yaml`` (MobileNetV2 width 0.5,
small-input stem, batch 128, 32 px, split BatchNorm 8): the next batch from the
recipe's own resumable training loader (augmentation included) + forward + backward +
SGD step, for MoCo v2 and for MCP (the recipe's options, from its dense checkpoint).
The variants are stepped interleaved in one process (A, B, C, ..., A, B, C, ...), so
that machine noise hits all of them alike; the medians give the ratios.

- ``before``: per-image PIL views (lightly's ``MoCoV2Transform``), contiguous layout
  (``data.batched_augment: false``, ``trainer.channels_last: false``);
- ``batched``: batched views only; ``channels_last``: the layout only;
- ``after``: both (the recipe defaults);
- ``after+Nw``: both, with N DataLoader workers (``--workers``).

Usage (one command; writes ``results/training_step_levers.json``):
    PYTHONPATH=. .venv/bin/python benchmarks/training_step_levers.py --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from common import cpu_model
from torch import nn

from lightly_mcp.app.assemble import mcp_model, moco_kwargs, training_data
from lightly_mcp.app.recipe import Recipe, load_recipe
from lightly_mcp.methods.moco_v2 import MoCoV2

warnings.filterwarnings("ignore", message=".*self.log.*")
warnings.filterwarnings("ignore", message=".*tensor.detach.*")

ROOT = Path(__file__).resolve().parent.parent

#: name -> (data.batched_augment, trainer.channels_last, data.num_workers)
VARIANTS: dict[str, tuple[bool, bool, int]] = {
    "before": (False, False, 0),
    "batched": (True, False, 0),
    "channels_last": (False, True, 0),
    "after": (True, True, 0),
}


def recipe_for(batched: bool, channels_last: bool, workers: int) -> Recipe:
    """The quickstart recipe with the levers set."""
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    recipe.data.batched_augment = batched
    recipe.data.num_workers = workers
    recipe.trainer.channels_last = channels_last
    return recipe


def batches(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def build(recipe: Recipe, method: str) -> tuple[Callable[[], float], nn.Module]:
    """One step of ``method`` on the recipe's data; the step returns the seconds
    spent fetching the batch (part of the step's time).
    """
    _, loader = training_data(recipe, recipe.mcp.batch_size)
    data = batches(loader)
    model: MoCoV2
    if method == "MCP":
        dense = ROOT / str(recipe.pretrain.dense_checkpoint)
        model = mcp_model(recipe, dense=dense if dense.is_file() else None)
    else:
        model = MoCoV2(**moco_kwargs(recipe, "mcp"))
    model.train()
    params = [
        p for m in (model.backbone, model.projection_head) for p in m.parameters()
    ]
    optimizer = torch.optim.SGD(
        params, lr=recipe.mcp.lr, momentum=0.9, weight_decay=recipe.mcp.weight_decay
    )
    step_index = [0]

    def step() -> float:
        start = time.perf_counter()
        batch = next(data)
        fetched = time.perf_counter() - start
        loss = model.training_step(batch, step_index[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_index[0] += 1
        return fetched

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps each")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1], help="'after' with N workers"
    )
    parser.add_argument("--methods", nargs="+", default=["MoCoV2", "MCP"])
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/results/training_step_levers.json",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {name: VARIANTS[name] for name in args.variants}
    for n in args.workers:
        variants[f"after+{n}w"] = (True, True, n)
    steps: dict[str, Callable[[], float]] = {}
    for method in args.methods:
        for name, (batched, channels_last, workers) in variants.items():
            recipe = recipe_for(batched, channels_last, workers)
            steps[f"{method}/{name}"] = build(recipe, method)[0]
    total: dict[str, list[float]] = {name: [] for name in steps}
    fetch: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            fetched = step()
            if i >= args.warmup:
                total[name].append(time.perf_counter() - start)
                fetch[name].append(fetched)
    median = {name: statistics.median(t) for name, t in total.items()}
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "recipe": "recipes/quickstart.yaml",
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "variants": {
            k: dict(zip(("batched_augment", "channels_last", "num_workers"), v))
            for k, v in variants.items()
        },
        "median_step_seconds": median,
        "median_fetch_seconds": {n: statistics.median(t) for n, t in fetch.items()},
        "min_step_seconds": {n: min(t) for n, t in total.items()},
        "over_before": {
            name: median[name] / median[f"{name.split('/')[0]}/before"]
            for name in median
            if "before" in variants
        },
    }
    if "MoCoV2" in args.methods and "MCP" in args.methods:
        result["mcp_over_mocov2"] = {
            name: median[f"MCP/{name}"] / median[f"MoCoV2/{name}"] for name in variants
        }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
