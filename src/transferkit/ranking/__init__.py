"""Choosing the pretrained model: transferability estimators, cost profiles, and the ``rank`` flow."""

from .rank import rank, rank_table
from .registry import ESTIMATORS, NotApplicable, register

__all__ = ["ESTIMATORS", "NotApplicable", "rank", "rank_table", "register"]
