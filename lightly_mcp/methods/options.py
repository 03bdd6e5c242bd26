"""MCP's options and their allowed values, written once.

:class:`~lightly_mcp.methods.mcp.MCP` checks its arguments with
:func:`check_mcp_options`, and a recipe's ``mcp`` section is checked with the same rules
(:func:`lightly_mcp.app.recipe.validate` names the keys as ``'mcp.<option>'``). The
building blocks (``ADMMRegularizer``, ``SmoothTransition``, ``BlockSchedule``) check
their own arguments when used on their own.

Examples:
    >>> check_mcp_options({"frq": -1})
    Traceback (most recent call last):
    ...
    lightly_mcp.errors.InputError: frq must be an integer >= 0, got -1.
    >>> check_mcp_options({"frq": -1}, qualify=lambda name: f"'mcp.{name}'")
    Traceback (most recent call last):
    ...
    lightly_mcp.errors.InputError: 'mcp.frq' must be an integer >= 0, got -1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lightly_mcp.errors import InputError
from lightly_mcp.pruning.schedule import FROZEN_MASKS, LR_SCHEDULES, TRANSITIONS

#: Units of ``admm_interval``.
ADMM_INTERVAL_UNITS = ("steps", "epochs")

#: ``schedule``: ``manual`` (the arguments as given) or ``converging`` (the blocks,
#: ρ, learning rate and transition laid out from the run's length).
SCHEDULES = ("manual", "converging")

#: What ``schedule: converging`` sets (the values of the converging schedule of
#: DESIGN.md section 8 at quickstart scale); ``admm_interval`` comes from the run.
CONVERGING_SCHEDULE = {
    "admm_interval_unit": "steps",
    "lr_schedule": "block_cosine",
    "frozen_blocks": 1,
    "transition": "stable_mask",
}
#: The θ-response ``schedule: converging`` derives ρ for, unless ``rho_response``
#: is given: the longest that 100-step blocks hold with SGD momentum 0.9.
CONVERGING_RESPONSE = 1.0

#: What an ADMM update does to the mask: ``admm`` (a new projection of θ + U, the
#: method) or ``fixed`` (the start's magnitude mask kept; an ablation).
MASK_UPDATES = ("admm", "fixed")

#: Integer options and their smallest allowed value.
INTEGER_OPTIONS = {
    "frq": 0,
    "dr": 0,
    "admm_interval": 1,
    "frozen_blocks": 0,
    "recalibration_batches": 0,
    "round_to": 1,
}

#: Options that are true or false.
BOOLEAN_OPTIONS = ("compact_keys",)

#: Options with a fixed set of values.
CHOICE_OPTIONS = {
    "admm_interval_unit": ADMM_INTERVAL_UNITS,
    "lr_schedule": LR_SCHEDULES,
    "frozen_mask": FROZEN_MASKS,
    "transition": TRANSITIONS,
    "mask_updates": MASK_UPDATES,
    "schedule": SCHEDULES,
}


def check_mcp_options(
    options: Mapping[str, Any], qualify: Callable[[str], str] = str
) -> None:
    """Checks the MCP options present in ``options`` (others are ignored).

    Args:
        options: Option values by name (``frq``, ``dr``, ``admm_interval``,
            ``frozen_blocks``, ``recalibration_batches``, ``admm_interval_unit``,
            ``lr_schedule``, ``frozen_mask``, ``transition``, ``rho``,
            ``rho_growth``, ``rho_response``, ``compact_keys``, ``round_to``,
            ``mask_updates``, ``schedule``).
        qualify: How a message names an option (e.g. ``'mcp.frq'`` in a recipe).

    Raises:
        InputError: For the first option out of range, naming it and what is allowed.
    """
    for name, low in INTEGER_OPTIONS.items():
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not (isinstance(value, int) and value >= low):
                raise InputError(
                    f"{qualify(name)} must be an integer >= {low}, got {value!r}."
                )
    for name in BOOLEAN_OPTIONS:
        if name in options and not isinstance(options[name], bool):
            raise InputError(
                f"{qualify(name)} must be true or false, got {options[name]!r}."
            )
    for name, allowed in CHOICE_OPTIONS.items():
        if name in options and options[name] not in allowed:
            raise InputError(
                f"{qualify(name)} must be one of {', '.join(allowed)}; "
                f"got {options[name]!r}."
            )
    if "rho" in options and not options["rho"] >= 0:
        raise InputError(f"{qualify('rho')} must be >= 0, got {options['rho']}.")
    if "rho_growth" in options and not options["rho_growth"] >= 1:
        raise InputError(
            f"{qualify('rho_growth')} must be >= 1, got {options['rho_growth']}."
        )
    response = options.get("rho_response")
    if response is not None:
        if not response > 0:
            raise InputError(f"{qualify('rho_response')} must be > 0, got {response}.")
        if options.get("rho_growth", 1) != 1:
            raise InputError(
                f"{qualify('rho_growth')} must be 1 with {qualify('rho_response')} "
                "(rho is derived for every block)."
            )


def converging_blocks(total_steps: int, momentum: float) -> tuple[int, int]:
    """``(blocks, block_steps)`` of ``schedule: converging`` for a run of
    ``total_steps``: blocks of at least ``3 / (1 − m)`` steps (the momentum encoder
    follows the query encoder within a block) where the run allows, 2 to 4 of them.
    """
    follow = math.ceil(3.0 / (1.0 - momentum)) if momentum < 1 else total_steps
    blocks = min(4, max(2, total_steps // max(1, follow)))
    return blocks, max(1, math.ceil(total_steps / blocks))
