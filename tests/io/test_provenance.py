"""Shipped checkpoints: slim content, sha256 verification and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightly_mcp.formats.loading import module_from_checkpoint
from lightly_mcp.formats.shipping import SLIM_KEYS, ship_checkpoint, slim_checkpoint
from lightly_mcp.io.files import default_file_mode
from lightly_mcp.io.provenance import provenance_path, sha256_of
from lightly_mcp.methods.checkpoints import (
    CheckpointError,
    load_dense_moco,
    read_checkpoint,
)
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.moco_v2 import MoCoV2
from tests.helpers import MAX_MESSAGE, TINY, loader, message_length, trainer

REGENERATE = "lightly-mcp pretrain recipes/x.yaml --out runs/x"


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MoCoV2 Lightning checkpoint after two steps (optimizer state and all)."""
    directory = tmp_path_factory.mktemp("provenance")
    torch.manual_seed(0)
    model = MoCoV2(**TINY)
    fit = trainer(directory, max_steps=2)
    fit.fit(model, loader(n=16))
    path = directory / "full.ckpt"
    fit.save_checkpoint(path)
    return path


def _ship(source: Path, target: Path) -> dict:
    return ship_checkpoint(
        read_checkpoint(source), target, {"regenerate": REGENERATE, "knn_top1": 0.5}
    )


def test_shipped_checkpoint_is_slim_and_verified(
    lightning_checkpoint: Path, tmp_path: Path
) -> None:
    target = tmp_path / "dense.ckpt"
    record = _ship(lightning_checkpoint, target)
    assert provenance_path(target) == tmp_path / "dense.provenance.json"
    on_disk = json.loads(provenance_path(target).read_text())
    assert on_disk == record
    assert record["sha256"] == sha256_of(target)
    assert record["bytes"] == target.stat().st_size
    assert record["file"] == "dense.ckpt" and record["knn_top1"] == 0.5
    for written in (target, provenance_path(target)):  # readable like any new file
        assert written.stat().st_mode & 0o777 == default_file_mode()
    data = read_checkpoint(target)  # verifies the hash
    assert set(data) <= set(SLIM_KEYS)
    assert "optimizer_states" not in data and "rng_states" not in data
    assert target.stat().st_size < lightning_checkpoint.stat().st_size
    # The slim file rebuilds the same model as the full one, queue included.
    full = module_from_checkpoint(read_checkpoint(lightning_checkpoint), "full")
    slim = module_from_checkpoint(data, target)
    for (name, a), (_, b) in zip(
        full.state_dict().items(), slim.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(full.criterion.memory_bank.bank, slim.criterion.memory_bank.bank)
    # ...and MCP starts from it.
    mcp = MCP(**TINY, pruning_ratio=0.5, input_size=16)
    report = load_dense_moco(mcp, target)
    assert report[0] == "format: lightly-mcp"
    assert any(line.startswith("memory bank: (64, 16) loaded") for line in report)


def test_altered_checkpoint_is_refused(
    lightning_checkpoint: Path, tmp_path: Path
) -> None:
    target = tmp_path / "dense.ckpt"
    _ship(lightning_checkpoint, target)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(target)
    message = str(error.value)
    assert target.name in message and "sha256" in message
    assert (
        "regenerate" in message
        and "\n" not in message
        and message_length(message) <= MAX_MESSAGE
    )
    mcp = MCP(**TINY, pruning_ratio=0.5, input_size=16)
    with pytest.raises(CheckpointError, match="altered"):
        load_dense_moco(mcp, target)


def test_missing_shipped_checkpoint_says_how_to_regenerate(
    lightning_checkpoint: Path, tmp_path: Path
) -> None:
    target = tmp_path / "dense.ckpt"
    _ship(lightning_checkpoint, target)
    target.unlink()
    with pytest.raises(FileNotFoundError) as error:
        read_checkpoint(target)
    assert str(target) in str(error.value) and REGENERATE in str(error.value)


def test_broken_provenance_file_is_refused(
    lightning_checkpoint: Path, tmp_path: Path
) -> None:
    target = tmp_path / "dense.ckpt"
    _ship(lightning_checkpoint, target)
    provenance_path(target).write_text("{not json")
    with pytest.raises(CheckpointError, match="provenance file .* is not valid JSON"):
        read_checkpoint(target)
    provenance_path(target).write_text("{}")
    with pytest.raises(CheckpointError, match="has no 'sha256' entry"):
        read_checkpoint(target)


def test_only_dense_lightning_checkpoints_are_shipped(
    lightning_checkpoint: Path,
) -> None:
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        slim_checkpoint({"state_dict": {}})
    data = read_checkpoint(lightning_checkpoint)
    data["state_dict"] = {**data["state_dict"], "admm.z_0": torch.zeros(1)}
    with pytest.raises(ValueError, match="MCP checkpoint"):
        slim_checkpoint(data)
