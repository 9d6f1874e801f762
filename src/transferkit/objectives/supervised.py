"""Supervised classification: cross-entropy against the batch's labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyObjective:
    """``loss = CE(model(inputs), labels)``, optionally class-weighted and with label smoothing."""

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
        self.label_smoothing = label_smoothing
        self.weight = weight

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(**batch["inputs"])
        weight = None if self.weight is None else self.weight.to(logits.device)
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=weight, label_smoothing=self.label_smoothing)
        return loss, logits


def balanced_class_weights(labels, num_classes: int) -> torch.Tensor:
    """``n / (k * count_c)`` per class (scikit-learn's "balanced"): rare classes weigh more."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    return (counts.sum() / (num_classes * counts.clamp(min=1))).float()
