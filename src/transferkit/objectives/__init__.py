"""Objectives: how a batch becomes a loss. The engine calls ``objective(model, batch)``."""

from .supervised import CrossEntropyObjective

__all__ = ["CrossEntropyObjective"]
