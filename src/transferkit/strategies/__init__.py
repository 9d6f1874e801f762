"""Fine-tuning strategies, one small class per file, reachable by name through the registry."""

from . import (  # noqa: F401  (importing registers them)
    bitfit, discriminative_lr, freeze_bottom, full, gradual_unfreeze, linear_probe, peft_adapters)
from .base import Strategy
from .registry import STRATEGIES, create_strategy, register

__all__ = ["STRATEGIES", "Strategy", "create_strategy", "register"]
