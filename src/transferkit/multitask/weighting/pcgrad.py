"""PCGrad, gradient surgery (Yu, Kumar, Gupta, Levine, Hausman and Finn, NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import nn

from .base import LossWeighting, register


def project_conflicting(gradients: list[torch.Tensor], generator: torch.Generator | None = None,
                        counts: list[int] | None = None) -> list[torch.Tensor]:
    """PCGrad on flat gradients: each task's gradient loses its component along every other task's gradient
    it conflicts with (negative dot product), the others visited in random order. ``counts``, if given,
    gains [pairs compared, pairs projected]."""
    projected = []
    for i, gradient in enumerate(gradients):
        g = gradient.clone()
        others = [j for j in torch.randperm(len(gradients), generator=generator).tolist() if j != i]
        for j in others:
            dot = torch.dot(g, gradients[j])
            if counts is not None:
                counts[0] += 1
                counts[1] += int(dot < 0)
            if dot < 0:
                g -= dot / gradients[j].pow(2).sum().clamp(min=1e-20) * gradients[j]
        projected.append(g)
    return projected


@register
class PCGrad(LossWeighting):
    """Sum of the task gradients after projecting away their conflicts, on the shared parameters.

    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning". Task heads get their own task's gradient
    unchanged. Costs one extra backward pass per task through the shared backbone.
    """

    name = "pcgrad"
    summary = "project away conflicting components of the task gradients on the shared backbone (Yu et al. 2020)"
    needs_shared_parameters = True

    def __init__(self, tasks, priors=None):
        super().__init__(tasks, priors)
        self.generator = torch.Generator().manual_seed(0)
        self.counts = [0, 0]  # pairs compared, pairs in conflict (this epoch)

    def combine(self, losses, shared: list[nn.Parameter]) -> torch.Tensor:
        weighted = [self.prior(t) * loss for t, loss in losses.items()]
        total = sum(weighted)
        trainable = [p for p in shared if p.requires_grad]
        if len(weighted) < 2 or not trainable:
            return total
        flat = []
        for loss in weighted:
            grads = torch.autograd.grad(loss, trainable, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for g, p in zip(grads, trainable)]))
        correction = sum(project_conflicting(flat, self.generator, self.counts)) - sum(flat)
        # A term whose value is 0 and whose gradient on the shared parameters is the correction: the
        # backward pass of the returned loss then gives the heads their plain gradients and the shared
        # parameters the projected sum.
        offset, surrogate = 0, 0.0
        for p in trainable:
            piece = correction[offset: offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            term = (p * piece).sum()
            surrogate = surrogate + term - term.detach()
        return total + surrogate

    def epoch_stats(self) -> dict[str, float]:
        """The share of task-gradient pairs that conflicted (and were projected) this epoch."""
        compared, conflicting = self.counts
        self.counts = [0, 0]
        return {"pcgrad_conflict_share": conflicting / compared} if compared else {}
