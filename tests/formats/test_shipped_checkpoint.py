"""The dense checkpoints shipped in pretrained/: verified, complete and usable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightly_mcp.app.recipe import load_recipe
from lightly_mcp.formats.loading import module_from_checkpoint
from lightly_mcp.formats.shipping import SLIM_KEYS
from lightly_mcp.io.provenance import provenance_path, sha256_of
from lightly_mcp.methods.checkpoints import CheckpointError, read_checkpoint
from lightly_mcp.methods.moco_v2 import MoCoV2
from tests.helpers import MAX_MESSAGE, message_length

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "pretrained").glob("*.ckpt"))


def test_the_repository_ships_a_dense_checkpoint() -> None:
    assert SHIPPED, "pretrained/ has no checkpoint"
    quickstart = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert quickstart.pretrain.dense_checkpoint is not None
    assert (ROOT / quickstart.pretrain.dense_checkpoint) in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_checkpoint_loads_verified_and_complete(path: Path) -> None:
    record = json.loads(provenance_path(path).read_text())
    assert record["sha256"] == sha256_of(path)
    assert path.stat().st_size == record["bytes"] <= 20 * 1024 * 1024
    for key in ("command", "recipe", "commit", "train_seconds", "knn_top1"):
        assert record[key] not in (None, ""), key
    data = read_checkpoint(path)
    assert set(data) <= set(SLIM_KEYS) and "optimizer_states" not in data
    model = module_from_checkpoint(data, path)
    assert isinstance(model, MoCoV2)
    # Every tensor of the model came from the file: nothing missing, nothing extra.
    assert set(data["state_dict"]) == set(model.state_dict())
    bank = model.criterion.memory_bank.bank
    assert bank.shape == (
        model.hparams["memory_bank_size"],
        model.hparams["projection_dim"],
    )
    assert torch.equal(bank, data["memory_bank"]["bank"])
    size = record["recipe"]["data"]["input_size"]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    for network in (model.backbone, model.backbone_momentum):
        network.eval()
        with torch.no_grad():
            features = network(images)
        assert features.shape == (4, record["feature_dim"])
        assert bool(torch.isfinite(features).all())
    with torch.no_grad():
        keys = model.projection_head_momentum(model.backbone_momentum(images))
    assert keys.shape == (4, model.hparams["projection_dim"])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_altered_shipped_checkpoint_is_refused(path: Path, tmp_path: Path) -> None:
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    shutil.copy(provenance_path(path), provenance_path(copy))
    raw = bytearray(copy.read_bytes())
    raw[-100] ^= 0x01
    copy.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(copy)
    message = str(error.value)
    assert copy.name in message
    assert "'regenerate' command" in message and ".provenance.json" in message
    assert message_length(message) <= MAX_MESSAGE


# Dense checkpoints too large to ship (ResNet-18): only their provenance is committed.
LOCAL = sorted((ROOT / "pretrained" / "local").glob("*.provenance.json"))


def test_local_checkpoints_are_recorded() -> None:
    assert [p.name for p in LOCAL] == ["fashion_mnist_resnet18.provenance.json"]


@pytest.mark.parametrize("record_path", LOCAL, ids=[p.name for p in LOCAL])
def test_local_checkpoint_provenance_says_how_to_regenerate(
    record_path: Path, tmp_path: Path
) -> None:
    record = json.loads(record_path.read_text())
    for key in ("command", "recipe", "commit", "train_seconds", "knn_top1", "sha256"):
        assert record[key] not in (None, ""), key
    assert record["bytes"] > 20 * 1024 * 1024  # why it is not in the repository
    assert record["regenerate"].startswith(record["command"] + " && ")
    # The recorded recipe is the committed recipe file, as the run used it.
    recipe = load_recipe(ROOT / record["recipe_file"])
    assert recipe.backbone.name == record["backbone"]["name"]
    assert recipe.pretrain.epochs == record["epoch"] == record["epochs_in_recipe"]
    assert recipe.data.subset is None and record["recipe"]["data"]["subset"] is None
    # Without the file (a fresh clone), loading it names the file and the command.
    name = record_path.name.replace(".provenance.json", ".ckpt")
    missing = tmp_path / name
    shutil.copy(record_path, provenance_path(missing))
    with pytest.raises(FileNotFoundError) as error:
        read_checkpoint(missing)
    assert str(missing) in str(error.value)
    assert record["regenerate"] in str(error.value)
    # Where it was regenerated, the file must match the recorded hash.
    local = record_path.parent / name
    if local.is_file():
        assert sha256_of(local) == record["sha256"]
