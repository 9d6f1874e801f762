from __future__ import annotations

from torch import nn

from ..config import RunConfig
from ..model import Classifier
from .base import Strategy
from .registry import register


@register
class LinearProbe(Strategy):
    """The pretrained backbone stays frozen; only a linear head trains, on features computed once.

    The standard measure of how good pretrained features are for a task (e.g. Kornblith et al. 2019,
    "Do Better ImageNet Models Transfer Better?").
    """

    name = "linear-probe"
    summary = "freeze the backbone, cache its features once, train only the new head"
    uses_feature_cache = True

    @classmethod
    def from_config(cls, config: RunConfig) -> "LinearProbe":
        return cls()

    def frozen_groups(self, model: Classifier) -> list[nn.Module]:
        return [model.backbone]
