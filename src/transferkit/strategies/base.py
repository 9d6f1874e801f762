"""A Strategy decides which parameters train, at which learning rate, and which modules stay in eval mode."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..model import Classifier


def _no_decay(parameter: nn.Parameter) -> bool:
    # Biases and normalisation scales (all 1-D) are not decayed, as in BERT and timm: decay would only shrink them.
    return parameter.ndim <= 1


class Strategy:
    """Base class. Subclasses set ``name``/``summary`` and override ``frozen_groups``.

    ``uses_feature_cache``: the backbone is entirely frozen, so its features are computed once and
    only the head trains on them.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_feature_cache: ClassVar[bool] = False

    def frozen_groups(self, model: Classifier) -> list[nn.Module]:
        """The backbone layer groups that do not train."""
        return []

    def apply(self, model: Classifier) -> None:
        """Set ``requires_grad`` on every parameter of ``model``."""
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        for group in self.frozen_groups(model):
            for parameter in group.parameters():
                parameter.requires_grad_(False)

    def set_train_mode(self, model: Classifier) -> None:
        """``model.train()``, but frozen layers stay in eval mode so BatchNorm statistics and dropout stay pretrained."""
        model.train()
        for group in self.frozen_groups(model):
            group.eval()

    def param_groups(self, model: Classifier, lr: float, head_lr: float | None, weight_decay: float) -> list[dict]:
        """Optimiser groups: backbone and head, each split into decayed and non-decayed parameters."""
        groups = []
        for part, part_lr in ((model.backbone, lr), (model.head, head_lr or lr)):
            decay, no_decay = [], []
            for parameter in part.parameters():
                if parameter.requires_grad:
                    (no_decay if _no_decay(parameter) else decay).append(parameter)
            if decay:
                groups.append({"params": decay, "lr": part_lr, "weight_decay": weight_decay})
            if no_decay:
                groups.append({"params": no_decay, "lr": part_lr, "weight_decay": 0.0})
        return groups

    @staticmethod
    def trainable_parameters(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
