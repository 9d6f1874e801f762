"""Fixed weights: the sum of the task losses, each times its prior (1 unless the task sets a weight)."""

from __future__ import annotations

import torch

from .base import LossWeighting, register


@register
class Equal(LossWeighting):
    """``sum_i w_i L_i`` with the tasks' fixed weights w_i (all 1 by default): the usual baseline."""

    name = "equal"
    summary = "sum of task losses (times each task's fixed 'weight', default 1)"

    def combine(self, losses: dict[str, torch.Tensor], shared) -> torch.Tensor:
        return sum(self.prior(t) * loss for t, loss in losses.items())
