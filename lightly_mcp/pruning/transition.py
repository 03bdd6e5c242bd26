"""Smooth transition from the full momentum encoder to the momentum subnet.

Reference:
    Momentum Contrastive Pruning, Section 3.5 and Algorithm 1.
"""

from __future__ import annotations

from typing import Any

from lightly_mcp.errors import InputError


class SmoothTransition:
    """Chooses, per training iteration, which network produces the keys.

    The key source follows the sequence
    ``[full × frq₀, subnet, full × frq₁, subnet, …]`` with ``frq_{i+1} = frq_i − dr``;
    once ``frq_i ≤ 0`` every key comes from the momentum subnet. So ``(1, 0)``
    alternates forever, ``(0, 0)`` always uses the subnet and ``(100, 1)`` uses the
    full encoder 100, 99, …, 1 times between subnet iterations (5,050 times in all,
    the last at iteration 5,149). This follows the paper's text; its Algorithm 1 has
    an off-by-one that contradicts the text for ``(1, 0)``.

    Attributes:
        frq: Initial number of full-encoder iterations before the first subnet one.
        dr: Decay of that number after every subnet iteration.

    Examples:
        >>> transition = SmoothTransition(frq=2, dr=1)
        >>> [transition.step() for _ in range(6)]
        [False, False, True, False, True, True]
    """

    def __init__(self, frq: int, dr: int) -> None:
        """Args:
        frq: Integer ≥ 0.
        dr: Integer ≥ 0.
        """
        for name, value in (("frq", frq), ("dr", dr)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be an integer >= 0, got {value!r}.")
        self.frq = frq
        self.dr = dr
        self._run_length = frq  # full-encoder iterations in the current run
        self._remaining = frq  # full-encoder iterations left before the next subnet
        self._iteration = 0
        self._subnet_steps = 0

    def step(self) -> bool:
        """Advances one iteration; True if its keys come from the momentum subnet."""
        self._iteration += 1
        if self._remaining > 0:
            self._remaining -= 1
            return False
        self._subnet_steps += 1
        self._run_length = max(0, self._run_length - self.dr)
        self._remaining = self._run_length
        return True

    @property
    def iteration(self) -> int:
        """Iterations taken so far."""
        return self._iteration

    @property
    def subnet_fraction(self) -> float:
        """Share of iterations so far whose keys came from the subnet."""
        return self._subnet_steps / self._iteration if self._iteration else 0.0

    @property
    def finished(self) -> bool:
        """True once every further key comes from the subnet."""
        return self._run_length == 0 and self._remaining == 0

    def state_dict(self) -> dict[str, Any]:
        """The scheduler position, for checkpoints."""
        return {
            "frq": self.frq,
            "dr": self.dr,
            "run_length": self._run_length,
            "remaining": self._remaining,
            "iteration": self._iteration,
            "subnet_steps": self._subnet_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict`."""
        if (state["frq"], state["dr"]) != (self.frq, self.dr):
            raise InputError(
                f"Transition state was saved with (frq={state['frq']}, "
                f"dr={state['dr']}) but this scheduler has (frq={self.frq}, "
                f"dr={self.dr})."
            )
        self._run_length = int(state["run_length"])
        self._remaining = int(state["remaining"])
        self._iteration = int(state["iteration"])
        self._subnet_steps = int(state["subnet_steps"])

    def __repr__(self) -> str:
        return (
            f"SmoothTransition(frq={self.frq}, dr={self.dr}, "
            f"iteration={self._iteration})"
        )
