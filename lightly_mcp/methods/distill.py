"""SEED's self-supervised distillation loss (Fang et al., ICLR 2021), label-free.

A student learns to give the same similarity distribution over a queue of the
teacher's embeddings as the teacher does: for each image, the teacher's embedding
``t`` and the student's ``s`` (both L2-normalised, the same augmented view) are
compared with ``[t; queue]``, the teacher's distribution (temperature τ_t) is the
target of a cross-entropy on the student's (temperature τ_s), and ``t`` enters the
queue afterwards. SEED's published temperatures are the defaults: τ_s = 0.2 (its
``--temp``), τ_t = 1e-4 (its ``--distill-t``), which makes the target nearly one-hot
on the teacher's own embedding, so the queue acts as the negatives of a contrastive
loss whose keys come from the teacher. The queue is lightly's ``MemoryBankModule``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules.memory_bank import MemoryBankModule
from torch import Tensor, nn

from lightly_mcp.errors import InputError

#: SEED's student temperature (its ``--temp``) and teacher temperature
#: (``--distill-t``).
SEED_STUDENT_TEMPERATURE = 0.2
SEED_TEACHER_TEMPERATURE = 1e-4


class SEEDLoss(nn.Module):
    """Cross-entropy between the teacher's and the student's similarity
    distributions over ``[teacher embedding; queue]``.

    Args:
        queue_size: Teacher embeddings kept as the instances to compare with.
        dim: Embedding dimension (student and teacher alike).
        student_temperature: τ_s.
        teacher_temperature: τ_t.
        gather_distributed: Enqueue the embeddings of all devices.

    Examples:
        >>> loss_fn = SEEDLoss(queue_size=4096, dim=128)
        >>> loss = loss_fn(student_projection, teacher_projection.detach())
    """

    def __init__(
        self,
        queue_size: int = 4096,
        dim: int = 128,
        student_temperature: float = SEED_STUDENT_TEMPERATURE,
        teacher_temperature: float = SEED_TEACHER_TEMPERATURE,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise InputError(f"queue_size must be >= 1, got {queue_size}.")
        for name, value in (
            ("student_temperature", student_temperature),
            ("teacher_temperature", teacher_temperature),
        ):
            if not value > 0:
                raise InputError(f"{name} must be > 0, got {value}.")
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.memory_bank = MemoryBankModule(
            size=(queue_size, dim),
            gather_distributed=gather_distributed,
            feature_dim_first=False,
        )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss of a batch; enqueues the teacher's embeddings.

        Args:
            student: ``(N, dim)`` student embeddings (gradients flow).
            teacher: ``(N, dim)`` teacher embeddings of the same images (detached
                here).

        Returns:
            The mean cross-entropy over the batch.
        """
        if student.shape != teacher.shape:
            raise InputError(
                f"student embeddings {tuple(student.shape)} and teacher embeddings "
                f"{tuple(teacher.shape)} differ in shape."
            )
        s = F.normalize(student, dim=1)
        t = F.normalize(teacher.detach(), dim=1)
        _, queue = self.memory_bank(t, update=True)  # the queue before this batch
        queue = queue.to(t.dtype)
        s_logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1)
        t_logits = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1)
        target = F.softmax(t_logits / self.teacher_temperature, dim=1)
        log_p = F.log_softmax(s_logits / self.student_temperature, dim=1)
        return -(target * log_p).sum(dim=1).mean()
