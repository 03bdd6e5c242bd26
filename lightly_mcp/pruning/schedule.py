"""The ADMM block schedule: when Z, U and the mask change, how far θ_q gets between.

The paper (Sec. 4.1) trains "MoCo with ADMM for 450 epochs, during which every 15
epochs is followed by an ADMM epoch. The learning rate is set to 0.03 in each ADMM
epoch multiplied by 0.1 for every 5 epochs": 30 *blocks*, an ADMM update
(``Z ← Π(θ_q + U)``, ``U ← U + θ_q − Z``, new mask) at the end of each, and a learning
rate that restarts at every block and steps down ×0.1 every third of a block.

Whether the mask settles is decided by the **θ-response** of a block: how far SGD moves
θ_q towards ``Z − U`` before the next update. The penalty's gradient is
``ρ (θ_q − Z + U)``, so with SGD momentum β the distance shrinks by
``α ≈ 1 − exp(−R)`` with the *predicted response* ``R = ρ · Σ_block lr_t / (1 − β)``.
Inside a channel group the last kept and the first dropped channel have almost the same
norm, and the mask holds at the next update only when ``α > 1 − 1/√2 ≈ 0.29``
(``R ≈ 0.35``); below that it cycles through the channels (DESIGN.md §8). The paper's
blocks have ``R ≈ 3.3``. :meth:`BlockSchedule.derived_rho` gives the ρ for which every
block has a chosen response, from the learning-rate schedule and SGD momentum, so a
user needs to know only the pruning ratio and the step budget.

Everything here is a pure function of the step index: nothing to checkpoint.

Reference:
    Momentum Contrastive Pruning, Sec. 4.1; Zhang et al., A Systematic DNN Weight
    Pruning Framework using ADMM, ECCV 2018; Boyd et al., Distributed Optimization and
    Statistical Learning via ADMM, 2011, §3.4.1 (rescaling U when ρ changes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lightly.utils.scheduler import cosine_schedule

from lightly_mcp.errors import InputError

#: Learning-rate schedules of an MCP run: one cosine over the whole run (MoCo v2's),
#: the paper's restart per block with ×0.1 steps, or a cosine restarting every block.
LR_SCHEDULES = ("cosine", "block_step", "block_cosine")
#: The paper's step decay inside a block: ×0.1 at every third of the block.
BLOCK_LR_STAGES = 3
BLOCK_LR_FACTOR = 0.1
#: End value of the per-block cosine (as lightly's ``CosineWarmupScheduler``).
BLOCK_COSINE_END = 0.001
#: Smallest θ-response α for which a mask with tied boundary channels holds.
MASK_HOLD_ALPHA = 1.0 - 1.0 / math.sqrt(2.0)
#: Transition modes: the paper's (frq, dr) sequence, or full-encoder keys until the
#: mask has been stable for one block.
TRANSITIONS = ("paper", "stable_mask")
#: How the frozen blocks keep θ_q's dropped channels: a penalty, or exactly zero.
FROZEN_MASKS = ("penalty", "hard")


def critical_damping(sgd_momentum: float) -> float:
    """Largest penalty step ``ρ · lr`` for which heavy-ball SGD does not overshoot.

    On the quadratic penalty, SGD with momentum β and step ``h = ρ · lr`` has the
    characteristic roots of ``r² − (1 + β − h) r + β``; they are real (no
    oscillation around ``Z − U``) while ``h ≤ (1 − √β)²``. Only then does a block move
    θ_q by ``α ≈ 1 − exp(−ρ Σ lr / (1 − β))``.
    """
    return (1.0 - math.sqrt(sgd_momentum)) ** 2


def alpha_of_response(response: float) -> float:
    """``α = 1 − exp(−R)``: the fraction of the way to ``Z − U`` a response reaches."""
    return 1.0 - math.exp(-response)


@dataclass(frozen=True)
class BlockSchedule:
    """Blocks of ``block_steps`` optimizer steps over a run of ``total_steps``.

    Step indices are 0-based optimizer steps; ``done`` counts steps already taken.
    The ADMM update comes at the end of a block, never at the end of training (the
    result must be a mask that trained), and not during the last ``frozen_blocks``
    blocks, in which the mask is fixed and MoCo keeps training with subnet keys.

    Attributes:
        block_steps: Optimizer steps per block (>= 1).
        total_steps: Optimizer steps of the whole run (>= 1).
        frozen_blocks: Blocks at the end trained with the mask frozen.
        lr_schedule: One of :data:`LR_SCHEDULES`; the block schedules restart at
            every block.

    Examples:
        >>> s = BlockSchedule(block_steps=10, total_steps=40, frozen_blocks=1)
        >>> [d for d in range(1, 41) if s.is_update(d)]
        [10, 20, 30]
        >>> s.is_frozen(30), s.is_frozen(29)
        (True, False)
    """

    block_steps: int
    total_steps: int
    frozen_blocks: int = 0
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.block_steps < 1:
            raise InputError(f"block_steps must be >= 1, got {self.block_steps}.")
        if self.total_steps < 1:
            raise InputError(f"total_steps must be >= 1, got {self.total_steps}.")
        if self.frozen_blocks < 0:
            raise InputError(f"frozen_blocks must be >= 0, got {self.frozen_blocks}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}."
            )
        if self.frozen_blocks >= self.num_blocks:
            raise InputError(
                f"frozen_blocks ({self.frozen_blocks}) must be smaller than the number "
                f"of ADMM blocks ({self.num_blocks} blocks of {self.block_steps} steps "
                f"in {self.total_steps} steps): lengthen the run or shorten the blocks."
            )

    @property
    def num_blocks(self) -> int:
        """Blocks in the run (the last one may be shorter)."""
        return math.ceil(self.total_steps / self.block_steps)

    @property
    def last_update(self) -> int:
        """Steps done when the last ADMM update happens (0: never)."""
        return min(self.num_blocks - 1, self.num_blocks - self.frozen_blocks) * (
            self.block_steps
        )

    def block_of(self, step: int) -> int:
        """The 0-based block of step ``step``."""
        return min(step // self.block_steps, self.num_blocks - 1)

    def block_range(self, block: int) -> range:
        """The step indices of ``block``."""
        start = block * self.block_steps
        return range(start, min(start + self.block_steps, self.total_steps))

    def is_update(self, done: int) -> bool:
        """True when an ADMM update follows the ``done``-th step."""
        return 0 < done <= self.last_update and done % self.block_steps == 0

    def is_frozen(self, step: int) -> bool:
        """True when step ``step`` is in the frozen-mask phase."""
        return self.frozen_blocks > 0 and step >= self.last_update

    def mask_is_final(self, step: int) -> bool:
        """True when no ADMM update comes after step ``step`` any more."""
        return step >= self.last_update

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step`` for the block schedules.

        ``block_step``: 1, 0.1, 0.01 over the thirds of every block (the paper's).
        ``block_cosine``: a cosine from 1 to 0.001 over every block. ``cosine`` is
        MoCo v2's schedule and is not computed here (see ``MoCoV2``).
        """
        position = step - self.block_of(step) * self.block_steps
        length = len(self.block_range(self.block_of(step)))
        if self.lr_schedule == "block_step":
            stage = min(BLOCK_LR_STAGES - 1, position * BLOCK_LR_STAGES // length)
            return BLOCK_LR_FACTOR**stage
        if self.lr_schedule == "block_cosine":
            if length == 1:
                return 1.0
            return cosine_schedule(position, length, 1.0, BLOCK_COSINE_END)
        raise InputError("lr_factor is defined for the block schedules only.")

    def block_lr_sum(self, block: int, lr_at: Callable[[int], float]) -> float:
        """``Σ lr_t`` over the steps of ``block``, for a learning rate ``lr_at(t)``."""
        return sum(lr_at(t) for t in self.block_range(block))

    def derived_rho(
        self,
        block: int,
        response: float,
        lr_at: Callable[[int], float],
        sgd_momentum: float,
    ) -> float:
        """The ρ for which ``block`` has the predicted θ-response ``response``.

        ``ρ = R · (1 − β) / Σ_block lr_t``: with the paper's block schedule every block
        gets the same ρ; with one cosine over the run ρ grows as the rate falls.

        Raises:
            ValueError: When the block is too short for that response: the penalty's
                step ``ρ · lr`` would exceed SGD momentum's critical damping
                ``(1 − √β)²``, so θ_q would overshoot ``Z − U`` and oscillate around
                it instead of arriving (measured: negative responses, a cycling
                mask). The message gives the shortest block that works.
        """
        total = self.block_lr_sum(block, lr_at)
        if total <= 0:
            raise InputError(f"block {block} has no learning rate to move θ_q.")
        rho = response * (1.0 - sgd_momentum) / total
        steps = self.block_range(block)
        peak = max(lr_at(t) for t in steps)
        critical = critical_damping(sgd_momentum)
        if rho * peak > critical:
            mean_over_peak = total / (len(steps) * peak)
            # 10 % margin: the rate's shape (its thirds, its cosine) shifts slightly
            # with the block length.
            shortest = math.ceil(
                1.1 * response * (1.0 - sgd_momentum) / (mean_over_peak * critical)
            )
            raise InputError(
                f"ADMM blocks of {len(steps)} steps are too short for a response of "
                f"{response:g} with SGD momentum {sgd_momentum:g}: the penalty's step "
                f"rho*lr = {rho * peak:.3g} exceeds the critical damping "
                f"(1 - sqrt(momentum))^2 = {critical:.3g}, so the query encoder would "
                f"overshoot Z - U and the mask would not settle. Use blocks of at "
                f"least {shortest} steps (mcp.admm_interval) or a smaller "
                f"mcp.rho_response."
            )
        return rho

    def predicted_response(
        self,
        block: int,
        rho: float,
        lr_at: Callable[[int], float],
        sgd_momentum: float,
    ) -> float:
        """``R = ρ · Σ_block lr_t / (1 − β)``."""
        return rho * self.block_lr_sum(block, lr_at) / (1.0 - sgd_momentum)
