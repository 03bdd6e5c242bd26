"""Every recipe in ``recipes/`` runs end to end (``lightly-mcp run``, through
evaluation) on tiny overrides: a few steps at 16 px, local data in place of CIFAR and
image folders. Parametrized over the folder, so a new recipe is covered as it is added.

The quickstart runs as on a machine without Fashion-MNIST (its ``auto`` data pointed
at an empty folder): scikit-learn's digits, its subsets larger than digits meaning all
of it, and a report that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightly_mcp.app.cli import main
from lightly_mcp.app.recipe import Recipe, load_recipe
from lightly_mcp.data import FASHION_MNIST_ROOT, default_dataset_kind

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
#: Precisions that need a GPU; the tiny runs are on the CPU.
GPU_PRECISIONS = ("16-mixed", "16", "16-true", "transformer-engine")


def image_folder(root: Path, classes: int = 2, per_class: int = 24) -> Path:
    """Small generated images (a colour per class, pixel noise) in class folders."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        color = generator.integers(40, 216, size=3)
        for i in range(per_class):
            noise = generator.integers(-40, 40, size=(20, 20, 3))
            pixels = np.clip(color + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_overrides(recipe: Recipe, tmp_path: Path) -> dict[str, Any]:
    """A few steps of every stage at 16 px on local data; the rest as the recipe."""
    split = recipe.pretrain.split_batch_norm
    # Four images per split: BatchNorm over two values of a 1x1 map is so
    # ill-conditioned that a 2-step pretraining can blow weights up to 1e10.
    batch = 4 * split if split > 1 else 8
    sets: dict[str, Any] = {
        "data.input_size": 16,
        "data.num_workers": 0,
        "mcp.epochs": 1,
        "mcp.max_steps": 2,
        "mcp.batch_size": batch,
        "export.latency": False,
        "eval.linear_epochs": 1,
        "eval.batch_size": 128,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.log_every_n_steps": 1,
    }
    m = recipe.mcp
    if m.admm_interval_unit == "steps" and m.admm_interval > 1:
        # Blocks of one step, so that 2 steps still hold the recipe's frozen block;
        # a response small enough for a 1-step block (see BlockSchedule.derived_rho).
        sets.update({"mcp.admm_interval": 1})
        if m.rho_response is not None:
            sets["mcp.rho_response"] = 0.01
    if recipe.trainer.precision in GPU_PRECISIONS:
        sets["trainer.precision"] = "32-true"
    if recipe.pretrain.dense_checkpoint is None:
        sets.update(
            {
                "pretrain.epochs": 1,
                "pretrain.max_steps": 2,
                "pretrain.batch_size": batch,
                "pretrain.memory_bank_size": 32,
                "pretrain.projection_hidden_dim": 32,
                "pretrain.projection_dim": 16,
            }
        )
        if recipe.pretrain.keep_every_n_epochs:
            sets["pretrain.keep_every_n_epochs"] = 1  # the tiny run has one epoch
    kind = recipe.data.kind
    if kind == "auto":
        # As on a machine where the dataset cannot be installed.
        (tmp_path / "no-fashion-mnist").mkdir()
        sets["data.root"] = str(tmp_path / "no-fashion-mnist")
        return sets  # subsets as in the recipe: larger than digits
    if kind == "imagefolder":
        sets["data.root"] = str(image_folder(tmp_path / "images"))
    elif kind != "fashion_mnist" or default_dataset_kind() != "fashion_mnist":
        sets.update({"data.kind": "digits", "data.root": None})
    sets.update(
        {
            "data.subset": 2 * batch,
            "eval.train_subset": 48,
            "eval.test_subset": 24,
        }
    )
    return sets


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_end_to_end(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # recipes name the shipped checkpoint relatively
    recipe = load_recipe(path)
    sets = tiny_overrides(recipe, tmp_path)
    out = tmp_path / "run"
    # The preflight is tested on its own (tests/app/test_preflight.py).
    argv = ["run", str(path), "--out", str(out), "--quiet", "--no-preflight"]
    for key, value in sets.items():
        text = yaml.safe_dump(value).strip().removesuffix("...").strip()
        argv += ["--set", f"{key}={text}"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("dense", "subnet", "compact"):
        assert 0.0 <= report[name]["knn_top1"] <= 1.0, name
        assert 0.0 <= report[name]["linear_top1"] <= 1.0, name
    assert report["compact"]["params"] < report["dense"]["params"]
    dense_dim = report["dense"]["feature_dim"]
    compact_dim = report["compact"]["feature_dim"]
    if recipe.mcp.keep_output_dim:
        assert compact_dim == dense_dim
    else:  # the paper's setting prunes the feature dimension too
        assert compact_dim < dense_dim
    assert tuple(report["baselines"]) == recipe.eval.baseline_names
    if recipe.pretrain.keep_every_n_epochs:
        assert list((out / "pretrain" / "epochs").glob("epoch=*.ckpt"))
    if recipe.data.kind == "auto":
        assert "digits train: all 1438 images" in report["data"]
        assert "not comparable with README's Fashion-MNIST" in report["data"]
        done = json.loads((out / "prune" / "done.json").read_text())
        assert "digits train: all 1438 images" in done["data"]


def test_auto_uses_fashion_mnist_where_its_root_has_it(tmp_path: Path) -> None:
    from tests.data.writers import write_fashion_mnist

    write_fashion_mnist(tmp_path / "fm", n_train=12, n_test=6)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", [f"data.root={tmp_path / 'fm'}"]
    )
    from lightly_mcp.app.assemble import evaluation_data, training_data

    dataset, _ = training_data(recipe, 4)
    assert dataset.kind == "fashion_mnist"
    assert "all 12 images (a subset of 4096 was asked for" in dataset.describe()
    _, _, description, _ = evaluation_data(recipe)
    assert "fashion_mnist test: all 6 images" in description
    assert "not comparable" not in description
    assert default_dataset_kind(tmp_path) == "digits"
    assert FASHION_MNIST_ROOT.is_absolute()
