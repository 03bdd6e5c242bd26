"""Tests of lightly_mcp.methods.options: MCP's allowed values, written once."""

from __future__ import annotations

import pytest

from lightly_mcp.errors import InputError
from lightly_mcp.methods.options import (
    CHOICE_OPTIONS,
    CONVERGING_SCHEDULE,
    check_mcp_options,
    converging_blocks,
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"frq": -1}, "frq must be an integer >= 0, got -1."),
        ({"admm_interval": 0}, "admm_interval must be an integer >= 1, got 0."),
        ({"round_to": True}, "round_to must be an integer >= 1, got True."),
        ({"compact_keys": 1}, "compact_keys must be true or false, got 1."),
        ({"schedule": "auto"}, "schedule must be one of manual, converging; got"),
        ({"mask_updates": "none"}, "mask_updates must be one of admm, fixed; got"),
        ({"rho": -0.1}, "rho must be >= 0, got -0.1."),
        ({"rho_growth": 0.5}, "rho_growth must be >= 1, got 0.5."),
        ({"rho_response": 0}, "rho_response must be > 0, got 0."),
        (
            {"rho_response": 1.0, "rho_growth": 2.0},
            "rho_growth must be 1 with rho_response",
        ),
    ],
)
def test_each_bad_option_is_named_with_what_is_allowed(
    options: dict, message: str
) -> None:
    with pytest.raises(InputError) as refused:
        check_mcp_options(options)
    assert str(refused.value).startswith(message)
    with pytest.raises(InputError, match=f"'mcp.{next(iter(options))}'"):
        check_mcp_options(options, qualify=lambda name: f"'mcp.{name}'")


def test_good_options_and_unknown_keys_pass() -> None:
    check_mcp_options({"frq": 0, "schedule": "converging", "other": object()})


def test_the_converging_schedule_sets_allowed_values() -> None:
    for name, value in CONVERGING_SCHEDULE.items():
        if name in CHOICE_OPTIONS:
            assert value in CHOICE_OPTIONS[name], name
    check_mcp_options(CONVERGING_SCHEDULE)


@pytest.mark.parametrize(
    ("total", "momentum", "expected"),
    [
        (1, 0.99, (2, 1)),
        (599, 0.99, (2, 300)),
        (600, 0.99, (2, 300)),
        (900, 0.99, (3, 300)),
        (10**6, 0.99, (4, 250000)),
        (50, 1.0, (2, 25)),  # no momentum decay: two blocks
    ],
)
def test_converging_blocks_cover_the_run(
    total: int, momentum: float, expected: tuple[int, int]
) -> None:
    blocks, steps = converging_blocks(total, momentum)
    assert (blocks, steps) == expected
    assert blocks * steps >= total > (blocks - 1) * steps or total == 1
