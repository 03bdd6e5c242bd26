"""Tiny in-memory data and trainers for method tests."""

from __future__ import annotations

import re
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightly_mcp.errors import MAX_MESSAGE  # noqa: F401 (re-exported to the tests)


class TwoViewTensors(Dataset):
    """Random images as two "views" with a label, as lightly datasets give them."""

    def __init__(self, n: int = 32, size: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=generator)
        self.noise = 0.1 * torch.randn(n, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        x = self.images[i]
        return [x, x.flip(-1) + self.noise[i]], 0, str(i)


def loader(n: int = 32, size: int = 16, batch_size: int = 8) -> DataLoader:
    return DataLoader(
        TwoViewTensors(n, size), batch_size=batch_size, shuffle=False, drop_last=True
    )


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(**options)


TINY = dict(
    backbone="torchvision/resnet18",
    backbone_kwargs={"small_input": True},
    batch_size_per_device=8,
    memory_bank_size=64,
    projection_hidden_dim=32,
    projection_dim=16,
    lr=0.06,
)


#: A recipe that runs every stage of ``lightly-mcp run`` in seconds (digits, 16 px).
TINY_RECIPE = {
    "seed": 0,
    "data": {"kind": "digits", "input_size": 16, "subset": 64},
    "backbone": {
        "name": "torchvision/mobilenet_v2",
        "small_input": False,
        "width_multiplier": 0.5,
    },
    "pretrain": {
        "epochs": 1,
        "batch_size": 16,
        "memory_bank_size": 64,
        "projection_hidden_dim": 32,
        "projection_dim": 16,
    },
    "mcp": {
        "pruning_ratio": 0.5,
        "frq": 2,
        "dr": 1,
        "admm_interval": 2,
        "admm_interval_unit": "steps",
        "epochs": 1,
        "batch_size": 16,
    },
    "export": {"latency": False},
    "eval": {"train_subset": 200, "test_subset": 100, "linear_epochs": 2},
    "trainer": {"accelerator": "cpu", "log_every_n_steps": 1},
}


_PYTEST_TMP = re.compile(r"\S*?/pytest-of-[^/]+/pytest-\d+(?:/popen-gw\d+)?")


def message_length(message: str) -> int:
    """A refusal's length as the 200-character rule counts it: without the
    ``lightly-mcp: error: `` prefix, and with pytest's temporary root (whose length
    differs between machines and xdist workers) counted as one character; the rest
    of each path (at most the test's name, cut at 30 characters) counts.
    """
    text = message.strip().removeprefix("lightly-mcp: error: ")
    return len(_PYTEST_TMP.sub("T", text))
