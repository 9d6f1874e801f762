"""Fine-tuning strategies, one small class per file, reachable by name through the registry."""

from . import freeze_bottom, full, linear_probe  # noqa: F401  (importing registers them)
from .base import Strategy
from .registry import STRATEGIES, create_strategy, register

__all__ = ["STRATEGIES", "Strategy", "create_strategy", "register"]
