"""The momentum subnet: the momentum encoder seen through the ADMM channel mask.

Reference:
    Momentum Contrastive Pruning, Section 3.4 and Fig. 1: ``φ ⊙ θ_k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightly_mcp.groups import ChannelGroup, member_mask


class MomentumSubnet(nn.Module):
    """Forward of the momentum encoder with the dropped channels treated as zero.

    The encoder's weights are never overwritten: every output-side parameter of every
    group (conv/linear rows and biases, depthwise filters, norm weight *and* bias) is
    multiplied by the group's 0/1 channel mask inside a ``torch.func.functional_call``.
    A channel that re-enters the mask later therefore finds its real momentum weights.
    The forward equals that of a physically pruned copy (see
    ``lightly_mcp.compaction.compact``) in train and eval mode.

    The per-parameter multipliers are computed only when the mask changes
    (:meth:`set_masks`), never in the forward pass. The masks are buffers.

    The encoder is referenced, not owned: it does not appear in this module's
    ``state_dict()`` or ``parameters()``.

    Attributes:
        groups: The channel groups shared with the ADMM regularizer.

    Examples:
        >>> subnet = MomentumSubnet(backbone_momentum, groups, admm.masks)
        >>> keys = subnet(x_key)            # keys from φ ⊙ θ_k
        >>> subnet.set_masks(admm.masks)    # after every ADMM update
    """

    def __init__(
        self,
        encoder: nn.Module,
        groups: Sequence[ChannelGroup],
        masks: Sequence[Tensor] | None = None,
    ) -> None:
        """Args:
        encoder: The momentum (key) encoder.
        groups: Its channel groups.
        masks: Per group, a boolean mask of kept channels; all True if None.
        """
        super().__init__()
        # Bypass nn.Module registration: the encoder belongs to the caller.
        object.__setattr__(self, "_encoder", encoder)
        self.groups = list(groups)
        for g, group in enumerate(self.groups):
            self.register_buffer(
                f"mask_{g}", torch.ones(group.num_channels, dtype=torch.bool)
            )
        self._multipliers: dict[str, Tensor] = {}
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.set_masks(masks if masks is not None else self.masks)

    @property
    def encoder(self) -> nn.Module:
        """The (unmasked) momentum encoder."""
        encoder = self.__dict__["_encoder"]
        assert isinstance(encoder, nn.Module)
        return encoder

    def train(self, mode: bool = True) -> MomentumSubnet:
        """Sets train/eval mode of the subnet and of the encoder it runs."""
        super().train(mode)
        self.encoder.train(mode)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> MomentumSubnet:
        """Moves/casts the encoder too (``.to(device)``, ``.double()``, ...)."""
        super()._apply(fn, recurse)
        self.encoder._apply(fn, recurse)
        self._refresh_multipliers()
        return self

    @property
    def masks(self) -> list[Tensor]:
        """Per group, the boolean mask of kept channels."""
        return [getattr(self, f"mask_{g}") for g in range(len(self.groups))]

    @torch.no_grad()
    def set_masks(self, masks: Sequence[Tensor]) -> None:
        """Sets the channel masks and recomputes the weight multipliers."""
        if len(masks) != len(self.groups):
            raise ValueError(
                f"Got {len(masks)} masks for {len(self.groups)} channel groups."
            )
        for g, (group, mask) in enumerate(zip(self.groups, masks)):
            if mask.shape != (group.num_channels,):
                raise ValueError(
                    f"Mask {g} has shape {tuple(mask.shape)}, expected "
                    f"({group.num_channels},) for group '{group.root}'."
                )
            buffer = getattr(self, f"mask_{g}")
            buffer.copy_(mask.to(device=buffer.device, dtype=torch.bool))
        self._refresh_multipliers()

    def _refresh_multipliers(self) -> None:
        params = dict(self.encoder.named_parameters())
        self._multipliers = {}
        for group, mask in zip(self.groups, self.masks):
            for member in group.members:
                param = params[member.param_name]
                self._multipliers[member.param_name] = member_mask(
                    member, mask.to(param.device), param.shape
                ).to(param.dtype)

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
        """Forward of ``φ ⊙ θ_k``; BatchNorm buffers are the encoder's own."""
        out: Tensor = functional_call(self.encoder, self.masked_parameters(), (x,))
        return out


def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, MomentumSubnet)
    module._refresh_multipliers()
