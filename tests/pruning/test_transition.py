from __future__ import annotations

import pytest

from lightly_mcp import SmoothTransition

F, S = False, True  # full momentum encoder, momentum subnet


def _sequence(transition: SmoothTransition, n: int) -> list[bool]:
    return [transition.step() for _ in range(n)]


def test_frq2_dr1() -> None:
    assert _sequence(SmoothTransition(2, 1), 9) == [F, F, S, F, S, S, S, S, S]


def test_frq1_dr0_alternates_forever() -> None:
    assert _sequence(SmoothTransition(1, 0), 1000) == [F, S] * 500


def test_frq0_dr0_always_subnet() -> None:
    transition = SmoothTransition(0, 0)
    assert transition.finished
    assert all(_sequence(transition, 500))


def test_frq100_dr1_matches_the_paper_text() -> None:
    seq = _sequence(SmoothTransition(100, 1), 6000)
    assert seq.index(S) + 1 == 101  # first subnet iteration, 1-based
    assert seq[:100] == [F] * 100
    assert seq.count(F) == 5050
    last_full = max(i for i, source in enumerate(seq) if source is F) + 1
    assert last_full == 5149
    assert all(seq[5149:])
    # Runs of full iterations between subnet ones: 100, 99, ..., 1.
    runs, run = [], 0
    for source in seq[:5150]:
        if source is F:
            run += 1
        else:
            runs.append(run)
            run = 0
    assert runs == list(range(100, 0, -1))


def test_subnet_fraction_and_iteration() -> None:
    transition = SmoothTransition(1, 0)
    _sequence(transition, 10)
    assert transition.iteration == 10
    assert transition.subnet_fraction == pytest.approx(0.5)


@pytest.mark.parametrize(
    "frq, dr, split", [(100, 1, 2345), (2, 1, 3), (1, 0, 7), (5, 2, 9)]
)
def test_state_round_trips_mid_sequence(frq: int, dr: int, split: int) -> None:
    reference = _sequence(SmoothTransition(frq, dr), 6000)
    first = SmoothTransition(frq, dr)
    head = _sequence(first, split)
    resumed = SmoothTransition(frq, dr)
    resumed.load_state_dict(first.state_dict())
    assert head + _sequence(resumed, 6000 - split) == reference
    assert resumed.iteration == 6000


def test_state_from_other_settings_is_refused() -> None:
    state = SmoothTransition(2, 1).state_dict()
    with pytest.raises(ValueError, match=r"frq=2, dr=1"):
        SmoothTransition(3, 1).load_state_dict(state)


@pytest.mark.parametrize(
    "frq, dr, name", [(-1, 0, "frq"), (0, -2, "dr"), (1.5, 0, "frq"), (True, 0, "frq")]
)
def test_invalid_arguments(frq: int, dr: int, name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 0"):
        SmoothTransition(frq, dr)
