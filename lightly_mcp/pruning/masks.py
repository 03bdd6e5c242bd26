"""Channel masks: per channel group, which channels a pruned network keeps.

:class:`GroupMasks` is the one home of a pruning mask: the channel groups and one
boolean buffer per group, checked once when they are set. It is owned by the ADMM
regularizer (whose support of ``Z`` it is) and referenced by the momentum subnet;
compaction and the baselines take it too. Its constructors give the masks used around
the code: the first ``n_g`` channels (:meth:`GroupMasks.leading`), ``n_g`` random
ones (:meth:`GroupMasks.random`), the ``n_g`` of largest norm (:meth:`GroupMasks.top_k`,
filter-magnitude pruning and the ADMM projection) and masks widened to a channel
multiple (:meth:`GroupMasks.rounded`).

Reference:
    Momentum Contrastive Pruning, Section 3.4: the mask ``φ`` of the momentum subnet
    ``φ ⊙ θ_k`` is the support of the ADMM variable ``Z``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from lightly_mcp.pruning.groups import (
    ChannelGroup,
    channel_scores,
    member_mask,
    validate_round_to,
)

#: The attribute under which a module holds the masks it owns (:func:`register_masks`).
MASKS_ATTRIBUTE = "group_masks"


def check_masks(groups: Sequence[ChannelGroup], masks: Masks) -> None:
    """Checks that there is one mask of shape ``[C_g]`` per group.

    Raises:
        ValueError: Naming the group whose mask has the wrong shape.
    """
    if len(groups) != len(masks):
        raise ValueError(f"Got {len(masks)} masks for {len(groups)} channel groups.")
    for group, mask in zip(groups, masks):
        if mask.shape != (group.num_channels,):
            raise ValueError(
                f"Mask for group '{group.root}' has shape {tuple(mask.shape)}, "
                f"expected ({group.num_channels},)."
            )


class GroupMasks(nn.Module):
    """Per channel group, the boolean mask of kept channels (True = kept).

    The masks are buffers (``mask_{g}``): they move with ``.to()`` and are saved in
    ``state_dict()``. A module that owns masks registers them with
    :func:`register_masks`; modules that only use them (the momentum subnet next to
    the ADMM regularizer) keep a plain reference. The object is a sequence of the mask
    tensors, so it goes wherever ``Sequence[Tensor]`` masks went.

    Attributes:
        groups: The channel groups, one mask each.

    Examples:
        >>> masks = GroupMasks.top_k(groups, 0.5, dict(backbone.named_parameters()))
        >>> masks.kept_channels()
        >>> small = compact(backbone, groups, masks)
    """

    def __init__(
        self, groups: Sequence[ChannelGroup], masks: Masks | None = None
    ) -> None:
        """Args:
        groups: The channel groups.
        masks: Per group, a boolean mask of kept channels (copied); all kept if
            None.

        Raises:
            ValueError: If there is not one mask of shape ``[C_g]`` per group.
        """
        super().__init__()
        self.groups = list(groups)
        if masks is None:
            masks = [torch.ones(g.num_channels, dtype=torch.bool) for g in self.groups]
        check_masks(self.groups, masks)
        for g, mask in enumerate(masks):
            self.register_buffer(f"mask_{g}", mask.detach().to(torch.bool).clone())
        self._version = 0
        self._multipliers: dict[str, Tensor] = {}
        self._multipliers_version = -1
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    # --- constructors -------------------------------------------------------------
    @classmethod
    def of(cls, groups: Sequence[ChannelGroup], masks: Masks) -> GroupMasks:
        """``masks`` as :class:`GroupMasks` of ``groups`` (itself when it is one).

        Raises:
            ValueError: If the masks do not fit the groups.
        """
        if isinstance(masks, GroupMasks):
            if masks.groups != list(groups):
                raise ValueError(
                    "The masks belong to other channel groups than the ones given."
                )
            return masks
        return cls(groups, masks)

    @classmethod
    def leading(
        cls, groups: Sequence[ChannelGroup], pruning_ratio: float, round_to: int = 1
    ) -> GroupMasks:
        """Masks keeping the first ``n_g`` channels (units) of every group.

        Parameter and MAC counts depend only on how many channels each group keeps,
        so these masks give the compact architecture of any mask at
        ``pruning_ratio`` and ``round_to`` (``ChannelGroup.num_kept``).
        """
        return cls(
            groups,
            [
                group.mask_of_units(
                    torch.arange(
                        group.num_kept(pruning_ratio, round_to) // group.unit_size
                    )
                )
                for group in groups
            ],
        )

    @classmethod
    def random(
        cls,
        groups: Sequence[ChannelGroup],
        pruning_ratio: float,
        seed: int = 0,
        round_to: int = 1,
    ) -> GroupMasks:
        """Masks keeping ``n_g`` channels (units) of every group chosen at random.

        One ``torch.Generator`` seeded with ``seed`` draws a permutation per group,
        in group order. ``n_g`` is ``ChannelGroup.num_kept(pruning_ratio, round_to)``.
        """
        generator = torch.Generator().manual_seed(seed)
        masks = []
        for group in groups:
            order = torch.randperm(group.num_units, generator=generator)
            kept = group.num_kept(pruning_ratio, round_to) // group.unit_size
            masks.append(group.mask_of_units(order[:kept]))
        return cls(groups, masks)

    @classmethod
    def top_k(
        cls,
        groups: Sequence[ChannelGroup],
        pruning_ratio: float,
        tensors: Mapping[str, Tensor],
        round_to: int = 1,
    ) -> GroupMasks:
        """Masks keeping the ``n_g`` channels of largest L2 norm in every group.

        Channels are ranked by :func:`lightly_mcp.pruning.groups.channel_scores` (all
        their output-side members), tied channels (``ChannelGroup.units``) as one unit
        by their summed score: filter-magnitude pruning, and the support of the ADMM
        projection. The masks are on the tensors' device.

        Args:
            groups: The channel groups.
            pruning_ratio: Fraction of channels removed in every group.
            tensors: Parameter-shaped tensors by name (e.g. ``named_parameters()``).
            round_to: Keep a multiple of this many channels per group
                (``ChannelGroup.num_kept``; 1: exactly ``n_g``).
        """
        return cls(
            groups,
            [
                group.top_mask(
                    channel_scores(tensors, group),
                    group.num_kept(pruning_ratio, round_to),
                )
                for group in groups
            ],
        )

    def rounded(self, encoder: nn.Module, round_to: int) -> GroupMasks:
        """These masks widened so that every group keeps a multiple of ``round_to``
        channels (on the CPU; see :func:`round_masks`). Masks chosen aligned
        (``round_to`` of the constructors, MCP's ``round_to``) need no widening.
        """
        return GroupMasks(
            self.groups, round_masks(encoder, self.groups, self, round_to)
        )

    # --- the masks ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> Tensor:
        if not -len(self) <= g < len(self):
            raise IndexError(f"group index {g} out of range for {len(self)} groups")
        mask: Tensor = getattr(self, f"mask_{g % len(self)}")
        return mask

    def __iter__(self) -> Iterator[Tensor]:
        return (self[g] for g in range(len(self)))

    def tensors(self) -> list[Tensor]:
        """The masks (the buffers themselves), one per group."""
        return list(self)

    def items(self) -> Iterator[tuple[ChannelGroup, Tensor]]:
        """``(group, mask)`` pairs, in group order."""
        return zip(self.groups, self)

    def kept_channels(self) -> list[int]:
        """Number of kept channels per group."""
        return [int(mask.sum()) for mask in self]

    @property
    def version(self) -> int:
        """A counter that changes whenever the masks change (derived state is keyed
        on it).
        """
        return self._version

    @torch.no_grad()
    def assign(self, masks: Masks) -> int:
        """Sets the masks, in place.

        Returns:
            The number of channels that entered or left the masks.

        Raises:
            ValueError: If there is not one mask of shape ``[C_g]`` per group.
        """
        check_masks(self.groups, masks)
        changed = 0
        for old, new in zip(self, masks):
            new = new.to(device=old.device, dtype=torch.bool)
            changed += int((old != new).sum())
            old.copy_(new)
        self.invalidate()
        return changed

    def invalidate(self) -> None:
        """Drops derived state after the buffers were overwritten from outside
        (``load_state_dict`` does this itself; a DDP broadcast does not).
        """
        self._version += 1

    def check_compactable(self) -> None:
        """Checks that compaction can remove the dropped channels.

        Raises:
            ValueError: If a mask keeps no channel, or part of a set of tied channels.
        """
        for group, mask in self.items():
            if not bool(mask.any()):
                raise ValueError(f"Mask for group '{group.root}' keeps no channel.")
            if group.splits_units(mask):
                raise ValueError(
                    f"Mask for group '{group.root}' keeps part of a set of tied "
                    "channels: a grouped convolution must keep the same channels in "
                    "each of its convolution groups (ChannelGroup.units)."
                )

    # --- derived ------------------------------------------------------------------
    def multipliers(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per member parameter, its 0/1 multiplier ``φ`` for all groups' masks.

        In each parameter's dtype and on its device. Computed once per change of the
        masks and shared by every user (the momentum subnet's forward, the ADMM
        regularizer's support penalty).

        Args:
            params: The member parameters by name (shapes, dtypes, devices are read).
        """
        if self._multipliers_version != self._version:
            self._multipliers = parameter_multipliers(params, self.groups, self)
            self._multipliers_version = self._version
        for name, multiplier in self._multipliers.items():
            param = params[name]
            if multiplier.device != param.device or multiplier.dtype != param.dtype:
                self._multipliers[name] = multiplier.to(
                    device=param.device, dtype=param.dtype
                )
        return dict(self._multipliers)

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        kept = sum(self.kept_channels())
        total = sum(g.num_channels for g in self.groups)
        return f"groups={len(self)}, kept={kept}/{total}"


Masks: TypeAlias = GroupMasks | Sequence[Tensor]
"""Masks as accepted by the functions here: a :class:`GroupMasks` or, per group, a
boolean mask tensor."""


def _invalidate_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, GroupMasks)
    module.invalidate()


# --- ownership --------------------------------------------------------------------
def register_masks(module: nn.Module, masks: GroupMasks) -> None:
    """Makes ``module`` the owner of ``masks``: ``module.group_masks``.

    The masks are a submodule (moved with ``module``, broadcast by DDP) whose buffers
    ``state_dict()`` lists as ``module``'s own ``mask_{g}`` keys, the layout of every
    checkpoint since the first; loading accepts that layout.
    """
    setattr(module, MASKS_ATTRIBUTE, masks)
    module._register_state_dict_hook(_masks_as_own_keys)
    module._register_load_state_dict_pre_hook(_masks_from_own_keys, with_module=True)


def _masks_as_own_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
) -> None:
    inner = f"{prefix}{MASKS_ATTRIBUTE}."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _masks_from_own_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    masks = getattr(module, MASKS_ATTRIBUTE)
    for g in range(len(masks)):
        key = f"{prefix}mask_{g}"
        if key in state_dict:
            state_dict[f"{prefix}{MASKS_ATTRIBUTE}.mask_{g}"] = state_dict.pop(key)


# --- functions of groups and masks ------------------------------------------------
def parameter_multipliers(
    tensors: Mapping[str, Tensor],
    groups: Sequence[ChannelGroup],
    masks: Masks,
) -> dict[str, Tensor]:
    """Per member parameter, its 0/1 multiplier for all groups' masks together.

    A parameter carrying channels of several groups (after a concatenation) gets
    the product of every group's :func:`lightly_mcp.pruning.groups.member_mask`.

    Args:
        tensors: Parameter-shaped tensors by name (shapes and devices are read).
        groups: The channel groups.
        masks: Per group, a boolean mask of kept channels.
    """
    check_masks(groups, masks)
    out: dict[str, Tensor] = {}
    for group, mask in zip(groups, masks):
        for member in group.members:
            tensor = tensors[member.param_name]
            multiplier = member_mask(member, mask.to(tensor.device), tensor.shape)
            previous = out.get(member.param_name)
            out[member.param_name] = (
                multiplier if previous is None else previous * multiplier
            )
    return out


def masked_tensors(
    tensors: Mapping[str, Tensor],
    groups: Sequence[ChannelGroup],
    masks: Masks,
) -> dict[str, Tensor]:
    """Returns the member tensors with the dropped channels set to zero.

    Tensors that are not a member of any group are not included.
    """
    multipliers = parameter_multipliers(tensors, groups, masks)
    return {
        name: tensors[name] * multiplier.to(tensors[name].dtype)
        for name, multiplier in multipliers.items()
    }


def output_feature_index(
    groups: Sequence[ChannelGroup], masks: Masks, num_features: int
) -> tuple[Tensor, Tensor]:
    """Which of the backbone's ``num_features`` output features the masks keep.

    Only groups that reach the output (``ChannelGroup.output_features``, found with
    ``keep_output_dim=False``) remove features. Physical pruning keeps the order of
    the remaining features, so the compact network's features are the dense
    network's ``kept`` features, in that order.

    Returns:
        ``(kept, dropped)``: sorted feature indices (int64 tensors).
    """
    check_masks(groups, masks)
    dropped: set[int] = set()
    for group, mask in zip(groups, masks):
        for channel, feature in group.output_features:
            if not bool(mask[channel]):
                dropped.add(feature)
    if any(not 0 <= f < num_features for f in dropped):
        raise ValueError(
            f"Output feature index out of range for {num_features} features; the "
            "groups were found on another network."
        )
    kept = [f for f in range(num_features) if f not in dropped]
    return torch.tensor(kept, dtype=torch.long), torch.tensor(
        sorted(dropped), dtype=torch.long
    )


def round_masks(
    encoder: nn.Module,
    groups: Sequence[ChannelGroup],
    masks: Masks,
    round_to: int,
) -> list[Tensor]:
    """Widens masks so that every group keeps a multiple of ``round_to`` channels.

    After training, this adds back channels the training removed; MCP chooses
    aligned counts in the mask itself (its ``round_to``), which this leaves as they
    are. Per group, the kept count is rounded up to the next multiple of ``round_to``
    (capped at the group's size); the extra channels are the dropped ones with the
    highest L2 norm over the group's members in ``encoder`` (as
    :func:`lightly_mcp.pruning.groups.channel_scores`). Kept channels stay kept.

    Args:
        encoder: The encoder whose weights rank the dropped channels (the momentum
            encoder).
        groups: Its channel groups.
        masks: Per group, the boolean mask of kept channels.
        round_to: The channel multiple, >= 1.

    Returns:
        New boolean masks on the CPU (the inputs are not modified).
    """
    validate_round_to(round_to)
    params = dict(encoder.named_parameters())
    widened = []
    for group, mask in zip(groups, masks):
        mask = mask.detach().cpu().to(torch.bool).clone()
        kept = int(mask.sum())
        target = min(group.num_channels, math.ceil(kept / round_to) * round_to)
        if target > kept:
            scores = channel_scores(params, group).detach().cpu().float()
            scores[mask] = -math.inf
            extra = torch.topk(scores, target - kept).indices
            mask[extra] = True
        widened.append(mask)
    return widened


#: The constructors under the names the benchmarks and the ratio solver know.
leading_masks = GroupMasks.leading
random_masks = GroupMasks.random
