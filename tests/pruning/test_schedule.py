from __future__ import annotations

import math

import pytest

from lightly_mcp.pruning.schedule import (
    BlockSchedule,
    alpha_of_response,
    critical_damping,
)


def test_updates_end_blocks_never_the_run_and_not_in_the_frozen_phase() -> None:
    schedule = BlockSchedule(block_steps=10, total_steps=40)
    assert [d for d in range(0, 41) if schedule.is_update(d)] == [10, 20, 30]
    assert not any(schedule.is_frozen(t) for t in range(40))
    frozen = BlockSchedule(block_steps=10, total_steps=40, frozen_blocks=2)
    assert [d for d in range(0, 41) if frozen.is_update(d)] == [10, 20]
    assert [t for t in range(40) if frozen.is_frozen(t)] == list(range(20, 40))
    # A last, shorter block: its end is the end of training, no update there.
    partial = BlockSchedule(block_steps=10, total_steps=35)
    assert partial.num_blocks == 4
    assert [d for d in range(0, 36) if partial.is_update(d)] == [10, 20, 30]
    assert list(partial.block_range(3)) == list(range(30, 35))


def test_block_step_learning_rate_restarts_and_drops_every_third() -> None:
    schedule = BlockSchedule(block_steps=9, total_steps=27, lr_schedule="block_step")
    one_block = [1.0] * 3 + [0.1] * 3 + [0.01] * 3
    factors = [schedule.lr_factor(t) for t in range(27)]
    assert factors == pytest.approx(one_block * 3)
    cosine = BlockSchedule(block_steps=9, total_steps=18, lr_schedule="block_cosine")
    assert cosine.lr_factor(0) == cosine.lr_factor(9) == pytest.approx(1.0)
    assert cosine.lr_factor(8) == pytest.approx(0.001)
    assert all(cosine.lr_factor(t) > cosine.lr_factor(t + 1) for t in range(8))


def test_derived_rho_gives_the_requested_response_in_every_block() -> None:
    def lr_at(step: int) -> float:
        return 0.03 * (1 - step / 600)  # a falling rate, as one cosine over the run

    schedule = BlockSchedule(block_steps=200, total_steps=600)
    rhos = [schedule.derived_rho(b, 1.5, lr_at, 0.9) for b in range(3)]
    for block, rho in enumerate(rhos):
        assert schedule.predicted_response(block, rho, lr_at, 0.9) == pytest.approx(1.5)
    assert rhos[0] < rhos[1] < rhos[2]  # ρ grows as the rate falls
    assert alpha_of_response(1.5) == pytest.approx(1 - math.exp(-1.5))


def test_too_short_blocks_are_refused_with_the_shortest_that_works() -> None:
    schedule = BlockSchedule(block_steps=20, total_steps=100, lr_schedule="block_step")
    with pytest.raises(ValueError, match=r"at least (\d+) steps") as info:
        schedule.derived_rho(0, 1.0, lambda t: 0.03 * schedule.lr_factor(t), 0.9)
    shortest = int(info.value.args[0].split("at least ")[1].split()[0])
    longer = BlockSchedule(shortest, 5 * shortest, lr_schedule="block_step")
    rho = longer.derived_rho(0, 1.0, lambda t: 0.03 * longer.lr_factor(t), 0.9)
    assert rho * 0.03 <= critical_damping(0.9)
    # Without SGD momentum nothing overshoots below a step of 1.
    assert critical_damping(0.0) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_steps": 0, "total_steps": 10}, "block_steps must be >= 1"),
        ({"block_steps": 5, "total_steps": 10, "frozen_blocks": 2}, "frozen_blocks"),
        ({"block_steps": 5, "total_steps": 10, "lr_schedule": "x"}, "lr_schedule"),
    ],
)
def test_invalid_schedules(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BlockSchedule(**kwargs)
