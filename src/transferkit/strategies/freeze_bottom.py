from __future__ import annotations

from torch import nn

from ..config import RunConfig
from ..errors import UserError
from ..model import Classifier
from .base import Strategy
from .registry import register


@register
class FreezeBottom(Strategy):
    """The k lowest layer groups (embeddings/stem first, then blocks) stay frozen; the rest trains.

    Lower layers hold the most general features (Yosinski et al. 2014, "How transferable are features
    in deep neural networks?"), so freezing them costs little accuracy and saves compute and memory.
    Default k: half of the backbone's layer groups.
    """

    name = "freeze-bottom"
    summary = "freeze the k lowest layer groups (--freeze-layers, default half), train the rest and the head"
    fixed_frozen_prefix = True

    def __init__(self, layers: int | None = None):
        self.layers = layers

    @classmethod
    def from_config(cls, config: RunConfig) -> "FreezeBottom":
        return cls(config.freeze_layers)

    def frozen_groups(self, model: Classifier) -> list[nn.Module]:
        groups = model.backbone.layer_groups()
        k = len(groups) // 2 if self.layers is None else self.layers
        if k > len(groups):
            raise UserError(
                f"'freeze_layers' is {k} but the backbone has {len(groups)} layer groups: choose at most {len(groups)}"
            )
        return groups[:k]
