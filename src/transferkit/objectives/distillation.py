"""Knowledge distillation: the student learns from the labels and from a fine-tuned teacher's soft predictions.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network":
``loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.
The T^2 factor keeps the soft term's gradients on the scale of the hard term's as T changes. The
teacher's logits are computed once for the training split and looked up by example index, so the
teacher costs one forward pass over the data rather than one per epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, hard_loss: torch.Tensor | None = None) -> torch.Tensor:
    """The KD loss for one batch; ``hard_loss`` replaces plain CE when given (e.g. class-weighted)."""
    if hard_loss is None:
        hard_loss = F.cross_entropy(student_logits.float(), labels)
    if alpha >= 1.0:
        return hard_loss
    soft = F.kl_div(F.log_softmax(student_logits.float() / temperature, dim=-1),
                    F.log_softmax(teacher_logits.float() / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    return alpha * hard_loss + (1.0 - alpha) * soft


class DistillationObjective:
    """Wraps a supervised objective (its loss is the hard term) and adds the teacher's soft term.

    ``teacher_logits`` has one row per training example, in the training split's order.
    """

    def __init__(self, hard: nn.Module, teacher_logits: torch.Tensor, alpha: float = 0.5, temperature: float = 2.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.hard = hard
        self.teacher_logits = teacher_logits.float()
        self.alpha = alpha
        self.temperature = temperature

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        unlabelled = labels < 0  # transfer examples: the teacher's soft labels only
        if unlabelled.any():
            logits = model(**batch["inputs"])
            known = ~unlabelled
            hard_loss = (self.hard(_Fixed(logits[known]), {"inputs": {}, "labels": labels[known]})[0]
                         if known.any() else logits.new_zeros(()))
        else:
            hard_loss, logits = self.hard(model, batch)
        teacher = self.teacher_logits[torch.as_tensor(batch["indices"], dtype=torch.long)].to(logits.device)
        return distillation_loss(logits, teacher, labels, self.alpha, self.temperature, hard_loss), logits


class _Fixed(nn.Module):
    """Already computed logits, so the wrapped supervised objective scores a subset of the batch."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self) -> torch.Tensor:
        return self.logits
