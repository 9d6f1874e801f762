from __future__ import annotations

from torch import nn

from ..config import RunConfig
from ..model import Classifier
from .base import Strategy
from .registry import register


HEAD_LR_FACTOR = 10.0


@register
class GradualUnfreeze(Strategy):
    """Train the head first, then unfreeze one layer group from the top every ``unfreeze_every`` epochs.

    Howard & Ruder 2018, "Universal Language Model Fine-tuning for Text Classification" (ULMFiT):
    unfreezing from the top avoids wrecking the general lower layers while the new head is still random.
    Epoch 1 trains the head alone; epoch 2 adds the top group, epoch 3 the next, ... The optimiser holds
    every parameter from the start (frozen ones get no gradient, so they neither move nor decay).
    """

    name = "gradual-unfreeze"
    summary = "head first, then unfreeze one layer group from the top every --unfreeze-every epochs (ULMFiT)"

    def __init__(self, unfreeze_every: int = 1):
        self.unfreeze_every = unfreeze_every
        self.epoch = 0

    @classmethod
    def from_config(cls, config: RunConfig) -> "GradualUnfreeze":
        return cls(config.unfreeze_every or 1)

    def unfrozen_count(self, epoch: int) -> int:
        """How many groups (from the top) train in ``epoch`` (0-based)."""
        return epoch // self.unfreeze_every

    def frozen_groups(self, model: Classifier) -> list[nn.Module]:
        groups = model.backbone.layer_groups()
        trained = min(len(groups), self.unfrozen_count(self.epoch))
        return groups[: len(groups) - trained]

    def on_epoch_start(self, model: Classifier, epoch: int) -> None:
        self.epoch = epoch
        self.apply(model)

    def lr_blocks(self, model: Classifier, lr: float, head_lr: float | None) -> list[tuple[list[nn.Parameter], float]]:
        # The head trains alone first from random weights, so by default it gets 10x the backbone's LR
        # (as the head-only stage of fastai's fine_tune runs at a higher LR than the unfrozen stages).
        return [(list(model.backbone.parameters()), lr), (list(model.head.parameters()), head_lr or HEAD_LR_FACTOR * lr)]
