from __future__ import annotations

from torch import nn

from ..config import RunConfig
from ..errors import UserError
from ..model import Classifier
from .base import Strategy
from .registry import register


@register
class DiscriminativeLR(Strategy):
    """Layer-wise learning-rate decay: each layer group trains at ``lr_decay`` times the LR of the group above.

    Howard & Ruder 2018 (ULMFiT, "discriminative fine-tuning"); as "layer-wise LR decay" in BEiT and
    timm. Lower layers hold general features and move less. The head trains at ``head_lr`` (or ``lr``),
    the top backbone group at ``lr``, the group below at ``lr * lr_decay``, and so on down to the
    embeddings or stem. ``freeze_layers`` k additionally freezes the k lowest groups.
    """

    name = "discriminative-lr"
    summary = "layer-wise LR decay: each lower layer group at --lr-decay (default 0.8) times the LR above it"

    def __init__(self, lr_decay: float = 0.8, freeze_layers: int = 0):
        self.lr_decay = lr_decay
        self.freeze_layers = freeze_layers

    @classmethod
    def from_config(cls, config: RunConfig) -> "DiscriminativeLR":
        return cls(config.lr_decay if config.lr_decay is not None else 0.8, config.freeze_layers or 0)

    def frozen_groups(self, model: Classifier) -> list[nn.Module]:
        groups = model.backbone.layer_groups()
        if self.freeze_layers >= len(groups):
            raise UserError(
                f"'freeze_layers' is {self.freeze_layers} but the backbone has {len(groups)} layer groups: "
                f"choose fewer than {len(groups)} so that some layers train"
            )
        return groups[: self.freeze_layers]

    def group_lrs(self, model: Classifier, lr: float) -> list[float]:
        """The LR of each layer group, bottom to top."""
        n = len(model.backbone.layer_groups())
        return [lr * self.lr_decay ** (n - 1 - i) for i in range(n)]

    def lr_blocks(self, model: Classifier, lr: float, head_lr: float | None) -> list[tuple[list[nn.Parameter], float]]:
        groups = model.backbone.layer_groups()
        blocks, seen = [], set()
        for group, group_lr in zip(groups, self.group_lrs(model, lr)):
            parameters = [p for p in group.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in parameters)
            if parameters:
                blocks.append((parameters, group_lr))
        # Anything outside the layer groups (rare: e.g. an extra projection) trains at the top LR.
        rest = [p for p in model.backbone.parameters() if p.requires_grad and id(p) not in seen]
        if rest:
            blocks.append((rest, lr))
        blocks.append((list(model.head.parameters()), head_lr or lr))
        return blocks
