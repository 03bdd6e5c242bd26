"""MCP: Momentum Contrastive Pruning, as a lightly-style LightningModule.

MoCo v2 keeps training while an ADMM penalty on the query encoder drives a preset
fraction of every channel group to zero. Keys come from the momentum subnet (the
momentum encoder seen through the ADMM mask), except during a smooth transition at
the start, when the full momentum encoder stands in for it less and less often. No
fine-tuning follows: the momentum subnet at the end of training is the result.

Reference:
    Momentum Contrastive Pruning, Sections 3.4-3.5 and Algorithm 1; DESIGN.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightly_mcp.admm import ADMMRegularizer
from lightly_mcp.checkpoints import load_dense_moco
from lightly_mcp.compaction import compact
from lightly_mcp.counting import count_parameters
from lightly_mcp.errors import MCPWarning
from lightly_mcp.groups import find_channel_groups
from lightly_mcp.moco_v2 import MoCoV2
from lightly_mcp.momentum_subnet import MomentumSubnet
from lightly_mcp.transforms import build_transform
from lightly_mcp.transition import SmoothTransition

ADMM_INTERVAL_UNITS = ("steps", "epochs")


# A mask is "oscillating" when at least this fraction of the possible channel swaps
# happens at this many ADMM updates in a row.
OSCILLATION_CHURN = 0.5
OSCILLATION_UPDATES = 3


class MCP(MoCoV2):
    """Momentum Contrastive Pruning on top of :class:`MoCoV2`.

    Every training step: the smooth-transition scheduler picks the key source (full
    momentum encoder or momentum subnet); queries come from the query encoder; the
    loss is InfoNCE plus the ADMM penalty; SGD updates the query side; the unmasked
    momentum encoder follows by momentum; the keys enter the queue. Every
    ``admm_interval`` steps or epochs the ADMM variables and the mask are updated.
    Masks change only then: a training step does no sorting, copying or tracing.

    All MCP state (Z, U, mask, ρ, scheduler position, queue) is in the checkpoint, so
    ``Trainer.fit(ckpt_path=...)`` resumes it.

    Args:
        pruning_ratio: Fraction of channels removed in every group, in [0, 1).
        rho: ADMM penalty ρ (0.01 in the paper).
        rho_growth: Factor applied to ρ after every ADMM update.
        admm_interval: ADMM update period, in ``admm_interval_unit``.
        admm_interval_unit: ``"steps"`` or ``"epochs"``.
        frq: Smooth transition: initial full-encoder iterations between subnet ones.
        dr: Smooth transition: decay of ``frq`` after every subnet iteration.
        keep_output_dim: Do not prune the group that reaches the backbone's output.
        input_size: Image size used to trace the backbone's channel groups.
        dense_checkpoint: A dense MoCo checkpoint to start from (query and momentum
            encoders, heads, and the queue when present); from scratch if None.
        **moco_kwargs: Arguments of :class:`MoCoV2` (backbone, temperature, ...).

    Examples:
        >>> model = MCP(backbone="torchvision/resnet18", pruning_ratio=0.5,
        ...             dense_checkpoint="pretrain/last.ckpt")
        >>> trainer = pytorch_lightning.Trainer(max_epochs=10)
        >>> trainer.fit(model, dataloader)
        >>> compact_backbone = model.compact_momentum_subnet()
    """

    def __init__(
        self,
        pruning_ratio: float = 0.73,
        rho: float = 0.01,
        rho_growth: float = 1.0,
        admm_interval: int = 1,
        admm_interval_unit: str = "epochs",
        frq: int = 100,
        dr: int = 1,
        keep_output_dim: bool = True,
        input_size: int = 32,
        dense_checkpoint: str | None = None,
        **moco_kwargs: Any,
    ) -> None:
        super().__init__(**moco_kwargs)
        if isinstance(admm_interval, bool) or not (
            isinstance(admm_interval, int) and admm_interval >= 1
        ):
            raise ValueError(
                f"admm_interval must be an integer >= 1, got {admm_interval!r}."
            )
        if admm_interval_unit not in ADMM_INTERVAL_UNITS:
            raise ValueError(
                f"admm_interval_unit must be one of {ADMM_INTERVAL_UNITS}, got "
                f"{admm_interval_unit!r}."
            )
        self.save_hyperparameters()
        self.dense_load_report: list[str] = []
        if dense_checkpoint is not None:
            self.dense_load_report = self.load_dense_checkpoint(dense_checkpoint)

        example_inputs = torch.randn(1, 3, input_size, input_size)
        self.groups = find_channel_groups(
            self.backbone, example_inputs, keep_output_dim=keep_output_dim
        )
        self.admm = ADMMRegularizer(
            self.backbone, self.groups, pruning_ratio, rho=rho, rho_growth=rho_growth
        )
        self.subnet = MomentumSubnet(
            self.backbone_momentum, self.groups, self.admm.masks
        )
        self.transition = SmoothTransition(frq, dr)
        # Every mask keeps exactly n_g channels per group, so the compact size is
        # fixed by the ratio: count it once.
        self.kept_parameter_fraction = count_parameters(
            compact(
                self.backbone_momentum, self.groups, self.admm.masks, example_inputs
            )
        ) / count_parameters(self.backbone_momentum)
        self._use_subnet = False
        self._last_changed = 0
        self._oscillating_updates = 0
        self._warned = False

    # --- the dense starting point --------------------------------------------------
    def load_dense_checkpoint(self, path: str | Path) -> list[str]:
        """Loads a dense MoCo checkpoint (see ``lightly_mcp.checkpoints``).

        Returns:
            Human-readable lines saying what was loaded and what was not.
        """
        return load_dense_moco(self, path)

    # --- keys ------------------------------------------------------------------------
    def key_backbone(self) -> nn.Module:
        """The momentum subnet or, during the transition, the full momentum encoder."""
        return self.subnet if self._use_subnet else self.backbone_momentum

    def momentum_subnet(self) -> MomentumSubnet:
        """The momentum encoder seen through the current mask (``φ ⊙ θ_k``)."""
        return self.subnet

    def compact_momentum_subnet(self) -> nn.Module:
        """A physically pruned copy of the momentum subnet, ready for export."""
        size = self.hparams["input_size"]
        return compact(
            self.subnet.materialize(),
            self.groups,
            self.subnet.masks,
            torch.randn(1, 3, size, size, device=self.device),
        )

    # --- training --------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One MCP step (Algorithm 1)."""
        self.update_momentum_encoder()
        self._use_subnet = self.transition.step()
        views = batch[0]
        info_nce = self.contrastive_loss(views)
        admm_loss = self.admm(self.backbone)
        loss = info_nce + admm_loss
        self.check_finite(loss)
        batch_size = len(views[0])
        log: dict[str, Any] = {"batch_size": batch_size, "sync_dist": True}
        self.log("train_loss", info_nce, prog_bar=True, **log)
        self.log("admm_loss", admm_loss, prog_bar=True, **log)
        self.log("subnet_keys", float(self._use_subnet), on_epoch=True, **log)
        self.log("rho", self.admm.rho, **log)
        self.log("kept_parameter_fraction", self.kept_parameter_fraction, **log)
        return loss

    def on_train_start(self) -> None:
        """Re-derives the subnet's mask from the ADMM state after setup.

        Under DDP, rank 0's buffers (Z, U, masks) are broadcast to every rank when
        the model is wrapped; the subnet's weight multipliers are derived state and
        are recomputed here so that every rank uses the same momentum subnet.
        """
        super().on_train_start()
        self.admm.refresh()
        self.subnet.set_masks(self.admm.masks)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """ADMM update every ``admm_interval`` optimizer steps."""
        interval = self.hparams["admm_interval"]
        if self.hparams["admm_interval_unit"] == "steps" and (
            self.global_step % interval == 0
        ):
            self.admm_update()

    def on_train_epoch_end(self) -> None:
        """ADMM update every ``admm_interval`` epochs."""
        interval = self.hparams["admm_interval"]
        if self.hparams["admm_interval_unit"] == "epochs" and (
            (self.current_epoch + 1) % interval == 0
        ):
            self.admm_update()

    def admm_update(self) -> int:
        """``Z ← Π(θ_q + U)``, ``U ← U + θ_q − Z``, new mask for the momentum subnet.

        Returns:
            Number of channels that entered or left the mask.
        """
        self._last_changed = self.admm.update(self.backbone)
        self.subnet.set_masks(self.admm.masks)
        churn = self.mask_churn_fraction(self._last_changed)
        self._check_mask_oscillation(churn)
        if self._trainer is not None:
            self.log("channels_changed", float(self._last_changed), sync_dist=True)
            self.log("mask_churn", churn, sync_dist=True)
            self.log("admm_distance", self.admm.distance(self.backbone), sync_dist=True)
        return self._last_changed

    def mask_churn_fraction(self, changed: int) -> float:
        """``changed`` as a fraction of the most an update can change: per group,
        ``min(kept, dropped)`` channels leave and as many enter.
        """
        most = sum(
            2 * min(kept, g.num_channels - kept)
            for g, kept in zip(self.admm.groups, self.admm.kept_channels())
        )
        return changed / most if most else 0.0

    def _check_mask_oscillation(self, churn: float) -> None:
        """Warns once when half or more of the dropped set swaps at 3 updates in a row.

        That is ADMM whose θ-step is missing: θ_q does not move towards Z − U between
        updates (ρ · lr · steps per interval far below 1), so U carries the dropped
        channels' weights back into the projection and the mask flips between two
        sets instead of settling (benchmarks/RESULTS.md, "ADMM response").
        """
        self._oscillating_updates = (
            self._oscillating_updates + 1 if churn >= OSCILLATION_CHURN else 0
        )
        if self._oscillating_updates >= OSCILLATION_UPDATES and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"MCP: the ADMM mask is oscillating ({churn:.0%} of the possible "
                f"channel swaps at each of the last {OSCILLATION_UPDATES} updates): "
                f"the query encoder barely moves towards Z - U between updates "
                f"(rho={self.admm.rho:g}), so the subnet is whichever mask the last "
                f"update chose. mcp.admm_interval and mcp.rho set how far it moves; "
                f"benchmarks/RESULTS.md measures both.",
                category=MCPWarning,
            )

    # --- checkpoint state outside state_dict() ----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the transition scheduler (the queue is added by MoCoV2)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["mcp_transition"] = self.transition.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the queue and the transition scheduler."""
        super().on_load_checkpoint(checkpoint)
        if "mcp_transition" in checkpoint:
            self.transition.load_state_dict(checkpoint["mcp_transition"])


# Module-level transform for small images (the CPU protocols); use
# ``build_transform(input_size=...)`` for other sizes.
transform = build_transform(input_size=32)
