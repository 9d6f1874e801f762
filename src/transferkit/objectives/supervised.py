"""Supervised classification: cross-entropy against the batch's labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyObjective:
    """``loss = CE(model(inputs) + logit_offset, labels)``, optionally class-weighted and with label smoothing.

    ``logit_offset`` (see ``class_log_prior``) is added for the loss only: the returned logits, and so the
    metrics and the saved model's predictions, are the model's own."""

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
                 logit_offset: torch.Tensor | None = None):
        self.label_smoothing = label_smoothing
        self.weight = weight
        self.logit_offset = logit_offset

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(**batch["inputs"])
        return cross_entropy(logits, batch["labels"], self.weight, self.label_smoothing, self.logit_offset), logits


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0, logit_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy in float32 on ``logits + logit_offset``, with optional class weights and label smoothing:
    the loss every supervised objective here takes."""
    logits = logits.float()
    if logit_offset is not None:
        logits = logits + logit_offset.to(logits.device)
    return F.cross_entropy(logits, labels, weight=None if weight is None else weight.to(logits.device),
                           label_smoothing=label_smoothing)


def balanced_class_weights(labels, num_classes: int) -> torch.Tensor:
    """``n / (k * count_c)`` per class (scikit-learn's "balanced"): rare classes weigh more."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    return (counts.sum() / (num_classes * counts.clamp(min=1))).float()


def class_log_prior(labels, num_classes: int, scale: float = 1.0) -> torch.Tensor:
    """``scale * log(count_c / n)`` per class: the offset of the logit-adjusted loss (Menon et al. 2021, "Long-tail
    learning via logit adjustment"; under federated label skew, FedLC, Zhang et al. 2022). Training on
    ``logits + offset`` lets the prior explain the class frequencies, so the logits themselves learn to rank
    classes as if they were balanced. A class absent from ``labels`` counts as one example: its offset is very
    negative but finite (an infinite one would make label smoothing's loss infinite)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    return (scale * torch.log(counts.clamp(min=1) / counts.sum())).float()
