from __future__ import annotations

from ..config import RunConfig
from .base import Strategy
from .registry import register


@register
class FullFineTuning(Strategy):
    """Every parameter of the backbone and the head trains."""

    name = "full"
    summary = "fine-tune every layer of the backbone together with the new head"

    @classmethod
    def from_config(cls, config: RunConfig) -> "FullFineTuning":
        return cls()
