"""The momentum subnet: the momentum encoder seen through the ADMM channel mask.

Reference:
    Momentum Contrastive Pruning, Section 3.4 and Fig. 1: ``φ ⊙ θ_k``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightly.models.batchnorm import SplitBatchNorm
from torch import Tensor, nn
from torch.func import functional_call

from lightly_mcp.errors import (
    CompactKeysError,
    InputError,
    MCPWarning,
    describe_error,
)
from lightly_mcp.pruning.compact_keys import CompactKeys
from lightly_mcp.pruning.groups import ChannelGroup, member_mask
from lightly_mcp.pruning.masks import MASKS_ATTRIBUTE, GroupMasks, Masks, register_masks

_RUNNING_STATS = ("running_mean", "running_var")


class MomentumSubnet(nn.Module):
    """Forward of the momentum encoder with the dropped channels treated as zero.

    The encoder's weights are never overwritten: every output-side parameter of every
    group (conv/linear rows and biases, depthwise filters, norm weight *and* bias) is
    multiplied by the group's 0/1 channel mask inside a ``torch.func.functional_call``.
    A channel that re-enters the mask later therefore finds its real momentum weights.
    The forward equals that of a physically pruned copy (:meth:`materialize`, then
    ``lightly_mcp.pruning.compaction.compact``) in train and eval mode.

    **Normalisation statistics.** The subnet keeps its own copy of the encoder's
    buffers (BatchNorm running mean and variance, ...), initialised from the encoder
    and updated only by the subnet's own train-mode forwards. The full momentum
    encoder's statistics therefore describe the full network and the subnet's describe
    the subnet: neither is polluted by the other's activations. The statistics of a
    dropped channel are frozen while it is dropped (its input is zero, which would
    drive its running variance to 0 and make it explode in eval mode if it re-enters
    the mask).

    The per-parameter multipliers are computed only when the mask changes
    (:meth:`set_masks`, :meth:`follow_masks`), never in the forward pass. Statistics
    are buffers.

    **Compact keys** (``compact_keys=True``). The same forward is then computed by a
    physically pruned copy (``lightly_mcp.pruning.compact_keys.CompactKeys``), built by
    torch-pruning's surgery at the first forward after every mask change, its
    weights gathered from the encoder's current weights at every forward. Its first
    forward is checked against the masked one; if the copy cannot be built or does
    not agree, a warning says why and the masked forward is used from then on. The
    copy keeps the BatchNorm statistics of the kept channels while it trains and
    writes them back into the subnet's statistics whenever they are read
    (:meth:`buffers_dict`, ``state_dict()``, ``stat_{i}``, a mode switch, a mask
    change, :meth:`sync_statistics`): what is read is what the masked forward would
    have left there. The masked forward stays the reference; it is used whenever
    gradients flow into the encoder's weights, and by :meth:`recalibrate`.

    The encoder is referenced, not owned: it does not appear in this module's
    ``state_dict()`` or ``parameters()``. So are masks given as a
    :class:`~lightly_mcp.pruning.masks.GroupMasks` (the ADMM regularizer's, which owns
    and saves them); masks given as tensors are copied into masks of the subnet's own,
    saved in its ``state_dict()``.

    Attributes:
        groups: The channel groups shared with the ADMM regularizer.
        group_masks: The masks the subnet applies (its own or referenced).
        compact_keys: Whether keys come from the compact copy where it applies.
        compact_failure: Why the compact copy is not used (None while it is, or
            while ``compact_keys`` is off).

    Examples:
        >>> subnet = MomentumSubnet(backbone_momentum, groups, admm.group_masks)
        >>> keys = subnet(x_key)            # keys from φ ⊙ θ_k
        >>> admm.update(backbone)           # changes the shared mask
        >>> subnet.follow_masks()           # after every ADMM update
    """

    group_masks: GroupMasks

    def __init__(
        self,
        encoder: nn.Module,
        groups: Sequence[ChannelGroup],
        masks: Masks | None = None,
        compact_keys: bool = False,
    ) -> None:
        """Args:
        encoder: The momentum (key) encoder.
        groups: Its channel groups.
        masks: A ``GroupMasks`` to share (referenced, not saved here), or per
            group a boolean mask of kept channels (copied); all True if None.
        compact_keys: Compute the forward with a physically pruned copy where it
            applies (the masked forward otherwise).
        """
        super().__init__()
        self.compact_keys = bool(compact_keys)
        self.compact_failure: str | None = None
        self._compact: CompactKeys | None = None
        self._compact_ahead = False  # the copy's statistics are newer than stat_i
        self._compact_stale = True  # stat_i are newer than the copy's statistics
        self._compact_checked = False  # the copy's first forward was checked
        self._force_masked = False
        self._stat_versions: list[int] = []
        # Bypass nn.Module registration: the encoder belongs to the caller.
        object.__setattr__(self, "_encoder", encoder)
        self.groups = list(groups)
        if isinstance(masks, GroupMasks):
            # Bypass registration too: the owner saves and moves them.
            object.__setattr__(self, "group_masks", GroupMasks.of(self.groups, masks))
        else:
            register_masks(self, GroupMasks(self.groups, masks))
        self.buffer_names = [name for name, _ in encoder.named_buffers()]
        for i, (_, buffer) in enumerate(encoder.named_buffers()):
            self.register_buffer(f"stat_{i}", buffer.detach().clone())
        self._multipliers: dict[str, Tensor] = {}
        self._frozen: list[tuple[Tensor, Tensor]] = []
        # The masks the statistics were last brought up to date with (entering
        # channels are found against them).
        self._applied: list[Tensor] = []
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.register_state_dict_pre_hook(_sync_before_save)
        self.refresh()

    @property
    def encoder(self) -> nn.Module:
        """The (unmasked) momentum encoder."""
        encoder = self.__dict__["_encoder"]
        assert isinstance(encoder, nn.Module)
        return encoder

    def train(self, mode: bool = True) -> MomentumSubnet:
        """Sets train/eval mode of the subnet and of the encoder it runs.

        Like lightly's ``SplitBatchNorm``, switching to eval mode averages the
        per-split running statistics of split layers.
        """
        if self.training and not mode:
            self._collate_split_statistics()  # reads them: written back first
        super().train(mode)
        self.encoder.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> MomentumSubnet:
        """Moves/casts the encoder too (``.to(device)``, ``.double()``, ...)."""
        if "_compact" in self.__dict__:  # (not during __init__)
            self.sync_statistics()
            self._drop_compact()
        super()._apply(fn, recurse)
        self.encoder._apply(fn, recurse)
        self._refresh_derived()
        return self

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Loads the statistics (and the masks when they are the subnet's own).

        Checkpoints written before the mask had one home hold the referenced masks
        here too (``subnet.mask_{g}``, a copy of ``admm.mask_{g}``): they are dropped.
        """
        if self._modules.get(MASKS_ATTRIBUTE) is None:
            for g in range(len(self.groups)):
                state_dict.pop(f"{prefix}mask_{g}", None)
        self.sync_statistics()  # statistics not in state_dict keep their value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def masks(self) -> list[Tensor]:
        """Per group, the boolean mask of kept channels."""
        return self.group_masks.tensors()

    def buffers_dict(self) -> dict[str, Tensor]:
        """The subnet's own buffers under the encoder's buffer names.

        Statistics held by the compact copy are written back first, and the copy
        reloads them before its next forward (the caller may change them).
        """
        self.sync_statistics()
        self._compact_stale = True
        statistics = self._statistics()
        return dict(zip(self.buffer_names, statistics))

    def _statistics(self) -> list[Tensor]:
        """The ``stat_{i}`` buffers as they are (no write-back)."""
        return [self._buffers[f"stat_{i}"] for i in range(len(self.buffer_names))]  # type: ignore[misc]

    def __getattr__(self, name: str) -> Any:
        """``stat_{i}`` as :meth:`buffers_dict` gives it (written back first)."""
        if name.startswith("stat_") and "_compact" in self.__dict__:
            self.sync_statistics()
            self.__dict__["_compact_stale"] = True
        return super().__getattr__(name)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.named_buffers`` with the statistics written back first."""
        if "_compact" in self.__dict__:
            self.sync_statistics()
            self._compact_stale = True
        return super().named_buffers(*args, **kwargs)

    # --- the compact copy ------------------------------------------------------------
    @torch.no_grad()
    def sync_statistics(self) -> None:
        """Writes the compact copy's statistics back into ``stat_{i}`` when they are
        newer (a no-op otherwise).
        """
        compact_copy = self.__dict__.get("_compact")
        if self.__dict__.get("_compact_ahead") and compact_copy is not None:
            statistics = self._statistics()
            compact_copy.store_statistics(statistics)
            self._stat_versions = [s._version for s in statistics]
        self._compact_ahead = False

    def _drop_compact(self) -> None:
        """Forgets the compact copy (rebuilt at the next forward); its statistics
        must have been written back or be obsolete.
        """
        self._compact = None
        self._compact_ahead = False
        self._compact_stale = True
        self._compact_checked = False

    def _disable_compact(self, reason: str) -> None:
        """Falls back to the masked forward for good, saying why once."""
        self._drop_compact()
        self.compact_failure = reason
        warnings.warn(
            f"MCP: keys come from the masked momentum subnet (as fast as the full "
            f"encoder) because its compact copy {reason}.",
            MCPWarning,
            stacklevel=3,
        )

    def uses_compact_keys(self) -> bool:
        """Whether the forward runs on the compact copy (when gradients do not flow
        into the encoder's weights).
        """
        return self.compact_keys and self.compact_failure is None

    @torch.no_grad()
    def set_masks(self, masks: Masks) -> None:
        """Sets the channel masks (shared ones too) and follows them
        (:meth:`follow_masks`).

        Raises:
            ValueError: If there is not one mask of shape ``[C_g]`` per group.
        """
        self.group_masks.assign(masks)
        self.follow_masks()

    @torch.no_grad()
    def follow_masks(self) -> None:
        """Takes over a change of the masks: recomputes the weight multipliers.

        A channel that re-entered the mask since the last call gets statistics of its
        own: those of the full momentum encoder for that channel (the subnet's were
        frozen while it was dropped and describe an older network).
        :meth:`recalibrate` replaces them by the subnet's own estimate.
        """
        self.sync_statistics()  # written back with the copy's own (old) indices
        compact_copy = self._compact
        if compact_copy is not None and not compact_copy.kept_masks_equal(self.masks):
            self._drop_compact()
        entering = [
            mask & ~applied.to(mask.device)
            for mask, applied in zip(self.group_masks, self._applied)
        ]
        self._applied = [mask.clone() for mask in self.group_masks]
        self._refresh_derived()
        own = self.buffers_dict()
        encoder = dict(self.encoder.named_buffers())
        for name, index in self._norm_statistics(entering):
            own[name][index] = encoder[name][index].to(own[name].dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-derives the multipliers from the masks and statistics as they are,
        after they were overwritten (``load_state_dict``, a DDP broadcast): no
        statistics are copied. The compact copy is rebuilt; the statistics it held
        are written back unless ``stat_{i}`` were overwritten since it last read them.
        """
        if "_compact" in self.__dict__:
            if self._compact_ahead and self._stat_versions != [
                s._version for s in self._statistics()
            ]:
                self._compact_ahead = False  # overwritten: the new values win
            self.sync_statistics()
            self._drop_compact()
        self.group_masks.invalidate()
        self._applied = [mask.clone() for mask in self.group_masks]
        self._refresh_derived()

    def _norm_statistics(self, channels: Sequence[Tensor]) -> list[tuple[str, Tensor]]:
        """``(buffer name, positions)`` of the running statistics of some channels.

        Args:
            channels: Per group, a boolean mask of the channels of interest.
        """
        params = dict(self.encoder.named_parameters())
        modules = dict(self.encoder.named_modules())
        buffers = self.buffers_dict()
        found = []
        for group, chosen in zip(self.groups, channels):
            if not bool(chosen.any()):
                continue
            for member in group.members:
                module_name, _, param_kind = member.param_name.rpartition(".")
                if param_kind != "weight" or not isinstance(
                    modules[module_name], nn.modules.batchnorm._NormBase
                ):
                    continue
                param = params[member.param_name]
                others = ~chosen.to(param.device)
                positions = member_mask(member, others, param.shape).flatten() == 0
                for stat in _RUNNING_STATS:
                    name = f"{module_name}.{stat}"
                    buffer = buffers.get(name)
                    if buffer is None:
                        continue
                    repeat = buffer.numel() // positions.numel()  # SplitBatchNorm
                    index = torch.nonzero(positions.repeat(repeat)).flatten()
                    found.append((name, index.to(buffer.device)))
        return found

    def _refresh_derived(self) -> None:
        """Recomputes the weight multipliers and the frozen-statistics indices."""
        self._multipliers = self.group_masks.multipliers(
            dict(self.encoder.named_parameters())
        )
        buffers = self.buffers_dict()
        self._frozen = [
            (buffers[name], index)
            for name, index in self._norm_statistics([~m for m in self.masks])
        ]

    @torch.no_grad()
    def recalibrate(self, batches: Iterable[Tensor], num_batches: int) -> int:
        """Re-estimates the subnet's BatchNorm statistics with its own forwards.

        No labels are used: the subnet runs ``num_batches`` batches of images in
        train mode and every kept channel's running mean and variance become the
        average over those batches of the per-batch mean and unbiased variance (what
        ``torch.optim.swa_utils.update_bn`` computes for a module). Statistics of
        dropped channels stay as they are (their input is zero), the full momentum
        encoder's statistics are not touched, and the train/eval mode is restored.

        Args:
            batches: Image tensors ``(N, 3, H, W)``.
            num_batches: How many batches to use (>= 1).

        Returns:
            The number of batches used.
        """
        if num_batches < 1:
            raise InputError(f"num_batches must be >= 1, got {num_batches}.")
        norms = [
            m
            for m in self.encoder.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        momenta = [m.momentum for m in norms]
        was_training = self.training
        self.train()
        seen = 0
        self._force_masked = True  # the masked forward reads the norms' momentum
        try:
            for x in batches:
                if seen >= num_batches:
                    break
                for norm in norms:
                    norm.momentum = 1.0 / (seen + 1)  # a running average
                self(x)
                seen += 1
        finally:
            self._force_masked = False
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
            self.train(was_training)
        if seen == 0:
            raise InputError("No batch to recalibrate the momentum subnet with.")
        return seen

    @torch.no_grad()
    def _collate_split_statistics(self) -> None:
        buffers = self.buffers_dict()
        for name, module in self.encoder.named_modules():
            if not isinstance(module, SplitBatchNorm):
                continue
            for stat in _RUNNING_STATS:
                buffer = buffers[f"{name}.{stat}"]
                c = module.num_features
                buffer.copy_(buffer.view(-1, c).mean(0).repeat(buffer.numel() // c))

    def masked_parameters(self) -> dict[str, Tensor]:
        """The encoder's parameters with the dropped channels set to zero."""
        params: dict[str, Tensor] = {}
        for name, param in self.encoder.named_parameters():
            multiplier = self._multipliers.get(name)
            if multiplier is None:
                params[name] = param
            else:
                if multiplier.device != param.device or multiplier.dtype != param.dtype:
                    multiplier = multiplier.to(device=param.device, dtype=param.dtype)
                    self._multipliers[name] = multiplier
                params[name] = param * multiplier
        return params

    def forward(self, x: Tensor) -> Tensor:
        """Forward of ``φ ⊙ θ_k`` with the subnet's own normalisation statistics:
        on the compact copy where it applies, else masked.
        """
        if self.uses_compact_keys() and not self._force_masked:
            out = self._compact_forward(x)
            if out is not None:
                return out
        return self.masked_forward(x)

    def masked_forward(self, x: Tensor) -> Tensor:
        """The reference forward: the full encoder with the dropped channels' output
        side multiplied by zero, the dropped channels' statistics frozen.
        """
        tensors = {**self.masked_parameters(), **self.buffers_dict()}
        if not self.training:
            out: Tensor = functional_call(self.encoder, tensors, (x,))
            return out
        with torch.no_grad():
            saved = [buffer[index] for buffer, index in self._frozen]
        out = functional_call(self.encoder, tensors, (x,))
        with torch.no_grad():
            for (buffer, index), values in zip(self._frozen, saved):
                buffer[index] = values
        return out

    def _compact_forward(self, x: Tensor) -> Tensor | None:
        """The forward on the compact copy, built (and checked) when needed; None
        where the masked forward must run instead.
        """
        params = dict(self.encoder.named_parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params.values()):
            return None  # gradients into θ_k: the masked forward is differentiable
        compact_copy = self._compact
        if compact_copy is None:
            try:
                compact_copy = CompactKeys(
                    self.encoder, self.groups, self.group_masks, self.buffer_names, x
                )
            except CompactKeysError as error:
                self._disable_compact(f"could not be built: {error}")
                return None
            except Exception as error:  # anything else: never train on a wrong copy
                self._disable_compact(f"could not be built: {describe_error(error)}")
                return None
            self._compact = compact_copy
            self._compact_stale = True
            self._compact_checked = False
        statistics = self._statistics()
        with torch.no_grad():
            if self._compact_stale:
                compact_copy.load_statistics(statistics)
                self._stat_versions = [s._version for s in statistics]
                self._compact_stale = False
            compact_copy.load_weights(params)
            training = self.encoder.training
            compact_copy.set_training(training)
            if not self._compact_checked:
                return self._checked_compact_forward(compact_copy, x, training)
            out = compact_copy(x)
        self._compact_ahead = self._compact_ahead or training
        return out

    def _checked_compact_forward(
        self, compact_copy: CompactKeys, x: Tensor, training: bool
    ) -> Tensor | None:
        """The first forward of a new compact copy, after checking it against the
        masked forward (``CompactKeys.check``); None, and the masked forward from
        then on, if they differ.
        """
        try:
            problem = compact_copy.check(
                self.encoder,
                self._multipliers,
                self.buffer_names,
                self._statistics(),
                x,
            )
        except Exception as error:
            problem = f"its check failed: {describe_error(error)}"
        if problem is not None:
            self._disable_compact(f"does not reproduce the masked forward ({problem})")
            return None
        self._compact_checked = True
        out = compact_copy(x)
        self._compact_ahead = self._compact_ahead or training
        return out

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """A dense copy of the encoder with the subnet's masked weights and statistics.

        Its forward equals the subnet's; ``lightly_mcp.pruning.compaction.compact``
        shrinks it.
        """
        dense = copy.deepcopy(self.encoder)
        for name, tensor in self.masked_parameters().items():
            dense.get_parameter(name).copy_(tensor)
        for name, tensor in self.buffers_dict().items():
            dense.get_buffer(name).copy_(tensor)
        dense.train(self.training)
        return dense


def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, MomentumSubnet)
    module.refresh()


def _sync_before_save(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    assert isinstance(module, MomentumSubnet)
    module.sync_statistics()
