"""Tests of lightly_mcp.methods.distill: SEED's loss against a by-hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from lightly_mcp.errors import InputError
from lightly_mcp.methods.distill import (
    SEED_STUDENT_TEMPERATURE,
    SEED_TEACHER_TEMPERATURE,
    SEEDLoss,
)


def _by_hand(
    student: list[list[float]],
    teacher: list[list[float]],
    queue: list[list[float]],
    tau_s: float,
    tau_t: float,
) -> float:
    """SEED's loss with plain Python floats: for each image, the cross-entropy of
    the student's softmax over [t; queue] against the teacher's."""

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    def softmax(z: list[float]) -> list[float]:
        top = max(z)
        e = [math.exp(x - top) for x in z]
        return [x / sum(e) for x in e]

    total = 0.0
    for s_raw, t_raw in zip(student, teacher):
        s, t = unit(s_raw), unit(t_raw)
        keys = [t, *queue]
        p_t = softmax([dot(t, k) / tau_t for k in keys])
        p_s = softmax([dot(s, k) / tau_s for k in keys])
        total += -sum(a * math.log(b) for a, b in zip(p_t, p_s))
    return total / len(student)


def test_loss_matches_a_by_hand_computation_and_enqueues_the_teacher() -> None:
    torch.manual_seed(0)
    loss_fn = SEEDLoss(queue_size=6, dim=4, teacher_temperature=0.5)
    queue = loss_fn.memory_bank.bank.clone()  # (6, 4), unit rows
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    loss = loss_fn(student, teacher)
    expected = _by_hand(student.tolist(), teacher.tolist(), queue.tolist(), 0.2, 0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The teacher's normalised embeddings entered the queue, the student's did not.
    bank = loss_fn.memory_bank.bank
    torch.testing.assert_close(bank[:3], torch.nn.functional.normalize(teacher, dim=1))
    torch.testing.assert_close(bank[3:], queue[3:])
    # The next batch is compared with the updated queue.
    student2, teacher2 = torch.randn(3, 4), torch.randn(3, 4)
    expected2 = _by_hand(
        student2.tolist(), teacher2.tolist(), bank.clone().tolist(), 0.2, 0.5
    )
    assert float(loss_fn(student2, teacher2)) == pytest.approx(expected2, rel=1e-5)


def test_gradient_reaches_only_the_student() -> None:
    loss_fn = SEEDLoss(queue_size=8, dim=4)
    student = torch.randn(2, 4, requires_grad=True)
    teacher = torch.randn(2, 4, requires_grad=True)
    loss_fn(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_published_temperatures_make_the_target_the_teacher_itself() -> None:
    assert (SEED_STUDENT_TEMPERATURE, SEED_TEACHER_TEMPERATURE) == (0.2, 1e-4)
    loss_fn = SEEDLoss(queue_size=16, dim=8)
    teacher = torch.randn(4, 8)
    # A student equal to the teacher scores the InfoNCE of its own positive at
    # τ_s: the teacher's target is one-hot on itself at τ_t = 1e-4.
    queue = loss_fn.memory_bank.bank.clone()
    t = torch.nn.functional.normalize(teacher, dim=1)
    logits = torch.cat([torch.ones(4, 1), t @ queue.T], dim=1) / 0.2
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=int))
    torch.testing.assert_close(loss_fn(teacher.clone(), teacher), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queue_size": 0}, "queue_size must be >= 1"),
        ({"student_temperature": 0.0}, "student_temperature must be > 0"),
        ({"teacher_temperature": -1.0}, "teacher_temperature must be > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        SEEDLoss(**kwargs)


def test_shapes_must_agree() -> None:
    with pytest.raises(InputError, match=r"\(2, 4\) and teacher embeddings \(2, 5\)"):
        SEEDLoss(queue_size=4, dim=4)(torch.randn(2, 4), torch.randn(2, 5))
