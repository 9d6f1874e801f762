"""Supervised classification: cross-entropy against the batch's labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyObjective:
    """``loss = CE(model(inputs), labels)``, optionally with label smoothing."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(**batch["inputs"])
        loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        return loss, logits
