"""Does the dense pretraining recipe show a falling loss on little data? (issue #10)

Runs ``lightly_mcp.app.pipeline.pretrain`` with a shipped protocol
(``recipes/fashion_mnist_dense_mobilenetv2.yaml`` unless said otherwise: model, head,
SplitBatchNorm, temperature, momentum and optimizer as shipped) on little data for a
few dozen steps, once per configuration below, and prints for each run the logged
InfoNCE every few steps, its chance level ln(queue + 1), and the mean loss of the first
quarter (counted from the step at which the queue holds only real keys) and of the
last quarter. Before training it also prints the gradient norm of the loss at
initialisation next to the weight norm, which explains what the tiny runs show.

Usage (2 CPU threads, about 4 minutes):
    python benchmarks/pretraining/tiny_runs.py [--out DIR]

The scikit-learn digits need no download; the Fashion-MNIST rows run only where the
Debian package ``dataset-fashion-mnist`` is installed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model  # noqa: E402

from lightly_mcp.app.assemble import moco_kwargs, training_data  # noqa: E402
from lightly_mcp.app.pipeline import pretrain  # noqa: E402
from lightly_mcp.app.recipe import load_recipe  # noqa: E402
from lightly_mcp.data import FASHION_MNIST_ROOT  # noqa: E402
from lightly_mcp.methods.moco_v2 import MoCoV2  # noqa: E402

RECIPE = ROOT / "recipes" / "fashion_mnist_dense_mobilenetv2.yaml"
RESNET18 = ROOT / "recipes" / "fashion_mnist_dense_resnet18.yaml"
QUIET = [
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "pretrain.keep_every_n_epochs=0",
    "eval.train_subset=300",
    "eval.test_subset=100",
    "eval.linear_epochs=1",
]
DIGITS = ["data.kind=digits", "data.root=null", "data.subset=null"]
FASHION = ["data.kind=fashion_mnist", "data.subset=512"]


def small(size: int, batch: int, queue: int, epochs: int, warmup: int) -> list[str]:
    """Overrides for a run of ``epochs`` at ``size`` px with a queue of ``queue``."""
    return [
        f"data.input_size={size}",
        f"pretrain.batch_size={batch}",
        f"pretrain.memory_bank_size={queue}",
        f"pretrain.epochs={epochs}",
        f"pretrain.warmup_epochs={warmup}",
    ]


# (name, recipe, overrides): data, schedule and queue sized for a few dozen steps.
RUNS = [
    (
        "digits 16 px, batch 64, queue 128, 66 steps",
        RECIPE,
        DIGITS + small(16, 64, 128, 3, 5),
    ),
    ("same, warm-up over the whole run", RECIPE, DIGITS + small(16, 64, 128, 3, 66)),
    (
        "same, temperature 0.5",
        RECIPE,
        DIGITS + small(16, 64, 128, 3, 5) + ["pretrain.temperature=0.5"],
    ),
    (
        "digits 32 px, batch 128, queue 512, 110 steps",
        RECIPE,
        DIGITS + small(32, 128, 512, 10, 50),
    ),
    (
        "ResNet-18 protocol, Fashion-MNIST 8,000 images, queue 1,024, 62 steps "
        "(the unit test)",
        RESNET18,
        # What the unit test changes in the recipe (32 px, batch 128 as shipped).
        [
            "data.subset=8000",
            "pretrain.epochs=1",
            "pretrain.memory_bank_size=1024",
            "pretrain.warmup_epochs=60",
        ],
    ),
    (
        "Fashion-MNIST 512 images, 16 px, batch 64, queue 128, 80 steps",
        RECIPE,
        FASHION + small(16, 64, 128, 10, 5),
    ),
]


def gradient_at_init(overrides: list[str]) -> tuple[float, float, float]:
    """(loss, gradient norm, weight norm) of one MoCo step at initialisation."""
    recipe = load_recipe(RECIPE, overrides)
    torch.manual_seed(0)
    _, loader = training_data(recipe, recipe.pretrain.batch_size)
    views = next(iter(loader))[0]
    model = MoCoV2(**moco_kwargs(recipe, "pretrain"))
    model.train()
    loss = model.contrastive_loss(views)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grad = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in params))
    weight = math.sqrt(sum(float(p.detach().norm()) ** 2 for p in params))
    return float(loss.detach()), grad, weight


def logged_losses(stage_dir: Path) -> list[float]:
    with open(stage_dir / "logs" / "metrics.csv") as f:
        return [
            float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args(argv)
    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"recipe {RECIPE.relative_to(ROOT)} with the overrides shown\n")
    for size, batch in ((16, 64), (32, 128)):
        loss, grad, weight = gradient_at_init(
            DIGITS + [f"data.input_size={size}", f"pretrain.batch_size={batch}"]
        )
        print(
            f"at init, digits {size} px, batch {batch}: loss {loss:.2f}, "
            f"gradient norm {grad:.0f}, weight norm {weight:.0f}"
        )
    out = args.out or Path(tempfile.mkdtemp(prefix="tiny_runs_"))
    for i, (name, recipe_file, overrides) in enumerate(RUNS):
        recipe = load_recipe(recipe_file, QUIET + overrides)
        if recipe.data.kind == "fashion_mnist" and not FASHION_MNIST_ROOT.is_dir():
            print(f"\n{name}: skipped (no Fashion-MNIST in {FASHION_MNIST_ROOT})")
            continue
        start = time.perf_counter()
        pretrain(recipe, out / f"run{i}", progress=False)
        seconds = time.perf_counter() - start
        losses = logged_losses(out / f"run{i}" / "pretrain")
        p = recipe.pretrain
        full = math.ceil(p.memory_bank_size / p.batch_size)  # queue of real keys
        quarter = max(1, (len(losses) - full) // 4)
        first = sum(losses[full : full + quarter]) / quarter
        last = sum(losses[-quarter:]) / quarter
        chance = math.log(p.memory_bank_size + 1)
        every = max(1, len(losses) // 12)
        print(f"\n{name}\n  {recipe_file.name} {' '.join(overrides)}, {seconds:.0f} s")
        print(
            f"  loss every {every} steps: "
            + " ".join(f"{v:.2f}" for v in losses[::every])
        )
        print(
            f"  ln(queue + 1) = {chance:.2f}; the queue holds real keys from step "
            f"{full}; mean of the first quarter from there {first:.2f}, of the last "
            f"quarter {last:.2f}: "
            + ("falls" if last < first - 0.3 else "does not fall")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
