"""Mixup: train on convex combinations of pairs of examples and of their labels."""

from __future__ import annotations

import torch
from torch import nn

from .supervised import cross_entropy


class MixupObjective:
    """``lam * CE(f(x_mix), y_a) + (1 - lam) * CE(f(x_mix), y_b)`` with ``lam ~ Beta(alpha, alpha)``.

    Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization". Images are mixed at the input;
    texts, whose tokens cannot be averaged, at the pooled features fed to the head ("manifold mixup",
    Verma et al. 2019), as are cached features. Randomness comes from torch's global generator.

    Args:
        alpha: Beta distribution parameter; 0.2-0.4 is usual, larger mixes more.
        weight: optional per-class loss weights.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        logit_offset: added to the logits for the loss only (the logit-adjusted loss, ``class_log_prior``).
    """

    def __init__(self, alpha: float, weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 logit_offset: torch.Tensor | None = None):
        self.beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
        self.weight = weight
        self.label_smoothing = label_smoothing
        self.logit_offset = logit_offset

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels, self.weight, self.label_smoothing, self.logit_offset)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch["inputs"], batch["labels"]
        lam = float(self.beta.sample())
        perm = torch.randperm(labels.shape[0])
        if "pixel_values" in inputs:
            pixels = inputs["pixel_values"]
            logits = model(**{**inputs, "pixel_values": lam * pixels + (1 - lam) * pixels[perm]})
        else:
            features = inputs["features"] if "features" in inputs else model.backbone(**inputs)
            logits = model.head(lam * features + (1 - lam) * features[perm])
        loss = lam * self._loss(logits, labels) + (1 - lam) * self._loss(logits, labels[perm])
        return loss, logits
