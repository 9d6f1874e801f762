"""The LossWeighting interface and its registry."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...errors import UserError

WEIGHTINGS: dict[str, type["LossWeighting"]] = {}


def register(cls: type["LossWeighting"]) -> type["LossWeighting"]:
    WEIGHTINGS[cls.name] = cls
    return cls


class LossWeighting(nn.Module):
    """Combines the per-task losses of one training step.

    ``priors`` are the users' fixed task weights (1 by default); every weighting multiplies each task's
    loss by its prior before doing its own work. Trainable parameters of a weighting (uncertainty's
    log-variances) join the optimiser; state that must survive a resume lives in buffers, so it is
    checkpointed with the model.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_shared_parameters: ClassVar[bool] = False  # gradient-based methods act on the shared backbone

    def __init__(self, tasks: list[str], priors: dict[str, float] | None = None):
        super().__init__()
        self.tasks = list(tasks)
        priors = priors or {}
        self.register_buffer("priors", torch.tensor([float(priors.get(t, 1.0)) for t in self.tasks]))

    def index(self, task: str) -> int:
        return self.tasks.index(task)

    def prior(self, task: str) -> torch.Tensor:
        return self.priors[self.index(task)]

    def combine(self, losses: dict[str, torch.Tensor], shared: list[nn.Parameter]) -> torch.Tensor:
        """The loss to back-propagate, from ``losses`` (task -> scalar) of the tasks in this step."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def epoch_stats(self) -> dict[str, float]:
        """Extra values for the epoch's history record (then reset); none by default."""
        return {}

    def current_weights(self) -> dict[str, float]:
        """Each task's effective loss weight now (for the log and the plot)."""
        return {t: float(p) for t, p in zip(self.tasks, self.priors)}


def create_weighting(name: str, tasks: list[str], priors: dict[str, float] | None = None) -> LossWeighting:
    if name not in WEIGHTINGS:
        raise UserError(f"unknown loss weighting '{name}': choose one of {', '.join(sorted(WEIGHTINGS))}")
    return WEIGHTINGS[name](tasks, priors)
