"""Where a cold evaluate stage's time goes: each piece alone, on a finished run folder.

Times, with THREADS torch threads, loading and transforming the evaluation images,
each network's forward pass over the training images (dense, compact, random-init),
kNN and the linear probe per network, and the raw-pixel scores, each as wall and CPU
seconds (CPU seconds stay meaningful on a shared machine).

Usage:
    PYTHONPATH=. .venv/bin/python benchmarks/evaluation_profile.py runs/quickstart 1
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightly_mcp.app import pipeline
from lightly_mcp.app.assemble import evaluation_data
from lightly_mcp.app.recipe import load_recipe
from lightly_mcp.benchmarking.evaluation import (
    embed_models,
    knn_top1,
    linear_probe_top1,
    raw_pixel_scores,
)


def timed(label: str, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` and prints its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label}: wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
    return result


def main() -> None:
    run, threads = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(threads)
    recipe = load_recipe(run / "recipe.yaml")
    pruned = run / "prune" / "final.ckpt"
    report = json.loads((run / "export" / "report.json").read_text())
    dense = Path(recipe.pretrain.dense_checkpoint)
    networks = {
        "dense": pipeline.load_backbone_for_eval(dense, recipe)["dense"],
        "compact": pipeline.exported_compact(recipe, pruned, run, report),
        **pipeline._baseline_models(recipe, "cpu", ["random_init"]),
    }
    train, _, _, _ = timed("evaluation_data", lambda: evaluation_data(recipe))
    timed("load and transform", lambda: embed_models({"x": nn.Flatten()}, train))
    features = {}
    for name, network in networks.items():
        features[name], labels = timed(
            f"forward {name}", lambda n=network: embed_models({"x": n}, train)
        )
    for name, found in features.items():
        x, y = found["x"], labels
        # The bank's own first 2,000 images as queries: the cost, not the accuracy.
        queries = (x, y, x[:2000], y[:2000])
        timed(f"kNN {name} ({x.shape[1]}-d)", partial(knn_top1, *queries))
        timed(f"linear probe {name}", partial(linear_probe_top1, *queries, epochs=30))
    pixels = embed_models({"x": nn.Flatten()}, train)[0]["x"]
    timed(
        "raw pixels, kNN only",
        lambda: knn_top1(pixels, labels, pixels[:2000], labels[:2000]),
    )
    timed(
        "raw pixels, kNN + probe",
        lambda: raw_pixel_scores(
            pixels, labels, pixels[:2000], labels[:2000], linear_epochs=30
        ),
    )


if __name__ == "__main__":
    main()
