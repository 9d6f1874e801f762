"""Loss weightings for multi-task training: small classes behind a registry.

Each turns the step's per-task losses into the loss whose gradient trains the model. Adding one is
one file with an ``@register``-ed subclass of ``LossWeighting`` and one test.
"""

from __future__ import annotations

from .base import WEIGHTINGS, LossWeighting, create_weighting, register
from . import dwa, equal, gradnorm, pcgrad, uncertainty  # noqa: F401  (each registers itself)

__all__ = ["WEIGHTINGS", "LossWeighting", "create_weighting", "register"]
