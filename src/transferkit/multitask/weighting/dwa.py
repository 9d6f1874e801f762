"""Dynamic weight average (Liu, Johns and Davison, CVPR 2019)."""

from __future__ import annotations

import torch

from .base import LossWeighting, register


@register
class DynamicWeightAverage(LossWeighting):
    """``w_i(t) = K softmax_i(r_i(t-1) / T)``, with ``r_i(t-1) = L_i(t-1) / L_i(t-2)`` the ratio of
    task i's mean training loss over the last two epochs.

    Liu et al. 2019, "End-to-End Multi-Task Learning with Attention" (MTAN). A task whose loss falls
    slowly gets more weight. The first two epochs use weight 1 (no ratio yet). T = 2 as in the paper.
    """

    name = "dwa"
    summary = "weights from each task's rate of loss decrease over the last two epochs (Liu et al. 2019)"
    temperature = 2.0

    def __init__(self, tasks, priors=None):
        super().__init__(tasks, priors)
        k = len(self.tasks)
        # Buffers, so a resumed run continues with the same history.
        self.register_buffer("epoch_loss_sum", torch.zeros(k))
        self.register_buffer("epoch_loss_count", torch.zeros(k))
        self.register_buffer("last_two", torch.full((2, k), float("nan")))  # rows: epoch t-2, epoch t-1
        self.register_buffer("weights", torch.ones(k))

    def start_epoch(self, epoch: int) -> None:
        if self.epoch_loss_count.sum() > 0:  # close the previous epoch
            mean = self.epoch_loss_sum / self.epoch_loss_count.clamp(min=1)
            mean = torch.where(self.epoch_loss_count > 0, mean, self.last_two[1])
            self.last_two.copy_(torch.stack([self.last_two[1], mean]))
            self.epoch_loss_sum.zero_()
            self.epoch_loss_count.zero_()
        ratio = self.last_two[1] / self.last_two[0]
        if torch.isfinite(ratio).all():
            self.weights.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))
        else:
            self.weights.fill_(1.0)

    def combine(self, losses, shared) -> torch.Tensor:
        total = 0.0
        for task, loss in losses.items():
            i = self.index(task)
            self.epoch_loss_sum[i] += loss.detach().float()
            self.epoch_loss_count[i] += 1
            total = total + self.prior(task) * self.weights[i] * loss
        return total

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, (self.priors * self.weights).tolist()))
