"""Learning-rate schedules: linear warm-up, then linear decay, cosine decay or constant."""

from __future__ import annotations

import math

import torch


def make_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int):
    """A ``LambdaLR`` whose factor rises linearly over ``warmup_steps`` then follows ``kind`` to 0."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
