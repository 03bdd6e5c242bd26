"""The dense pretraining recipe and its learning-curve checkpoints, on tiny data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lightly_mcp.app.pipeline import pretrain
from lightly_mcp.app.recipe import RecipeError, load_recipe
from lightly_mcp.data import FASHION_MNIST_ROOT
from lightly_mcp.formats.loading import module_from_checkpoint
from lightly_mcp.io.provenance import provenance_path, sha256_of
from lightly_mcp.methods.checkpoints import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DENSE_RECIPE = ROOT / "recipes" / "fashion_mnist_dense_mobilenetv2.yaml"
RESNET18_RECIPE = ROOT / "recipes" / "fashion_mnist_dense_resnet18.yaml"

# The shipped protocol with its data swapped for 64 of scikit-learn's digits at 16 px,
# a queue of 64 keys and 8 steps; the model and optimizer settings stay as shipped.
TINY_DATA = [
    "data.kind=digits",
    "data.root=null",
    "data.input_size=16",
    "data.subset=64",
    "pretrain.epochs=4",
    "pretrain.batch_size=32",
    "pretrain.memory_bank_size=64",
    "pretrain.warmup_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "eval.train_subset=300",
    "eval.test_subset=100",
    "eval.linear_epochs=2",
]


def _losses(stage_dir: Path) -> dict[int, list[float]]:
    by_epoch: dict[int, list[float]] = {}
    with open(stage_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train_loss"):
                by_epoch.setdefault(int(row["epoch"]), []).append(
                    float(row["train_loss"])
                )
    return by_epoch


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dense")
    recipe = load_recipe(DENSE_RECIPE, TINY_DATA)
    pretrain(recipe, out, progress=False)
    return out / "pretrain"


@pytest.mark.parametrize(
    ("name", "backbone"),
    [
        ("fashion_mnist_dense_mobilenetv2.yaml", "torchvision/mobilenet_v2"),
        ("fashion_mnist_dense_resnet18.yaml", "torchvision/resnet18"),
    ],
)
def test_dense_recipes_are_the_full_dataset_protocol(name: str, backbone: str) -> None:
    recipe = load_recipe(ROOT / "recipes" / name)
    assert recipe.data.kind == "fashion_mnist" and recipe.data.subset is None
    assert recipe.backbone.name == backbone
    assert recipe.pretrain.projection_batch_norm and recipe.pretrain.split_batch_norm
    assert recipe.pretrain.keep_every_n_epochs == 1
    assert recipe.eval.train_subset is None and recipe.eval.test_subset is None
    assert recipe.eval.k == 200 and recipe.eval.temperature == 0.1
    # Same MoCo settings in both protocols.
    reference = load_recipe(DENSE_RECIPE)
    assert recipe.pretrain == reference.pretrain and recipe.data == reference.data


def test_dense_recipe_trains_on_tiny_data(tiny_run: Path) -> None:
    losses = _losses(tiny_run)
    assert sorted(losses) == [0, 1, 2, 3]
    assert all(len(values) == 2 for values in losses.values())
    assert all(math.isfinite(v) and v > 0 for vs in losses.values() for v in vs)
    assert (tiny_run / "final.ckpt").is_file() and (tiny_run / "done.json").is_file()


# The ResNet-18 protocol as shipped (model, optimizer, queue refill, SplitBatchNorm,
# augmentations) on 8,000 real Fashion-MNIST images for one epoch: 62 steps, about
# 35 s. The queue is cut to 1,024 keys (full after 8 steps) and the warm-up to the
# epoch. On tiny data (scikit-learn's digits, or a few hundred images) the loss does
# not fall in so few steps (benchmarks/pretraining/TINY_RUNS.md).
FALLING_LOSS = [
    "data.subset=4096",
    "pretrain.epochs=1",
    "pretrain.batch_size=64",
    "pretrain.memory_bank_size=512",
    "pretrain.warmup_epochs=60",
    "pretrain.keep_every_n_epochs=0",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.skipif(
    not FASHION_MNIST_ROOT.is_dir(),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_ROOT}: run 'make data' "
    "(apt-get install dataset-fashion-mnist); .ci/run does",
)
def test_pretraining_recipe_loss_falls_on_a_fashion_mnist_subset(
    tmp_path: Path,
) -> None:
    recipe = load_recipe(RESNET18_RECIPE, FALLING_LOSS)
    pretrain(recipe, tmp_path, progress=False)
    losses = [v for vs in _losses(tmp_path / "pretrain").values() for v in vs]
    assert len(losses) == 4096 // 64
    assert all(math.isfinite(v) for v in losses)
    # Until the queue holds real keys (step 8) the loss is low by construction:
    # lightly starts the queue with random vectors. Compare from there on.
    queue = recipe.pretrain.memory_bank_size
    full = queue // recipe.pretrain.batch_size
    after_refill = sum(losses[full : full + 12]) / 12
    last = sum(losses[-12:]) / 12
    assert (
        after_refill > math.log(queue + 1) - 0.5
    )  # near chance once the queue is real
    assert last < after_refill - 0.5, (after_refill, last)


def test_epoch_checkpoints_carry_the_training_clock(tiny_run: Path) -> None:
    files = sorted((tiny_run / "epochs").glob("epoch=*.ckpt"))
    assert [f.name for f in files] == [f"epoch={e:03d}.ckpt" for e in (1, 2, 3, 4)]
    seconds = []
    for epoch, path in enumerate(files, start=1):
        data = read_checkpoint(path)
        assert data["epoch"] == epoch - 1
        seconds.append(data["callbacks"]["TrainingClock"]["seconds"])
    assert 0 < seconds[0] < seconds[1] < seconds[2] < seconds[3]
    final = read_checkpoint(tiny_run / "final.ckpt")
    assert final["callbacks"]["TrainingClock"]["seconds"] >= seconds[3]
    assert not list((tiny_run / "epochs").glob(".*.tmp"))


def test_negative_keep_every_n_epochs_is_refused() -> None:
    with pytest.raises(RecipeError, match="keep_every_n_epochs' must be >= 0"):
        load_recipe(DENSE_RECIPE, ["pretrain.keep_every_n_epochs=-1"])


def test_curve_and_shipping_scripts(tiny_run: Path, tmp_path: Path) -> None:
    """The learning-curve benchmark evaluates the kept epochs (0 = random init) and
    the shipping script writes a verified slim checkpoint with its provenance."""
    run = tiny_run.parent
    out = tmp_path / "curve"
    from benchmarks import pretraining_curve as curve_script

    assert curve_script.main([str(run), "--epochs", "2,4", "--out", str(out)]) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert [row["epoch"] for row in curve["epochs"]] == [0, 2, 4]
    seconds = [row["train_seconds"] for row in curve["epochs"]]
    assert seconds[0] == 0 < seconds[1] < seconds[2]
    for row in curve["epochs"]:
        assert 0 <= row["knn_top1"] <= 1 and 0 <= row["linear_top1"] <= 1
    assert {"knn_top1", "linear_top1"} <= set(curve["raw_pixels"])
    table = (out / "RESULTS_pretraining.md").read_text()
    assert "| 0 (random init) |" in table and "| raw pixels (centred) |" in table
    # A second call reuses every stored evaluation (resumable) and gives the same.
    assert curve_script.main([str(run), "--epochs", "2,4", "--out", str(out)]) == 0
    assert json.loads((out / "curve.json").read_text())["epochs"] == curve["epochs"]

    target = tmp_path / "pretrained" / "tiny.ckpt"
    from benchmarks import ship_dense_checkpoint as ship

    args = [str(run), "--epoch", "4", "--curve", str(out / "curve.json")]
    assert ship.main([*args, "--target", str(target), "--commit", "abc"]) == 0
    record = json.loads(provenance_path(target).read_text())
    assert record["sha256"] == sha256_of(target) and record["commit"] == "abc"
    assert record["epoch"] == 4 and record["knn_top1"] == curve["epochs"][2]["knn_top1"]
    assert record["checkpoint_of_run"] == "pretrain/epochs/epoch=004.ckpt"
    assert "lightly-mcp pretrain" in record["regenerate"]
    data = read_checkpoint(target)
    assert "optimizer_states" not in data
    model = module_from_checkpoint(data, target)
    assert model.backbone_momentum.feature_dim == record["feature_dim"]
    with pytest.raises(SystemExit):  # epoch 3 was not evaluated
        ship.main(
            [
                str(run),
                "--epoch",
                "3",
                "--curve",
                str(out / "curve.json"),
                "--target",
                str(tmp_path / "x.ckpt"),
            ]
        )
