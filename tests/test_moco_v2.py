from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightly_mcp.moco_v2 import MoCoV2
from lightly_mcp.transforms import build_transform
from tests.helpers import TINY, loader, trainer


def _distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return sum(
        float((p - q).detach().pow(2).sum())
        for p, q in zip(a.parameters(), b.parameters())
    )


def test_fit_trains_fills_queue_and_moves_momentum_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoCoV2(**TINY, momentum=0.9)
    bank_before = model.criterion.memory_bank.bank.clone()
    momentum_before = copy.deepcopy(model.backbone_momentum)
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(model, loader())
    loss = fit.callback_metrics["train_loss"]
    assert torch.isfinite(loss)
    bank = model.criterion.memory_bank
    assert int(bank.bank_ptr) == 3 * 8  # 3 batches of 8 keys enqueued
    assert not torch.equal(bank.bank[:24], bank_before[:24])
    assert torch.equal(bank.bank[24:], bank_before[24:])
    # The momentum encoder moved, and toward the query encoder.
    assert _distance(model.backbone_momentum, momentum_before) > 0
    assert _distance(model.backbone_momentum, model.backbone) < _distance(
        momentum_before, model.backbone
    )
    # The momentum side gets no gradient.
    assert not any(p.requires_grad for p in model.backbone_momentum.parameters())


def test_momentum_update_formula() -> None:
    model = MoCoV2(**TINY, momentum=0.75)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    query = [p.clone() for p in model.backbone.parameters()]
    key = [p.clone() for p in model.backbone_momentum.parameters()]
    model.update_momentum_encoder()
    for q, k, new in zip(query, key, model.backbone_momentum.parameters()):
        assert torch.allclose(new, 0.75 * k + 0.25 * q)


def test_hyperparameters_saved_and_queue_checkpointed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoCoV2(**TINY, temperature=0.3)
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(model, loader())
    path = tmp_path / "moco.ckpt"
    fit.save_checkpoint(path)
    restored = MoCoV2.load_from_checkpoint(path)
    assert restored.hparams["temperature"] == 0.3
    assert restored.hparams["memory_bank_size"] == 64
    assert torch.equal(
        restored.criterion.memory_bank.bank, model.criterion.memory_bank.bank
    )
    assert int(restored.criterion.memory_bank.bank_ptr) == 16


def test_loss_falls_on_repeated_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoCoV2(**{**TINY, "memory_bank_size": 0, "lr": 0.5})
    fit = trainer(tmp_path, max_steps=12, log_every_n_steps=1)
    losses = []

    from pytorch_lightning.callbacks import Callback

    class LossRecorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            losses.append(float(outputs["loss"]))

    fit.callbacks.append(LossRecorder())
    fit.fit(model, loader(n=8))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"memory_bank_size": -1}, "memory_bank_size must be >= 0"),
        ({"lr": -1.0}, "lr must be > 0"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoCoV2(**{**TINY, **kwargs})


def test_transform_small_grayscale_images() -> None:
    from PIL import Image

    transform = build_transform(input_size=32)
    views = transform(Image.new("L", (28, 28), color=128))
    assert len(views) == 2
    assert all(v.shape == (3, 32, 32) for v in views)
    views16 = transform(Image.new("I;16", (28, 28), color=30000))
    assert views16[0].shape == (3, 32, 32)
