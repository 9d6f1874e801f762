"""Penalties added to a task loss: L2-SP (pull towards the pretrained weights) and L1."""

from __future__ import annotations

import torch
from torch import nn


class L2SPPenalty:
    """``alpha / 2 * sum ||w - w0||^2`` over the trainable backbone parameters, w0 the pretrained weights.

    Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks". Plain weight decay pulls weights towards zero, which forgets what pretraining learnt;
    L2-SP pulls them towards where they started. It replaces weight decay on the backbone (the head,
    which has no pretrained value, keeps ordinary weight decay).

    Args:
        backbone: the backbone at its pretrained weights; they are copied now.
        alpha: penalty strength (the paper uses 0.01-0.1).

    Example::

        penalty = L2SPPenalty(model.backbone, alpha=0.01)
        loss = task_loss + penalty(model)
    """

    def __init__(self, backbone: nn.Module, alpha: float):
        self.alpha = alpha
        self.reference = {name: p.detach().clone() for name, p in backbone.named_parameters()}

    def __call__(self, model: nn.Module) -> torch.Tensor:
        total = None
        for name, parameter in model.backbone.named_parameters():
            if parameter.requires_grad:
                term = (parameter - self.reference[name].to(parameter.device)).pow(2).sum()
                total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.alpha * total


class L1Penalty:
    """``strength * sum |w|`` over all trainable weight matrices (not biases or norms): sparse weights."""

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = [p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim > 1]
        return self.strength * torch.stack(terms).sum() if terms else torch.zeros(())


class RegularisedObjective:
    """A base objective plus penalties on the model's parameters."""

    def __init__(self, base, penalties: list):
        self.base = base
        self.penalties = penalties

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.base(model, batch)
        for penalty in self.penalties:
            loss = loss + penalty(model)
        return loss, logits
