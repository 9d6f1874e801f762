"""Learning-rate schedules: a linear warm-up, then linear, cosine or exponential decay, constant, or one-cycle."""

from __future__ import annotations

import math

import torch

FINAL_FACTOR = 0.01  # exponential decay ends at 1% of the peak LR


def schedule_factor(kind: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiple of the peak LR at ``step``."""
    if kind == "one-cycle":
        # Smith & Topin 2019: cosine rise from lr/25 over the warm-up, then cosine fall to lr/1e4.
        warmup_steps = warmup_steps or max(1, int(0.3 * total_steps))
        if step < warmup_steps:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / warmup_steps))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "exponential":
        return FINAL_FACTOR ** progress
    return 1.0 - progress


def make_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int):
    """A ``LambdaLR`` following ``schedule_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(kind, step, total_steps, warmup_steps))
