"""ADMM regularizer that drives a preset fraction of channels of every group to zero.

Reference:
    Momentum Contrastive Pruning, Section 3.4, Eq. (7)-(10); and
    Zhang et al., A Systematic DNN Weight Pruning Framework using ADMM, ECCV 2018.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightly_mcp.errors import InputError
from lightly_mcp.pruning.groups import (
    ChannelGroup,
    validate_pruning_ratio,
    validate_round_to,
)
from lightly_mcp.pruning.masks import (
    GroupMasks,
    Masks,
    masked_tensors,
    parameter_multipliers,
    register_masks,
)


def project_onto_channel_budget(
    tensors: Mapping[str, Tensor],
    groups: Sequence[ChannelGroup],
    pruning_ratio: float,
    round_to: int = 1,
) -> tuple[dict[str, Tensor], GroupMasks]:
    """Euclidean projection onto "at most ``n_g`` non-zero channels per group".

    Per group, channels are ranked by the L2 norm of all their output-side members
    (conv rows, depthwise filters, biases, norm weight and bias), the top ``n_g`` are
    kept and the rest are set to zero. This is the exact projection: zeroing a channel
    costs its squared norm, so keeping the largest norms is optimal. Channels tied
    by a grouped convolution (``ChannelGroup.units``) are ranked and kept as one
    unit by their summed squared norm, the exact projection onto that set. A
    parameter carrying channels of several groups is zeroed where any of them drops
    a channel.

    With ``round_to``, ``n_g`` is the aligned count of
    ``ChannelGroup.num_kept(pruning_ratio, round_to)`` (a multiple of ``round_to``
    where the group allows): the projection onto that set, so every mask of the run
    keeps hardware-aligned counts.

    Args:
        tensors: Parameter-shaped tensors by name (e.g. ``θ_q + U``).
        groups: The channel groups.
        pruning_ratio: Fraction of channels removed in every group.
        round_to: The channel multiple every group keeps (1: exactly ``n_g``).

    Returns:
        ``(projected, masks)``: the projected member tensors by name, and the masks
        of kept channels (:meth:`GroupMasks.top_k`).
    """
    masks = GroupMasks.top_k(groups, pruning_ratio, tensors, round_to)
    return masked_tensors(tensors, groups, masks), masks


class ADMMRegularizer(nn.Module):
    """ADMM penalty pulling the query encoder toward a channel-sparse copy ``Z``.

    The loss is ``(ρ/2) Σ_g ‖θ_g − Z_g + U_g‖²`` over the output-side parameters of
    every channel group. :meth:`update` performs the ADMM step
    ``Z ← Π(θ + U)``, ``U ← U + θ − Z``, ``mask ← support(Z)``, where ``Π`` keeps the
    ``n_g = max(1, C_g − floor(r·C_g))`` channels of largest norm in every group,
    aligned to a multiple of ``round_to`` (``ChannelGroup.num_kept``).
    ``Z``, ``U``, the mask, ``ρ`` and the update count are buffers: they are saved in
    ``state_dict()`` and move with the module. The regularizer owns the mask
    (:attr:`group_masks`); the momentum subnet references it.

    **Storage.** ``Z`` is zero outside the mask and, since ``Z`` keeps ``θ + U``
    unchanged on the mask, the update leaves ``U`` exactly zero on it
    (``U ← (θ + U) − Z``). The two have disjoint supports, so ``state_dict()``
    stores them as one tensor per parameter, ``zu_{i} = Z + U``, and loading splits
    it again with the saved mask: exactly, bit for bit up to the sign of zeros.
    Where the supports overlap (state loaded from an older checkpoint, before its
    first update here; a mask assigned from outside) ``z_{i}`` and ``u_{i}`` are
    saved as before, and checkpoints in that older format load as they are.

    Attributes:
        groups: The channel groups (shared with the momentum subnet).
        group_masks: The mask, per group the kept channels (support of ``Z``).
        pruning_ratio: Fraction of channels removed in every group.
        round_to: The channel multiple every group keeps.
        rho_growth: Factor applied to ρ after every update (1.0 keeps ρ constant).

    Examples:
        >>> admm = ADMMRegularizer(backbone, groups, pruning_ratio=0.5, rho=0.01)
        >>> # in the training step:
        >>> loss = criterion(query, key) + admm(backbone)
        >>> # every admm_interval steps or epochs:
        >>> changed = admm.update(backbone)
    """

    group_masks: GroupMasks

    def __init__(
        self,
        encoder: nn.Module,
        groups: Sequence[ChannelGroup],
        pruning_ratio: float,
        rho: float = 0.01,
        rho_growth: float = 1.0,
        round_to: int = 1,
        fixed_mask: bool = False,
    ) -> None:
        """Initialises ``Z⁰ = Π(θ⁰)``, ``U⁰ = 0`` from the encoder's current weights.

        Args:
            encoder: The query encoder; only its current weights are read.
            groups: Channel groups of the encoder (see ``find_channel_groups``).
            pruning_ratio: Fraction of channels removed in every group, in [0, 1).
            rho: ADMM penalty ρ ≥ 0 (0.01 in the paper).
            rho_growth: Factor ≥ 1 multiplying ρ after every update.
            round_to: Every group keeps a multiple of this many channels where its
                size allows (``ChannelGroup.num_kept``); 1: exactly ``n_g``.
            fixed_mask: Keep the first mask (``support(Π(θ⁰))``, the magnitude
                mask of the start) at every update: ``Z ← (θ + U) ⊙ φ`` on the fixed
                support instead of a new projection (the ablation of what the
                changing mask adds).
        """
        super().__init__()
        self.pruning_ratio = validate_pruning_ratio(pruning_ratio)
        if not rho >= 0:
            raise InputError(f"rho must be >= 0, got {rho}.")
        if not rho_growth >= 1.0:
            raise InputError(f"rho_growth must be >= 1.0, got {rho_growth}.")
        if not groups:
            raise InputError("groups must not be empty.")
        self.groups = list(groups)
        self.rho_growth = float(rho_growth)
        self.round_to = validate_round_to(round_to)
        self.fixed_mask = bool(fixed_mask)
        # A parameter after a concatenation is a member of several groups.
        self.param_names = list(
            dict.fromkeys(name for g in self.groups for name in g.param_names)
        )

        params = self._parameters_of(encoder)
        with torch.no_grad():
            z, masks = project_onto_channel_budget(
                params, self.groups, self.pruning_ratio, self.round_to
            )
        self.rho_value: Tensor
        self.num_updates: Tensor
        self.register_buffer("rho_value", torch.tensor(float(rho), dtype=torch.float64))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        for i, name in enumerate(self.param_names):
            self.register_buffer(f"z_{i}", z[name].detach().clone())
            self.register_buffer(f"u_{i}", torch.zeros_like(params[name]))
        register_masks(self, masks)  # saved as mask_{g}, as always
        # Z − U, derived state cached for the per-step loss (refreshed on update/load).
        for i, name in enumerate(self.param_names):
            self.register_buffer(
                f"target_{i}", z[name].detach().clone(), persistent=False
            )
        self.register_load_state_dict_post_hook(_refresh_targets_after_load)
        self._register_state_dict_hook(_save_z_and_u_together)
        self._register_load_state_dict_pre_hook(_split_z_and_u, with_module=True)
        # φ and 1 − φ per member (support penalty, hard mask), cached per mask.
        self._kept: list[Tensor] = []
        self._dropped: list[Tensor] = []
        self._support_version = -1

    # --- state -------------------------------------------------------------------
    @property
    def rho(self) -> float:
        """The current ADMM penalty ρ."""
        return float(self.rho_value)

    @property
    def masks(self) -> list[Tensor]:
        """Per group, the boolean mask of kept channels (support of ``Z``)."""
        return self.group_masks.tensors()

    def z(self) -> dict[str, Tensor]:
        """``Z`` by parameter name."""
        return {n: getattr(self, f"z_{i}") for i, n in enumerate(self.param_names)}

    def u(self) -> dict[str, Tensor]:
        """``U`` by parameter name."""
        return {n: getattr(self, f"u_{i}") for i, n in enumerate(self.param_names)}

    def _parameters_of(self, encoder: nn.Module) -> dict[str, Tensor]:
        try:
            return {name: encoder.get_parameter(name) for name in self.param_names}
        except AttributeError as error:
            raise ValueError(
                f"The encoder does not match the channel groups of this regularizer: "
                f"{error}. Build the groups from the same architecture."
            ) from None

    # --- ADMM --------------------------------------------------------------------
    def _targets(self) -> list[Tensor]:
        return [getattr(self, f"target_{i}") for i in range(len(self.param_names))]

    @torch.no_grad()
    def refresh(self) -> None:
        """Recomputes the cached ``Z − U`` and drops the mask's derived state (after
        buffers were overwritten, e.g. by a DDP broadcast).
        """
        for target, z, u in zip(self._targets(), self.z().values(), self.u().values()):
            torch.sub(z, u, out=target)
        self.group_masks.invalidate()

    def forward(self, encoder: nn.Module) -> Tensor:
        """Returns the ADMM penalty ``(ρ/2) Σ ‖θ − Z + U‖²`` (differentiable in θ).

        One fused (``torch._foreach_*``) pass over the member parameters; ``Z − U``
        is cached between updates.
        """
        params: list[Tensor] = [encoder.get_parameter(n) for n in self.param_names]
        diffs = torch._foreach_sub(params, self._targets())
        squares = torch.stack(torch._foreach_norm(diffs)).pow(2).sum()
        return 0.5 * self.rho * squares

    loss = forward

    def _support(self, encoder: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """Per output-side parameter, the kept (φ) and dropped (1 − φ) multipliers of
        the current mask; recomputed only after an ADMM update changed it.
        """
        if self._support_version != self.group_masks.version:
            kept = self.group_masks.multipliers(self._parameters_of(encoder))
            self._kept = [kept[n] for n in self.param_names]
            self._dropped = [1.0 - k for k in self._kept]
            self._support_version = self.group_masks.version
        return self._kept, self._dropped

    def support_penalty(self, encoder: nn.Module) -> Tensor:
        """``(ρ/2) Σ ‖(1 − φ) ⊙ θ‖²``: the penalty on the fixed support.

        Used while the mask is frozen (no more ADMM updates): it pulls the dropped
        channels of the query encoder to zero and leaves the kept ones free, instead
        of pulling towards a ``Z − U`` that no update will revise.
        """
        params: list[Tensor] = [encoder.get_parameter(n) for n in self.param_names]
        dropped = torch._foreach_mul(params, self._support(encoder)[1])
        squares = torch.stack(torch._foreach_norm(dropped)).pow(2).sum()
        return 0.5 * self.rho * squares

    @torch.no_grad()
    def zero_dropped(self, encoder: nn.Module) -> None:
        """Sets the dropped channels of ``encoder``'s output-side parameters to zero,
        in place: the hard form of :meth:`support_penalty` (θ ← φ ⊙ θ).
        """
        params: list[Tensor] = [encoder.get_parameter(n) for n in self.param_names]
        torch._foreach_mul_(params, self._support(encoder)[0])

    @torch.no_grad()
    def distance(self, encoder: nn.Module) -> float:
        """``‖θ − Z‖`` over the output-side parameters: how far θ is from sparse."""
        params = self._parameters_of(encoder)
        z = self.z()
        sq = sum(float((params[n] - z[n]).pow(2).sum()) for n in self.param_names)
        return sq**0.5

    @torch.no_grad()
    def relative_distance(self, encoder: nn.Module) -> float:
        """``‖θ − Z‖ / ‖θ‖``: 0 once θ is as sparse as the mask, ≈ 1 far from it."""
        params = self._parameters_of(encoder)
        norm = sum(float(params[n].pow(2).sum()) for n in self.param_names) ** 0.5
        return self.distance(encoder) / norm if norm > 0 else 0.0

    @torch.no_grad()
    def residual(self, encoder: nn.Module) -> float:
        """``‖θ − (Z − U)‖``: the distance the penalty pulls θ across.

        Its relative decrease over a block is the block's measured θ-response α.
        """
        params = [encoder.get_parameter(n).detach() for n in self.param_names]
        diffs = torch._foreach_sub(params, self._targets())
        return float(torch.stack(torch._foreach_norm(diffs)).pow(2).sum()) ** 0.5

    @torch.no_grad()
    def set_rho(self, rho: float) -> None:
        """Changes ρ and rescales the scaled dual: ``U ← U · ρ_old / ρ_new``.

        With the scaled form of ADMM, ``U`` is the dual divided by ρ; keeping the
        dual when ρ changes requires this rescaling (Boyd et al. 2011, §3.4.1).
        """
        if not rho > 0:
            raise InputError(f"rho must be > 0, got {rho}.")
        old = self.rho
        if old > 0 and old != rho:
            torch._foreach_mul_(list(self.u().values()), old / rho)
            self.refresh()
        self.rho_value.fill_(rho)

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> int:
        """One ADMM step: ``Z ← Π(θ + U)``, ``U ← U + θ − Z``, ``mask ← support(Z)``.

        Then ``ρ`` is multiplied by ``rho_growth`` and ``U`` rescaled accordingly
        (:meth:`set_rho`).

        Returns:
            The number of channels that entered or left the mask.
        """
        params = self._parameters_of(encoder)
        u = self.u()
        shifted = {n: params[n].detach() + u[n] for n in self.param_names}
        masks_new: Masks
        if self.fixed_mask:
            phi = self.group_masks.multipliers(shifted)
            z_new = {n: shifted[n] * phi[n] for n in self.param_names}
            masks_new = [mask.clone() for mask in self.group_masks]
        else:
            z_new, masks_new = project_onto_channel_budget(
                shifted, self.groups, self.pruning_ratio, self.round_to
            )
        for i, name in enumerate(self.param_names):
            getattr(self, f"z_{i}").copy_(z_new[name])
            # U + θ − Z, written so that it is exactly zero where Z keeps θ + U.
            torch.sub(shifted[name], z_new[name], out=getattr(self, f"u_{i}"))
        changed = self.group_masks.assign(masks_new)
        self.num_updates.add_(1)
        if self.rho_growth != 1.0:
            self.set_rho(self.rho * self.rho_growth)
        self.refresh()
        return changed

    def kept_channels(self) -> list[int]:
        """Number of kept channels per group."""
        return self.group_masks.kept_channels()

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        return (
            f"groups={len(self.groups)}, pruning_ratio={self.pruning_ratio}, "
            f"round_to={self.round_to}, "
            f"rho={self.rho:g}, rho_growth={self.rho_growth:g}"
            + (", fixed_mask=True" if self.fixed_mask else "")
        )


def _refresh_targets_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, ADMMRegularizer)
    module.refresh()


@torch.no_grad()
def _save_z_and_u_together(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
) -> None:
    """Replaces ``z_{i}`` and ``u_{i}`` by ``zu_{i} = Z + U`` where their supports
    are disjoint (``Z`` only on the mask, ``U`` only off it).
    """
    assert isinstance(module, ADMMRegularizer)
    kept = module.group_masks.multipliers(module.z())
    for i, name in enumerate(module.param_names):
        z_key, u_key = f"{prefix}z_{i}", f"{prefix}u_{i}"
        if z_key not in state_dict or u_key not in state_dict:
            continue
        z, u = state_dict[z_key].detach(), state_dict[u_key].detach()
        on_mask = kept[name].to(z.device) != 0
        if bool(torch.where(on_mask, u, 0).any()) or bool(
            torch.where(on_mask, 0, z).any()
        ):
            continue  # overlapping supports: the older format, two tensors
        del state_dict[z_key], state_dict[u_key]
        state_dict[f"{prefix}zu_{i}"] = torch.where(on_mask, z, u)


@torch.no_grad()
def _split_z_and_u(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Turns ``zu_{i}`` back into ``z_{i}`` and ``u_{i}`` with the saved mask (the
    module's own when the state has none); older checkpoints hold them already.
    """
    assert isinstance(module, ADMMRegularizer)
    keys = [f"{prefix}zu_{i}" for i in range(len(module.param_names))]
    if not any(key in state_dict for key in keys):
        return
    masks = []
    for g, own in enumerate(module.masks):
        saved = state_dict.get(f"{prefix}group_masks.mask_{g}")
        if saved is None:
            saved = state_dict.get(f"{prefix}mask_{g}", own)
        masks.append(saved.to(torch.bool))
    own_z = module.z()
    shapes = {
        name: state_dict.get(key, own_z[name])
        for name, key in zip(module.param_names, keys)
    }
    try:
        kept = parameter_multipliers(shapes, module.groups, masks)
    except (ValueError, RuntimeError):
        return  # the wrong architecture: load_state_dict reports the keys
    for i, (name, key) in enumerate(zip(module.param_names, keys)):
        zu = state_dict.pop(key, None)
        if zu is None:
            continue
        on_mask = kept[name].to(zu.device) != 0
        state_dict[f"{prefix}z_{i}"] = torch.where(on_mask, zu, 0)
        state_dict[f"{prefix}u_{i}"] = torch.where(on_mask, 0, zu)
