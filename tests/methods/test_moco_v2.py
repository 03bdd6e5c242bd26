from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.methods.transforms import build_transform
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


def test_symmetric_loss_uses_the_queue_before_the_step_and_enqueues_once() -> None:
    """Both directions see the queue as it was before the step: the second must not
    get the first one's keys (its own images' momentum embeddings) as negatives."""
    torch.manual_seed(0)
    model = MoCoV2(**TINY, symmetric_loss=True)
    bank = model.criterion.memory_bank
    queue = bank.bank.clone()  # (size, dim): random unit vectors at the start
    views = next(iter(loader()))[0]
    state = torch.get_rng_state()
    loss = model.contrastive_loss(views)
    torch.set_rng_state(state)
    q0 = model.forward_query_encoder(views[0])
    k1 = model.forward_key_encoder(views[1])
    q1 = model.forward_query_encoder(views[1])
    k0 = model.forward_key_encoder(views[0])

    def info_nce(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    expected = 0.5 * (info_nce(q0, k1) + info_nce(q1, k0))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert int(bank.bank_ptr) == 2 * len(views[0])  # this step's keys, once
