"""The evaluate stage's two levers of `eval.runtime: auto`, measured on a run folder.

1. Each network's forward over the evaluation images: eager PyTorch (channels_last,
   what `eval.runtime: torch` runs) against ONNX Runtime (the dense network exported
   in memory, the compact model from the export's `model.onnx`), on one batch of real
   evaluation images, interleaved, best of REPEATS, scaled to 12,000 images (the
   quickstart's 10,000 + 2,000).
2. The data pass over the 10,000 training images: per-image `eval_transform` against
   `eval_pixels` + `NormalizeBatch` (the loader `evaluation_data` builds now), and
   whether both give the same tensors.

Usage:
    PYTHONPATH=. .venv/bin/python benchmarks/evaluation_runtimes.py runs/quickstart
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightly_mcp.app import pipeline
from lightly_mcp.app.assemble import evaluation_data, recipe_dataset
from lightly_mcp.app.recipe import load_recipe
from lightly_mcp.formats.runtimes import OnnxRuntimeNetwork, onnx_network, onnx_runner
from lightly_mcp.methods.transforms import eval_transform

REPEATS = 5
IMAGES = 12_000


def cpu_model() -> str:
    """``lscpu``'s model name (the platform's processor where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def best(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn``'s fastest call."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    run = Path(sys.argv[1])
    torch.set_num_threads(2)
    recipe = load_recipe(run / "recipe.yaml")
    report = json.loads((run / "export" / "report.json").read_text())
    pruned = run / "prune" / "final.ckpt"
    dense_file = Path(recipe.pretrain.dense_checkpoint)
    dense = pipeline.load_backbone_for_eval(dense_file, recipe)["dense"].eval()
    compact = pipeline.exported_compact(recipe, pruned, run, report).eval()
    print(f"{cpu_model()}, 2 threads, torch {torch.__version__}")

    train, _, _, _ = evaluation_data(recipe)
    images = next(iter(train))[0]
    nhwc = images.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    dense_onnx = onnx_network(dense, recipe.data.input_size)
    print(f"dense exported to ONNX in memory in {time.perf_counter() - start:.2f} s")
    compact_onnx = OnnxRuntimeNetwork(onnx_runner(run / "export" / "model.onnx"))
    forms = {
        "dense, eager channels_last": lambda: dense(nhwc),
        "dense, ONNX Runtime": lambda: dense_onnx(images),
        "compact, eager channels_last": lambda: compact(nhwc),
        "compact, ONNX Runtime (model.onnx)": lambda: compact_onnx(images),
    }
    with torch.inference_mode():
        for name in ("dense", "compact"):
            eager, onnx = (f for k, f in forms.items() if k.startswith(name + ","))
            diff = (eager().flatten(1) - onnx().flatten(1)).abs().max()
            print(f"{name}: largest difference ONNX Runtime - eager {float(diff):.1e}")
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(2):  # interleaved rounds
            for name, fn in forms.items():
                times[name].append(best(fn))
    scale = IMAGES / len(images)
    for name, seconds in times.items():
        ms = min(seconds) * 1000
        print(
            f"{name}: {ms:.1f} ms per {len(images)} images, "
            f"{min(seconds) * scale:.2f} s per {IMAGES:,}"
        )

    per_image = DataLoader(
        recipe_dataset(
            recipe,
            train=True,
            subset=recipe.eval.train_subset,
            transform=eval_transform(recipe.data.input_size),
        ),
        batch_size=recipe.eval.batch_size,
    )
    loaders = {
        "per-image eval_transform": per_image,
        "batched (evaluation_data)": train,
    }
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(2):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _batch in loader:
                pass
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        print(
            f"data pass, {name}: {min(values):.2f} s per {len(train.dataset):,} images"
        )
    same = all(torch.equal(a[0], b[0]) for a, b in zip(per_image, train, strict=True))
    print(f"the same tensors: {same}")


if __name__ == "__main__":
    main()
