"""Solving for the uniform pruning ratio that meets a parameter or MAC budget."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightly_mcp.errors import InputError
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import ChannelGroup
from lightly_mcp.pruning.masks import leading_masks
from lightly_mcp.pruning.measure import count_macs, count_parameters

METRICS = ("params", "macs")


def removed_fraction(
    encoder: nn.Module,
    groups: Sequence[ChannelGroup],
    pruning_ratio: float,
    metric: str = "params",
    input_size: int = 32,
    example_inputs: Tensor | None = None,
    round_to: int = 1,
) -> float:
    """Fraction of parameters or MACs removed when every group drops ``r`` of its
    channels, its kept count aligned to ``round_to`` (``ChannelGroup.num_kept``;
    which channels does not matter for the count).
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}.")
    small = compact(
        encoder, groups, leading_masks(groups, pruning_ratio, round_to), example_inputs
    )
    if metric == "params":
        return 1.0 - count_parameters(small) / count_parameters(encoder)
    return 1.0 - count_macs(small, input_size) / count_macs(encoder, input_size)


def solve_pruning_ratio(
    encoder: nn.Module,
    groups: Sequence[ChannelGroup],
    target: float,
    metric: str = "params",
    input_size: int = 32,
    example_inputs: Tensor | None = None,
    tolerance: float = 1e-3,
    round_to: int = 1,
) -> float:
    """Smallest uniform ratio ``r`` that removes at least ``target`` of the params/MACs.

    Solved by bisection over ``r ∈ [0, 1)``; the removed fraction grows with ``r``
    (also with aligned counts, a step function of ``r``: the solution removes at
    least ``target``, possibly a step more).

    Args:
        encoder: The dense encoder.
        groups: Its channel groups.
        target: Fraction of parameters (or MACs) to remove, in (0, 1).
        metric: ``"params"`` or ``"macs"``.
        input_size: Image size at which MACs are counted.
        example_inputs: Batch for tracing (see ``find_channel_groups``).
        tolerance: Width of the final bisection interval in ``r``.
        round_to: The channel multiple every group keeps (``ChannelGroup.num_kept``).

    Raises:
        ValueError: If the target cannot be reached by pruning the groups (e.g. it
            exceeds what removing all but one channel per group achieves).
    """
    if not 0.0 < target < 1.0:
        raise InputError(f"target must be in (0, 1), got {target}.")

    def removed(r: float) -> float:
        return removed_fraction(
            encoder, groups, r, metric, input_size, example_inputs, round_to
        )

    high = 1.0 - 1e-6
    reachable = removed(high)
    if reachable < target:
        fewest = "one channel" if round_to == 1 else f"{round_to} channels (round_to)"
        raise InputError(
            f"Cannot remove {target:.1%} of the {metric}: pruning every group down to "
            f"{fewest} removes only {reachable:.1%} (unprunable layers remain). "
            "Choose a smaller target."
        )
    low = 0.0
    while high - low > tolerance:
        mid = 0.5 * (low + high)
        if removed(mid) >= target:
            high = mid
        else:
            low = mid
    return high
