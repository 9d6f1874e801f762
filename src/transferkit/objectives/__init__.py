"""Objectives: how a batch becomes a loss. The engine calls ``objective(model, batch)``."""

from .regularisers import L1Penalty, L2SPPenalty, RegularisedObjective
from .supervised import CrossEntropyObjective

__all__ = ["CrossEntropyObjective", "L1Penalty", "L2SPPenalty", "RegularisedObjective"]
