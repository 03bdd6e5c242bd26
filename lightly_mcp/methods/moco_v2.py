"""MoCo v2, the dense starting point of MCP, as a lightly-style LightningModule.

Shaped like lightly's ``benchmarks/imagenet/resnet50/mocov2.py`` and built from
lightly's parts: ``MoCoProjectionHead``, ``NTXentLoss`` with a memory bank,
``update_momentum``, ``batch_shuffle`` / ``batch_unshuffle``,
``get_weight_decay_parameters`` and ``CosineWarmupScheduler``.

Reference:
    Improved Baselines with Momentum Contrastive Learning (MoCo v2), 2020,
    https://arxiv.org/abs/2003.04297
"""

from __future__ import annotations

import copy
import inspect
import random
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import (
    batch_shuffle,
    batch_unshuffle,
    get_weight_decay_parameters,
    update_momentum,
)
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torch.optim import SGD
from torch.optim.lr_scheduler import LambdaLR

from lightly_mcp.errors import InputError, TrainingDivergedError
from lightly_mcp.methods.backbones import backbone_label, build_backbone
from lightly_mcp.methods.resumable_data import restore_loader_positions
from lightly_mcp.methods.transforms import build_transform
from lightly_mcp.pruning.batchnorm import use_split_batchnorm


class MoCoV2(LightningModule):
    """MoCo v2: a query encoder trained by SGD and a momentum (key) encoder.

    Attribute names follow lightly's examples: ``backbone`` / ``projection_head`` are
    the query side, ``backbone_momentum`` / ``projection_head_momentum`` the key side.
    The memory bank (a non-persistent buffer in lightly) is saved in and restored
    from Lightning checkpoints.

    Args:
        backbone: Backbone name for ``build_backbone`` (e.g.
            ``"torchvision/resnet18"``, ``"timm/efficientnet_b0"``), or your own
            network mapping images to pooled features (recorded in checkpoints as
            ``"module/<ClassName>"``: load them with ``backbone=`` the module).
        backbone_kwargs: Options for ``build_backbone`` (``small_input``,
            ``width_multiplier``, ``weights``).
        batch_size_per_device: Batch size on one device (scales the learning rate).
        temperature: InfoNCE temperature τ.
        momentum: Momentum ``m`` of the key encoder update.
        memory_bank_size: Number of negative keys K in the queue.
        projection_hidden_dim: Hidden width of the projection head.
        projection_dim: Output dimension of the projection head.
        projection_batch_norm: BatchNorm in the projection head (MobileNetV2 needs it
            to learn on small data, see DESIGN.md).
        split_batch_norm: If > 1, replace every ``BatchNorm2d`` of both backbones by
            lightly's ``SplitBatchNorm`` with that many splits (shuffle-BN on one
            device).
        lr: Base learning rate per 256 images (scaled by the global batch size).
        weight_decay: SGD weight decay (not applied to norm and bias parameters).
        sgd_momentum: SGD momentum.
        warmup_epochs: Linear warm-up length (in steps of the cosine schedule: the
            scheduler is stepped every optimizer step).
        symmetric_loss: Use both views as query and key (lightly's CIFAR-10 setting).
        channels_last: Feed both encoders ``channels_last`` batches (faster
            convolutions on CPU; the weights keep their layout, shuffle-BN runs in
            that layout: ``lightly_mcp.pruning.batchnorm.ShuffleBatchNorm``).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "torchvision/resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        batch_size_per_device: int = 256,
        temperature: float = 0.2,
        momentum: float = 0.999,
        memory_bank_size: int = 65536,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        projection_batch_norm: bool = False,
        split_batch_norm: int = 0,
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        sgd_momentum: float = 0.9,
        warmup_epochs: int = 0,
        symmetric_loss: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("batch_size_per_device", batch_size_per_device)
        _check_positive("temperature", temperature)
        _check_positive("lr", lr)
        if not 0.0 <= momentum <= 1.0:
            raise InputError(f"momentum must be in [0, 1], got {momentum}.")
        if memory_bank_size < 0:
            raise InputError(f"memory_bank_size must be >= 0, got {memory_bank_size}.")
        # A backbone module is recorded by its label, never pickled into checkpoints.
        self._backbone_label = (
            backbone_label(backbone) if isinstance(backbone, nn.Module) else None
        )
        self.save_hyperparameters()
        self.batch_size_per_device = batch_size_per_device

        self.backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        if split_batch_norm > 1:
            use_split_batchnorm(self.backbone, split_batch_norm)
        self.projection_head = MoCoProjectionHead(
            input_dim=self.backbone.feature_dim,
            hidden_dim=projection_hidden_dim,
            output_dim=projection_dim,
            batch_norm=projection_batch_norm,
        )
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        self.backbone_momentum.requires_grad_(False)
        self.projection_head_momentum.requires_grad_(False)
        self.criterion = NTXentLoss(
            temperature=temperature,
            memory_bank_size=(memory_bank_size, projection_dim),
            gather_distributed=True,
        )

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: Sequence[str] | str | None = None,
        frame: types.FrameType | None = None,
        logger: bool = True,
    ) -> None:
        """Lightning's, with a backbone module recorded as ``"module/<ClassName>"``
        (a checkpoint holds its weights, never the module itself).
        """
        frame = frame or inspect.currentframe().f_back  # type: ignore[union-attr]
        ignored = [ignore] if isinstance(ignore, str) else list(ignore or [])
        label = getattr(self, "_backbone_label", None)
        if label is not None:
            ignored.append("backbone")
        super().save_hyperparameters(*args, ignore=ignored, frame=frame, logger=logger)
        if label is not None:
            self.hparams["backbone"] = label

    # --- forward -------------------------------------------------------------------
    def _layout(self, x: Tensor) -> Tensor:
        """``x`` in the memory layout the encoders run in (``channels_last``)."""
        if self.hparams.get("channels_last") and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Features of the query encoder's backbone."""
        features: Tensor = self.backbone(self._layout(x))
        return features

    def forward_query_encoder(self, x: Tensor) -> Tensor:
        """Projections of the query encoder."""
        projections: Tensor = self.projection_head(self.backbone(self._layout(x)))
        return projections

    def key_backbone(self) -> nn.Module:
        """The network that encodes this step's keys (MCP overrides this)."""
        return self.backbone_momentum

    @torch.no_grad()
    def forward_key_encoder(self, x: Tensor) -> Tensor:
        """Projections of the key encoder, with batch shuffling (shuffle-BN)."""
        distributed = self.trainer.world_size > 1 if self._trainer else False
        x, shuffle = batch_shuffle(batch=x, distributed=distributed)
        projections = self.projection_head_momentum(
            self.key_backbone()(self._layout(x))
        )
        projections = batch_unshuffle(
            batch=projections, shuffle=shuffle, distributed=distributed
        )
        keys: Tensor = projections.detach()
        return keys

    # --- training ------------------------------------------------------------------
    def update_momentum_encoder(self) -> None:
        """``θ_k ← m·θ_k + (1 − m)·θ_q`` for the backbone and the projection head."""
        m = self.hparams["momentum"]
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)

    def contrastive_loss(self, views: list[Tensor]) -> Tensor:
        """InfoNCE of the query view against the key view (both ways if symmetric).

        With the symmetric loss and a queue, both directions are one call of the
        criterion on the concatenated pairs: the mean over both halves is the average
        of the two losses, both use the queue as it was before this step, and the
        keys of this step enter the queue once (lightly's ``NTXentLoss`` enqueues on
        every call, so a second call would give the second direction the first one's
        keys, the momentum embeddings of its own queries' images, as negatives).
        """
        queries = self.forward_query_encoder(views[0])
        keys = self.forward_key_encoder(views[1])
        if not self.hparams["symmetric_loss"]:
            loss: Tensor = self.criterion(queries, keys)
            return loss
        queries_1 = self.forward_query_encoder(views[1])
        keys_0 = self.forward_key_encoder(views[0])
        if self.hparams["memory_bank_size"] == 0:  # in-batch negatives, no queue
            return 0.5 * (
                self.criterion(queries, keys) + self.criterion(queries_1, keys_0)
            )
        loss = self.criterion(
            torch.cat([queries, queries_1]), torch.cat([keys, keys_0])
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One MoCo v2 step; ``batch`` is ``(views, ...)`` as lightly datasets give."""
        self.update_momentum_encoder()
        views = batch[0]
        loss = self.contrastive_loss(views)
        self.check_finite(loss)
        self.log(
            "train_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(views[0])
        )
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """Stops training on a NaN/Inf loss, before it reaches the weights."""
        if not bool(torch.isfinite(loss)):
            raise TrainingDivergedError(
                f"the loss became {float(loss)} at step {self.global_step}: lower the "
                f"learning rate (lr={self.hparams['lr']}) or, for MCP, mcp.rho; the "
                "last checkpoint is unaffected."
            )

    def configure_optimizers(self) -> Any:
        """SGD (no weight decay on norm and bias parameters) + cosine schedule."""
        params, params_no_weight_decay = get_weight_decay_parameters(
            [self.backbone, self.projection_head]
        )
        world_size = self.trainer.world_size if self._trainer else 1
        lr = self.hparams["lr"] * self.batch_size_per_device * world_size / 256
        optimizer = SGD(
            [
                {"name": "mocov2", "params": params},
                {
                    "name": "mocov2_no_weight_decay",
                    "params": params_no_weight_decay,
                    "weight_decay": 0.0,
                },
            ],
            lr=lr,
            momentum=self.hparams["sgd_momentum"],
            weight_decay=self.hparams["weight_decay"],
        )
        max_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = {
            "scheduler": self.lr_scheduler(optimizer, max_steps),
            "interval": "step",
        }
        return [optimizer], [scheduler]

    def lr_scheduler(self, optimizer: SGD, max_steps: int) -> LambdaLR:
        """Per-step learning-rate schedule: lightly's cosine with linear warm-up."""
        return CosineWarmupScheduler(
            optimizer=optimizer,
            # A run shorter than its warm-up warms up over the whole run.
            warmup_epochs=min(self.hparams["warmup_epochs"], max_steps),
            max_epochs=max_steps,
        )

    def on_train_start(self) -> None:
        """Restores a resumable loader's position (``configure_optimizers`` reads
        ``estimated_stepping_batches``, after which Lightning 2.6 does not).
        """
        restore_loader_positions(self.trainer)

    def finish_training(self, loader: Any) -> None:
        """The end-of-training work after the last step (none for MoCo v2).

        ``lightly_mcp.app.pipeline`` calls it after every fit that took all its steps,
        also when Lightning resumed a checkpoint that had already taken them all (then
        no training hook runs): models with such work (``MCP``) do it here, once.
        """

    # --- checkpoint state that lightly keeps outside state_dict() ---------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Saves the memory bank (a non-persistent buffer in lightly) and the RNGs."""
        bank = self.criterion.memory_bank
        checkpoint["memory_bank"] = {
            "bank": bank.bank.detach().cpu().clone(),
            "bank_ptr": bank.bank_ptr.detach().cpu().clone(),
        }
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the memory bank and the RNGs when the checkpoint has them."""
        saved = checkpoint.get("memory_bank")
        if saved is not None:
            self.load_memory_bank(saved["bank"], saved["bank_ptr"])
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    @torch.no_grad()
    def load_memory_bank(self, bank: Tensor, bank_ptr: Tensor) -> None:
        """Copies a saved queue (keys and pointer) into the loss's memory bank."""
        memory_bank = self.criterion.memory_bank
        if tuple(bank.shape) != tuple(memory_bank.bank.shape):
            raise InputError(
                f"Saved memory bank has shape {tuple(bank.shape)} but this model's has "
                f"{tuple(memory_bank.bank.shape)}; set memory_bank_size and "
                "projection_dim to the checkpoint's values."
            )
        memory_bank.bank.copy_(bank)
        memory_bank.bank_ptr.copy_(bank_ptr)


def _rng_states() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and Python RNG states, for exact resume."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state(
            (kind, keys.numpy(), int(pos), int(has_gauss), float(cached))
        )
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state_to_tensors(state: Any) -> list[Any]:
    # Plain types and tensors only, so that weights_only=True loading accepts them.
    kind, keys, pos, has_gauss, cached = state
    return [
        str(kind),
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    ]


def _python_state_to_lists(state: Any) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise InputError(f"{name} must be > 0, got {value}.")


# Module-level transform, as in lightly's benchmark methods (ImageNet-size views).
transform = build_transform(input_size=224)
