"""MCP: Momentum Contrastive Pruning, as a lightly-style LightningModule.

MoCo v2 keeps training while an ADMM penalty on the query encoder drives a preset
fraction of every channel group to zero. Keys come from the momentum subnet (the
momentum encoder seen through the ADMM mask), except during a smooth transition at
the start, when the full momentum encoder stands in for it less and less often. No
fine-tuning follows: the momentum subnet at the end of training is the result.

The ADMM update comes at the end of every *block* (``admm_interval`` steps or epochs),
as in the paper's schedule (Sec. 4.1; ``lightly_mcp.pruning.schedule``): optionally the
learning rate restarts at every block, ρ is derived so that every block moves θ_q far
enough towards ``Z − U`` for the mask to settle, and a final phase trains with the
mask frozen. Before training ends, the momentum subnet's BatchNorm statistics are
re-estimated with its own forwards, so what is evaluated and exported describes the
subnet.

Reference:
    Momentum Contrastive Pruning, Sections 3.4-3.5 and Algorithm 1; DESIGN.md.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from lightly_mcp.errors import InputError, MCPWarning
from lightly_mcp.methods.checkpoints import (
    CheckpointError,
    checkpoint_format,
    dense_model_arguments,
    load_dense_moco,
    read_checkpoint,
)
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.methods.options import (
    CONVERGING_RESPONSE,
    CONVERGING_SCHEDULE,
    check_mcp_options,
    converging_blocks,
)
from lightly_mcp.methods.transforms import build_transform
from lightly_mcp.pruning.admm import ADMMRegularizer
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.measure import count_parameters
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from lightly_mcp.pruning.pruning_ratio import solve_pruning_ratio
from lightly_mcp.pruning.schedule import (
    MASK_HOLD_ALPHA,
    BlockSchedule,
    alpha_of_response,
)
from lightly_mcp.pruning.transition import SmoothTransition

#: MCP hyper-parameters added after the first checkpoints, and the value a checkpoint
#: without them was trained with (rebuilding or resuming it keeps that value).
LEGACY_HPARAMS: dict[str, Any] = {"round_to": 1}


class MCP(MoCoV2):
    """Momentum Contrastive Pruning on top of :class:`MoCoV2`.

    Every training step: the key source is chosen (full momentum encoder or momentum
    subnet); queries come from the query encoder; the loss is InfoNCE plus the ADMM
    penalty; SGD updates the query side; the unmasked momentum encoder follows by
    momentum; the keys enter the queue. At the end of every block of
    ``admm_interval`` steps or epochs the ADMM variables and the mask are updated,
    except at the very end of training and during the last ``frozen_blocks`` blocks.
    Masks change only then: a training step does no sorting, copying or tracing,
    except that the first subnet step after a mask change rebuilds the compact copy
    that computes the subnet's keys (``compact_keys``; once per changed mask).

    All MCP state (Z, U, mask, ρ, transition position, queue, block bookkeeping) is in
    the checkpoint, so ``Trainer.fit(ckpt_path=...)`` resumes it, also mid-block.

    Args:
        pruning_ratio: Fraction of channels removed in every group, in [0, 1).
        round_to: Hardware-aligned pruning: every group keeps a multiple of this many
            channels (the count nearest to ``n_g``, at least ``round_to``, at most the
            group; a group smaller than ``round_to`` keeps ``n_g``; tied channels stay
            whole units: ``lightly_mcp.pruning.groups.align_kept_channels``). The ADMM
            projection, hence every mask, the momentum subnet and the compact model
            keep these counts: nothing is widened after training. 1: exactly ``n_g``.
        rho: ADMM penalty ρ (0.01 in the paper); ignored when ``rho_response`` is set.
        rho_growth: Factor applied to ρ after every ADMM update (U is rescaled).
        rho_response: Derive ρ for every block from the learning-rate schedule and
            SGD momentum so that the block's predicted θ-response
            ``ρ · Σ lr / (1 − β)`` equals this (≥ 1 lets the mask settle; see
            ``lightly_mcp.pruning.schedule``). None: use ``rho`` as given.
        admm_interval: Block length, in ``admm_interval_unit``.
        admm_interval_unit: ``"steps"`` or ``"epochs"``.
        lr_schedule: ``"cosine"`` (one cosine over the run, MoCo v2's),
            ``"block_step"`` (the paper's: the rate restarts every block and is
            multiplied by 0.1 at every third of it) or ``"block_cosine"``.
        frozen_blocks: Blocks at the end trained with the mask frozen: subnet keys,
            and a penalty that pulls only the dropped channels of θ_q to zero. This is
            MCP's own training, not fine-tuning afterwards.
        frozen_mask: How the frozen blocks treat θ_q's dropped channels:
            ``"penalty"`` pulls them towards zero (``ADMMRegularizer.
            support_penalty``); ``"hard"`` sets them to zero at the start of the
            frozen phase and after every step, so the query encoder trains as the
            compact network the momentum subnet will be.
        schedule: ``"manual"`` (the schedule arguments as given) or
            ``"converging"``: laid out from the run's length (the Trainer's
            ``max_steps`` or epochs) so that the mask settles: 2 to 4 ADMM blocks of
            at least ``3 / (1 − momentum)`` steps where the run allows, ρ derived
            for a θ-response of 1 per block (``rho_response``, if given, instead),
            a cosine learning rate restarting every block, keys from the full
            momentum encoder until the mask holds, the last block with the mask
            frozen. A run too short for it is refused when training starts, with
            the shortest that works.
        mask_updates: ``"admm"`` (every update projects ``θ_q + U`` anew: the
            method) or ``"fixed"`` (the start's magnitude mask is kept and ADMM
            pulls θ_q onto it with the same schedule and subnet keys: the ablation
            of what the changing mask adds).
        transition: ``"paper"``: the smooth transition ``(frq, dr)`` of Sec. 3.5;
            ``"stable_mask"``: keys from the full momentum encoder until an ADMM
            update leaves the mask unchanged after a block that moved θ_q far enough
            for that to mean something (α ≥ 0.29), or no update is left; then from
            the momentum subnet.
        frq: Smooth transition: initial full-encoder iterations between subnet ones.
        dr: Smooth transition: decay of ``frq`` after every subnet iteration.
        recalibration_batches: Batches of training images used, when training ends,
            to re-estimate the momentum subnet's BatchNorm statistics with its own
            forwards (0: keep the statistics gathered during training).
        keep_output_dim: Do not prune the group that reaches the backbone's output.
        compact_keys: Compute the momentum subnet's keys with a physically pruned
            copy of it (rebuilt at every mask change, weights gathered from the
            momentum encoder at every step), which does a fraction of the masked
            forward's work; the masked forward is the fallback where the copy
            cannot be built or does not reproduce it
            (``MomentumSubnet.compact_failure`` says why). False: always masked.
        input_size: Image size used to trace the backbone's channel groups.
        dense_checkpoint: A dense MoCo checkpoint to start from (query and momentum
            encoders, heads, and the queue when present); from scratch if None.
        target_params: Instead of ``pruning_ratio`` (which it replaces): the
            fraction of the backbone's parameters to remove. The uniform ratio is
            solved on this model's backbone and channel groups, with the aligned
            counts of ``round_to``
            (``solve_pruning_ratio``) and recorded as the ``pruning_ratio``
            hyper-parameter, so that a checkpoint rebuilds without solving again.
        **moco_kwargs: Arguments of :class:`MoCoV2` (backbone, temperature, ...).

    Examples:
        >>> model = MCP(backbone="torchvision/resnet18", pruning_ratio=0.5,
        ...             admm_interval=2, lr_schedule="block_step", rho_response=1.0,
        ...             dense_checkpoint="pretrain/last.ckpt")
        >>> trainer = pytorch_lightning.Trainer(max_epochs=10)
        >>> trainer.fit(model, dataloader)
        >>> compact_backbone = model.compact_momentum_subnet()
    """

    #: The model settings :meth:`from_checkpoint` read from the checkpoint.
    adopted_settings: dict[str, Any]

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> MCP:
        """MCP starting from a dense MoCo checkpoint, with the checkpoint's own model
        settings.

        The backbone, its options, the projection head and shuffle-BN are read from
        the checkpoint, and the queue size, temperature and momentum where it holds
        them (this project's hyper-parameters, or the tensors of lightly's example
        and benchmark checkpoints and of the official MoCo release, see
        ``lightly-mcp inspect``); one line (Lightning's ``rank_zero_info``) says
        which were adopted. Every other argument of :class:`MCP` (and
        :class:`MoCoV2`) can be given; a given argument wins over the checkpoint's.

        Examples:
            >>> model = MCP.from_checkpoint("moco.ckpt", pruning_ratio=0.5,
            ...                             batch_size_per_device=128)

        Raises:
            CheckpointError: For a file that is not a MoCo checkpoint of a known
                format, or whose weights do not fit the settings.
        """
        data = read_checkpoint(path)
        try:
            fmt = checkpoint_format(data)
        except CheckpointError as error:
            raise CheckpointError(f"Checkpoint '{path}': {error}") from None
        found = dense_model_arguments(data)
        adopted: dict[str, Any] = {}
        for key, (value, _) in found.items():
            if key == "backbone_kwargs":
                given = overrides.get("backbone_kwargs") or {}
                merged = {k: v for k, v in value.items() if k not in given}
                if merged:
                    adopted[key] = {**merged, **given}
            elif key not in overrides:
                adopted[key] = value
        by_evidence: dict[str, list[str]] = {}
        for key in adopted:
            by_evidence.setdefault(found[key][1], []).append(f"{key}={adopted[key]!r}")
        described = "; ".join(
            f"{', '.join(settings)} ({evidence})"
            for evidence, settings in by_evidence.items()
        )
        rank_zero_info(
            f"MCP.from_checkpoint: '{path}' is a {fmt} checkpoint; adopted "
            f"{described or 'nothing (every setting was given)'}."
        )
        model = cls(**{**overrides, **adopted, "dense_checkpoint": str(path)})
        model.adopted_settings = adopted
        return model

    def __init__(
        self,
        pruning_ratio: float = 0.73,
        round_to: int = 8,
        rho: float = 0.01,
        rho_growth: float = 1.0,
        rho_response: float | None = None,
        admm_interval: int = 1,
        admm_interval_unit: str = "epochs",
        lr_schedule: str = "cosine",
        frozen_blocks: int = 0,
        frozen_mask: str = "penalty",
        transition: str = "paper",
        frq: int = 100,
        dr: int = 1,
        mask_updates: str = "admm",
        schedule: str = "manual",
        recalibration_batches: int = 20,
        keep_output_dim: bool = True,
        compact_keys: bool = True,
        input_size: int = 32,
        dense_checkpoint: str | None = None,
        target_params: float | None = None,
        **moco_kwargs: Any,
    ) -> None:
        super().__init__(**moco_kwargs)
        check_mcp_options(
            {
                "frq": frq,
                "dr": dr,
                "admm_interval": admm_interval,
                "frozen_blocks": frozen_blocks,
                "recalibration_batches": recalibration_batches,
                "admm_interval_unit": admm_interval_unit,
                "lr_schedule": lr_schedule,
                "frozen_mask": frozen_mask,
                "transition": transition,
                "rho": rho,
                "rho_growth": rho_growth,
                "rho_response": rho_response,
                "compact_keys": compact_keys,
                "round_to": round_to,
                "mask_updates": mask_updates,
                "schedule": schedule,
            }
        )
        if schedule == "converging":
            given = {
                "admm_interval_unit": admm_interval_unit,
                "lr_schedule": lr_schedule,
                "frozen_blocks": frozen_blocks,
                "transition": transition,
            }
            defaults = inspect.signature(MCP.__init__).parameters
            clash = [
                name
                for name, value in given.items()
                if value not in (defaults[name].default, CONVERGING_SCHEDULE[name])
            ]
            if clash:
                raise InputError(
                    f"schedule='converging' sets {', '.join(CONVERGING_SCHEDULE)} "
                    f"itself; {', '.join(clash)} given: leave them out, or use "
                    "schedule='manual'."
                )
            admm_interval_unit = str(CONVERGING_SCHEDULE["admm_interval_unit"])
            lr_schedule = str(CONVERGING_SCHEDULE["lr_schedule"])
            frozen_blocks = int(CONVERGING_SCHEDULE["frozen_blocks"])  # type: ignore[call-overload]
            transition = str(CONVERGING_SCHEDULE["transition"])
            if rho_response is None:
                rho_response = CONVERGING_RESPONSE
        if rho_response is not None:
            if not self.hparams["sgd_momentum"] < 1:
                raise InputError("rho_response needs sgd_momentum < 1.")
        self.save_hyperparameters(ignore=["target_params"])
        self.dense_load_report: list[str] = []
        self.adopted_settings = {}
        if dense_checkpoint is not None:
            self.dense_load_report = self.load_dense_checkpoint(dense_checkpoint)

        example_inputs = torch.randn(1, 3, input_size, input_size)
        self.groups = find_channel_groups(
            self.backbone, example_inputs, keep_output_dim=keep_output_dim
        )
        if target_params is not None:
            pruning_ratio = solve_pruning_ratio(
                self.backbone,
                self.groups,
                target_params,
                "params",
                input_size,
                example_inputs,
                round_to=round_to,
            )
            self.hparams["pruning_ratio"] = pruning_ratio
        self.admm = ADMMRegularizer(
            self.backbone,
            self.groups,
            pruning_ratio,
            rho=rho,
            rho_growth=rho_growth,
            round_to=round_to,
            fixed_mask=mask_updates == "fixed",
        )
        # The subnet references the regularizer's mask: one mask, saved once.
        self.subnet = MomentumSubnet(
            self.backbone_momentum,
            self.groups,
            self.admm.group_masks,
            compact_keys=compact_keys,
        )
        self.transition = SmoothTransition(frq, dr)
        # Every mask keeps exactly n_g channels per group (aligned to round_to), so
        # the compact size is fixed by the ratio: count it once.
        self.kept_parameter_fraction = count_parameters(
            compact(
                self.backbone_momentum,
                self.groups,
                self.admm.group_masks,
                example_inputs,
            )
        ) / count_parameters(self.backbone_momentum)
        self._use_subnet = False
        self._last_changed = 0
        self._schedule: BlockSchedule | None = None
        self._lr_at: Callable[[int], float] | None = None
        # Block bookkeeping (checkpointed in "mcp_schedule").
        self._block_start_residual = self.admm.residual(self.backbone)
        self._last_seen_step = -1
        self._mask_stable = False
        self._warned = False
        #: Whether the end-of-training work is done (:meth:`finish_training`).
        self.training_finished = False
        #: One record per ADMM update (step, response, churn, distances, ρ).
        self.block_history: list[dict[str, float]] = []

    # --- the dense starting point --------------------------------------------------
    def load_dense_checkpoint(self, path: str | Path) -> list[str]:
        """Loads a dense MoCo checkpoint (see ``lightly_mcp.methods.checkpoints``).

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
        """A physically pruned copy of the momentum subnet.

        It equals the masked subnet in train and eval mode (lightly's
        ``SplitBatchNorm`` layers stay split); for deployment, merge them with
        ``lightly_mcp.pruning.batchnorm.merge_split_batchnorm`` as export does.
        """
        size = self.hparams["input_size"]
        return compact(
            self.subnet.materialize(),
            self.groups,
            self.subnet.group_masks,
            torch.randn(1, 3, size, size, device=self.device),
        )

    def _keys_from_subnet(self, step: int) -> bool:
        """Whether step ``step``'s keys come from the momentum subnet."""
        paper = (
            self.transition.step() if self.hparams["transition"] == "paper" else None
        )
        schedule = self._schedule
        if schedule is not None and schedule.is_frozen(step):
            return True
        if paper is not None:
            return paper
        final = schedule is not None and schedule.mask_is_final(step)
        return self._mask_stable or final

    # --- the block schedule ----------------------------------------------------------
    def block_schedule(self) -> BlockSchedule:
        """The ADMM blocks of this run, in optimizer steps (needs the Trainer)."""
        if self._schedule is None:
            trainer = self.trainer
            total = int(trainer.estimated_stepping_batches)
            block = self.hparams["admm_interval"]
            if self.hparams.get("schedule") == "converging":
                _, block = converging_blocks(max(1, total), self.hparams["momentum"])
                self.hparams["admm_interval"] = block
            elif self.hparams["admm_interval_unit"] == "epochs":
                batches = trainer.num_training_batches
                if not math.isfinite(batches):
                    raise InputError(
                        "admm_interval_unit='epochs' needs a training DataLoader with "
                        "a length; use admm_interval_unit='steps'."
                    )
                block *= max(1, math.ceil(batches / trainer.accumulate_grad_batches))
            self._schedule = BlockSchedule(
                block_steps=block,
                total_steps=max(1, total),
                frozen_blocks=self.hparams["frozen_blocks"],
                lr_schedule=self.hparams["lr_schedule"],
            )
        return self._schedule

    def configure_optimizers(self) -> Any:
        """MoCo v2's optimizer; the block schedule is derived afresh for this fit."""
        self._schedule = None
        return super().configure_optimizers()

    def lr_scheduler(self, optimizer: Any, max_steps: int) -> LambdaLR:
        """MoCo v2's cosine, or the block schedule's restarting learning rate."""
        if self.hparams["lr_schedule"] == "cosine":
            scheduler = super().lr_scheduler(optimizer, max_steps)
        else:
            scheduler = LambdaLR(optimizer, self.block_schedule().lr_factor)
        base = float(optimizer.param_groups[0]["initial_lr"])
        factor = scheduler.lr_lambdas[0]
        self._lr_at = lambda step: base * float(factor(step))
        return scheduler

    def block_rho(self, block: int) -> float:
        """The ρ of ``block``: derived from ``rho_response``, else the current ρ."""
        response = self.hparams["rho_response"]
        if response is None or self._lr_at is None:
            return self.admm.rho
        return self.block_schedule().derived_rho(
            block, response, self._lr_at, self.hparams["sgd_momentum"]
        )

    def predicted_response(self, block: int) -> float | None:
        """``ρ · Σ_block lr / (1 − β)`` of ``block`` with the current ρ."""
        if self._lr_at is None or self._schedule is None:
            return None
        return self._schedule.predicted_response(
            block, self.admm.rho, self._lr_at, self.hparams["sgd_momentum"]
        )

    # --- training --------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One MCP step (Algorithm 1)."""
        step = self.global_step
        frozen = self._schedule is not None and self._schedule.is_frozen(step)
        self.update_momentum_encoder()
        self._use_subnet = self._keys_from_subnet(step)
        views = batch[0]
        info_nce = self.contrastive_loss(views)
        if frozen and self.hparams["frozen_mask"] == "hard":
            admm_loss = info_nce.new_zeros(())  # θ_q is exactly sparse already
        elif frozen:
            admm_loss = self.admm.support_penalty(self.backbone)
        else:
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
        """Re-derives the subnet's multipliers from the ADMM state and sets the
        block's ρ.

        Under DDP, rank 0's buffers (Z, U, masks) are broadcast to every rank when
        the model is wrapped; the subnet's weight multipliers are derived state and
        are recomputed here so that every rank uses the same momentum subnet.
        """
        super().on_train_start()
        self.admm.refresh()
        self.subnet.refresh()
        schedule = self.block_schedule()
        if self.hparams["rho_response"] is not None:
            try:
                rho = self.block_rho(schedule.block_of(self.global_step))
            except InputError as error:
                if self.hparams.get("schedule") != "converging":
                    raise
                raise InputError(self._too_short(schedule)) from error
            self.admm.set_rho(rho)

    def _too_short(self, schedule: BlockSchedule) -> str:
        """``schedule='converging'``'s message for a run too short for its blocks:
        the shortest run that works (found by doubling the run, then bisecting).
        """

        def fits(total: int) -> bool:
            blocks = converging_blocks(total, self.hparams["momentum"])[1]
            trial = BlockSchedule(
                blocks, total, schedule.frozen_blocks, schedule.lr_schedule
            )
            peak = self.hparams["lr"] * self.batch_size_per_device / 256
            try:
                for block in range(trial.num_blocks):
                    trial.derived_rho(
                        block,
                        self.hparams["rho_response"],
                        lambda t: peak * trial.lr_factor(t),
                        self.hparams["sgd_momentum"],
                    )
            except InputError:
                return False
            return True

        low, high = schedule.total_steps, schedule.total_steps * 2
        while not fits(high) and high < 1 << 24:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(middle) else (middle, high)
        return (
            f"schedule='converging' needs a run of at least {high} optimizer steps "
            f"for its ADMM blocks to settle the mask (θ-response "
            f"{self.hparams['rho_response']:g}); this run has "
            f"{schedule.total_steps}: raise the Trainer's max_steps (or epochs), or "
            "lower rho_response."
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """ADMM update at the end of every block (once per optimizer step)."""
        done = self.global_step
        if done == self._last_seen_step:  # gradient accumulation: no step was taken
            return
        self._last_seen_step = done
        schedule = self.block_schedule()
        if schedule.is_update(done):
            self.admm_update()
        if self.hparams["frozen_mask"] == "hard" and schedule.is_frozen(done):
            self.admm.zero_dropped(self.backbone)  # the next step is a frozen one

    def on_train_epoch_end(self) -> None:
        """Finishes training (:meth:`finish_training`) at the end of its last epoch.

        Lightning calls this before its checkpoint callbacks, so the ``last.ckpt`` of
        a run that has taken all its steps holds the finished model: a run killed
        after writing it and resumed (Lightning then trains no further and calls no
        ``on_train_end``) ends with the same model as the uninterrupted one.
        """
        if self._took_all_steps():
            self.finish_training(self.trainer.train_dataloader)

    def on_train_end(self) -> None:
        """Writes the compact copy's statistics back, and finishes training if the
        epoch end did not.
        """
        self.subnet.sync_statistics()
        if self._took_all_steps():
            self.finish_training(self.trainer.train_dataloader)

    def _took_all_steps(self) -> bool:
        return self.global_step >= self.block_schedule().total_steps

    def finish_training(self, loader: Any) -> None:
        """The end-of-training work, done once per run: re-estimates the momentum
        subnet's BatchNorm statistics on ``loader``'s images (see
        ``recalibration_batches``) so that what is saved describes the subnet.

        A run stopped early (to be resumed) keeps the statistics it trained with, so
        that resuming equals an uninterrupted run. Whether the work is done is kept in
        the checkpoint (``mcp_schedule``); calling this again does nothing.

        Args:
            loader: The training DataLoader (anything else: no recalibration).
        """
        if self.training_finished:
            return
        self.subnet.sync_statistics()
        batches = self.hparams["recalibration_batches"]
        if batches > 0 and isinstance(loader, DataLoader):
            self.recalibrate_subnet(loader, batches)
        self.training_finished = True

    @torch.no_grad()
    def recalibrate_subnet(self, loader: DataLoader, num_batches: int) -> int:
        """Recalibrates the subnet's BatchNorm statistics on a loader's first images.

        The first ``num_batches`` full batches of ``loader.dataset`` in order (the key
        views of ``(views, label, ...)`` items, or plain image tensors), without
        touching the loader's own position. Under DDP the statistics are averaged
        over the ranks, so every rank keeps the same subnet.
        """
        ordered = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size or 1,
            shuffle=False,
            num_workers=0,
            drop_last=True,  # full batches only (SplitBatchNorm needs them)
            collate_fn=loader.collate_fn,  # batched views are made there
        )
        seen = self.subnet.recalibrate(self._key_images(ordered), num_batches)
        if self._trainer is not None and self.trainer.world_size > 1:
            for buffer in self.subnet.buffers_dict().values():
                if buffer.is_floating_point():
                    buffer.copy_(self.trainer.strategy.reduce(buffer, reduce_op="mean"))
        return seen

    def _key_images(self, loader: DataLoader) -> Iterator[Tensor]:
        for batch in loader:
            images = batch
            if isinstance(images, (list, tuple)):
                images = images[0]
            if isinstance(images, (list, tuple)):  # two views: the key view
                images = images[-1]
            yield images.to(self.device)

    def admm_update(self) -> int:
        """End of a block: ``Z ← Π(θ_q + U)``, ``U ← U + θ_q − Z``, new mask.

        Also: the block's measured θ-response (how far θ_q moved towards ``Z − U``),
        the next block's ρ when it is derived, and the warning when the response is
        too small for the mask to hold.

        Returns:
            Number of channels that entered or left the mask.
        """
        residual = self.admm.residual(self.backbone)
        start = self._block_start_residual
        alpha = 1.0 - residual / start if start > 0 else 1.0
        block = (
            None
            if self._schedule is None
            else self._schedule.block_of(max(0, self.global_step - 1))
        )
        predicted = None if block is None else self.predicted_response(block)
        self._last_changed = self.admm.update(self.backbone)
        self.subnet.follow_masks()
        # A mask that held over a block long enough to move θ_q (a first update
        # after a block of no response changes nothing either).
        if self._last_changed == 0 and alpha >= MASK_HOLD_ALPHA:
            self._mask_stable = True
        if block is not None and self.hparams["rho_response"] is not None:
            self.admm.set_rho(self.block_rho(block + 1))
        self._block_start_residual = self.admm.residual(self.backbone)
        churn = self.mask_churn_fraction(self._last_changed)
        self._check_response(alpha, predicted)
        record = {
            "step": float(self.global_step),
            "channels_changed": float(self._last_changed),
            "mask_churn": churn,
            "theta_response": alpha,
            "admm_distance": self.admm.distance(self.backbone),
            "admm_relative_distance": self.admm.relative_distance(self.backbone),
            "rho": self.admm.rho,
        }
        if predicted is not None:
            record["predicted_response"] = predicted
        self.block_history.append(record)
        if self._trainer is not None:
            for name, value in record.items():
                if name != "step":
                    self.log(name, value, sync_dist=True)
            # Straight to the loggers too: Lightning writes step metrics only every
            # log_every_n_steps, which need not divide the block length.
            if self.trainer.is_global_zero:
                for logger in self.loggers:
                    logger.log_metrics(
                        {f"block/{k}": v for k, v in record.items() if k != "step"},
                        step=self.global_step,
                    )
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

    def _check_response(self, alpha: float, predicted: float | None) -> None:
        """Warns once when a block moved θ_q too little for the mask to hold.

        Inside a group the last kept and the first dropped channel have nearly the
        same norm, so after an update the mask holds only if θ_q moved a fraction
        α > 1 − 1/√2 ≈ 0.29 of the way to ``Z − U``; below that U carries the
        dropped channels back and the mask cycles (DESIGN.md §8).
        """
        if alpha >= MASK_HOLD_ALPHA or self._warned:
            return
        self._warned = True
        needed = -math.log(1.0 - MASK_HOLD_ALPHA)
        expected = (
            ""
            if predicted is None
            else (
                f" (predicted response rho*sum(lr)/(1-momentum) = {predicted:.3g}, "
                f"alpha {alpha_of_response(predicted):.0%})"
            )
        )
        rank_zero_warn(
            f"MCP: in the last ADMM block the query encoder moved only {alpha:.0%} of "
            f"the way to Z - U{expected}; the mask holds only above "
            f"{MASK_HOLD_ALPHA:.0%} (response {needed:.2f}), below that it cycles "
            f"through the channels. Set mcp.rho_response: 1.0 to derive rho from the "
            f"schedule, or raise mcp.rho (now {self.admm.rho:g}) or mcp.admm_interval.",
            category=MCPWarning,
        )

    # --- checkpoint state outside state_dict() ----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the transition and the block bookkeeping (the queue: MoCoV2)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["mcp_transition"] = self.transition.state_dict()
        checkpoint["mcp_schedule"] = {
            "block_start_residual": self._block_start_residual,
            "last_seen_step": self._last_seen_step,
            "mask_stable": self._mask_stable,
            "warned": self._warned,
            "finished": self.training_finished,
            "history": list(self.block_history),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the queue, the transition and the block bookkeeping."""
        super().on_load_checkpoint(checkpoint)
        if "mcp_transition" in checkpoint:
            self.transition.load_state_dict(checkpoint["mcp_transition"])
        saved = checkpoint.get("mcp_schedule")
        if saved is not None:
            self._block_start_residual = float(saved["block_start_residual"])
            self._last_seen_step = int(saved["last_seen_step"])
            self._mask_stable = bool(saved["mask_stable"])
            self._warned = bool(saved["warned"])
            self.training_finished = bool(saved.get("finished", False))
            self.block_history = [dict(r) for r in saved.get("history", [])]


# Module-level transform for small images (the CPU protocols); use
# ``build_transform(input_size=...)`` for other sizes.
transform = build_transform(input_size=32)
