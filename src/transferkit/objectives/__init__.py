"""Objectives: how a batch becomes a loss. The engine calls ``objective(model, batch)``."""

from .mixup import MixupObjective
from .regularisers import L1Penalty, L2SPPenalty, RegularisedObjective
from .supervised import CrossEntropyObjective, balanced_class_weights, class_log_prior

__all__ = ["CrossEntropyObjective", "L1Penalty", "L2SPPenalty", "MixupObjective", "RegularisedObjective",
           "balanced_class_weights", "class_log_prior"]
