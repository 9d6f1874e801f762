"""Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018)."""

from __future__ import annotations

import torch
from torch import nn

from .base import LossWeighting, register


@register
class Uncertainty(LossWeighting):
    """``sum_i exp(-s_i) L_i + s_i / 2`` with a learned log-variance s_i = log sigma_i^2 per task.

    Kendall et al. 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics": the classification form ``L / sigma^2 + log sigma``. A noisy (high-loss) task learns a
    large sigma and weighs less; the ``log sigma`` term keeps sigma from growing without bound.
    """

    name = "uncertainty"
    summary = "learned per-task log-variance weights (Kendall et al. 2018)"

    def __init__(self, tasks, priors=None):
        super().__init__(tasks, priors)
        self.log_variance = nn.Parameter(torch.zeros(len(self.tasks)))

    def combine(self, losses, shared) -> torch.Tensor:
        total = 0.0
        for task, loss in losses.items():
            s = self.log_variance[self.index(task)]
            total = total + self.prior(task) * (torch.exp(-s) * loss + 0.5 * s)
        return total

    def current_weights(self) -> dict[str, float]:
        weights = (self.priors * torch.exp(-self.log_variance.detach())).tolist()
        return dict(zip(self.tasks, weights))
