"""GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018)."""

from __future__ import annotations

import torch
from torch import nn

from .base import LossWeighting, register


@register
class GradNorm(LossWeighting):
    """Learned weights w_i that balance the tasks' gradient norms on the last shared layer.

    Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks". With ``G_i = ||grad_W (w_i L_i)||`` on the last shared weight W, ``r_i`` the task's
    relative inverse training rate ``(L_i / L_i(0)) / mean_j (L_j / L_j(0))``, the weights descend
    ``sum_i |G_i - mean(G) r_i^alpha|`` (the target held constant) and are renormalised to sum to K.
    The model itself trains on ``sum_i w_i L_i`` with the weights held constant. alpha = 1.5 and the
    weights' learning rate 0.025, as in the paper.
    """

    name = "gradnorm"
    summary = "learned weights that equalise the tasks' gradient norms (Chen et al. 2018)"
    needs_shared_parameters = True
    alpha = 1.5
    weight_lr = 0.025

    def __init__(self, tasks, priors=None):
        super().__init__(tasks, priors)
        k = len(self.tasks)
        self.register_buffer("weights", torch.ones(k))
        self.register_buffer("initial_loss", torch.full((k,), float("nan")))

    def combine(self, losses, shared: list[nn.Parameter]) -> torch.Tensor:
        names = list(losses)
        index = torch.tensor([self.index(t) for t in names])
        weighted = torch.stack([self.prior(t) * losses[t] for t in names])
        matrices = [p for p in shared if p.ndim > 1 and p.requires_grad]
        if len(names) > 1 and matrices:
            self._update_weights(index, weighted, matrices[-1])
        return (self.weights[index] * weighted).sum()

    def _update_weights(self, index: torch.Tensor, weighted: torch.Tensor, last_shared: nn.Parameter) -> None:
        detached = weighted.detach().float()
        unseen = torch.isnan(self.initial_loss[index])
        self.initial_loss[index[unseen]] = detached[unseen].clamp(min=1e-8)
        norms = torch.stack([torch.linalg.vector_norm(torch.autograd.grad(loss, last_shared, retain_graph=True)[0]).float()
                             for loss in weighted])
        weights = self.weights[index].clone().requires_grad_(True)
        gradient_norms = weights * norms  # G_i; the norms themselves are constants for the weight update
        rate = detached / self.initial_loss[index]
        target = (gradient_norms.mean() * (rate / rate.mean()) ** self.alpha).detach()
        (step,) = torch.autograd.grad((gradient_norms - target).abs().sum(), weights)
        updated = (weights.detach() - self.weight_lr * step).clamp(min=1e-3)
        self.weights[index] = updated
        self.weights.mul_(len(self.tasks) / self.weights.sum())

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, (self.priors * self.weights).tolist()))
