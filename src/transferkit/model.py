"""A classifier is a backbone plus a new task head; both are plain ``nn.Module``s."""

from __future__ import annotations

import torch
from torch import nn

from .backbones.base import Backbone


class ClassificationHead(nn.Module):
    """Dropout then a linear layer, freshly initialised for the new task."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))


class Classifier(nn.Module):
    """``head(backbone(inputs))``; ``forward(features=...)`` skips the backbone for cached features."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.1, head: ClassificationHead | None = None):
        super().__init__()
        self.backbone = backbone
        # An existing head (a multi-task model's) is shared, not copied.
        self.head = head if head is not None else ClassificationHead(backbone.feature_dim, num_classes, dropout)

    def forward(self, features: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        if features is None:
            features = self.backbone(**inputs)
        return self.head(features)
