"""The learning-rate range test: raise the LR exponentially over a few hundred steps and watch the loss.

Smith 2017, "Cyclical Learning Rates for Training Neural Networks"; the fastai ``lr_find`` recipe.
The suggestion is the LR where the smoothed loss falls fastest, which lies safely below the LR where
training blows up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import Batches


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # exponentially smoothed, bias-corrected
    suggestion: float


def range_test(model: nn.Module, param_groups: list[dict], objective, batches: Batches, *, start_lr: float = 1e-7,
               end_lr: float = 1.0, steps: int = 100, smoothing: float = 0.05, diverge_factor: float = 4.0,
               set_train_mode=None, device: torch.device | None = None) -> RangeTest:
    """Train ``steps`` batches with the LR of every group going from ``start_lr`` to ``end_lr``; the model changes."""
    device = device or torch.device("cpu")
    model.to(device)
    for group in param_groups:
        group["lr"] = start_lr
    optimizer = torch.optim.AdamW(param_groups)
    factor = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, average, best = [], [], 0.0, math.inf
    (set_train_mode or (lambda m: m.train()))(model)
    epoch, iterator = 0, batches.iterate(0)
    for step in tqdm(range(steps), desc="lr range test", unit="step", mininterval=1.0, dynamic_ncols=True):
        try:
            batch = next(iterator)
        except StopIteration:
            epoch += 1
            iterator = batches.iterate(epoch)
            batch = next(iterator)
        batch = {"inputs": {k: v.to(device) for k, v in batch["inputs"].items()}, "labels": batch["labels"].to(device)}
        lr = start_lr * factor ** step
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, _ = objective(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        average = smoothing * value + (1 - smoothing) * average
        smoothed = average / (1 - (1 - smoothing) ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if step > 10 and smoothed > diverge_factor * best:
            break
    return RangeTest(lrs, losses, suggest(lrs, losses))


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The LR of the steepest descent of the smoothed loss (in log-LR), ignoring the noisy ends."""
    if len(lrs) < 5:
        return lrs[0] if lrs else float("nan")
    slopes = np.gradient(np.asarray(losses), np.log10(np.asarray(lrs)))
    skip = max(1, len(lrs) // 10)
    window = slopes[skip : len(slopes) - skip] if len(slopes) > 2 * skip + 2 else slopes
    return float(lrs[skip + int(np.argmin(window))] if len(window) != len(slopes) else lrs[int(np.argmin(window))])


def plot_range_test(result: RangeTest, path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="red", linestyle="--", label=f"suggested lr {result.suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
