"""The strategy registry: ``@register`` a class and it is reachable by name from the CLI and the API."""

from __future__ import annotations

from ..config import RunConfig
from ..errors import UserError
from .base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def create_strategy(config: RunConfig) -> Strategy:
    if config.strategy not in STRATEGIES:
        raise UserError(f"unknown strategy '{config.strategy}': choose one of {', '.join(sorted(STRATEGIES))}")
    strategy = STRATEGIES[config.strategy].from_config(config)
    strategy.freeze_batchnorm = config.freeze_batchnorm
    return strategy
