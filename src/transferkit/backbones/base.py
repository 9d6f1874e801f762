"""The Backbone interface: a pretrained feature extractor that carries its own preprocessing.

Like timm's ``pretrained_cfg``, everything needed to turn raw inputs into the tensors these weights
expect (tokenizer, max length, image size, normalisation) travels with the backbone and is saved
with it, so a reloaded model preprocesses exactly as it did in training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn


class Backbone(nn.Module, ABC):
    """A pretrained network mapping a batch to features of shape (batch, ``feature_dim``).

    Subclasses set ``modality`` ("text" or "image"), ``feature_dim`` and ``spec`` (a JSON-able dict
    from which ``rebuild`` recreates the architecture and preprocessing without the original weights).
    """

    modality: str
    feature_dim: int
    spec: dict[str, Any]

    @abstractmethod
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Features for a collated batch."""

    @abstractmethod
    def layer_groups(self) -> list[nn.Module]:
        """The backbone's layers from bottom (input side) to top, for freezing and per-layer LRs."""

    @abstractmethod
    def prepare(self, inputs: Any) -> Any:
        """One-off preprocessing of a whole split (e.g. tokenisation), so epochs never repeat it."""

    @abstractmethod
    def collate(self, prepared: Any, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The model inputs for the examples at ``indices`` of a prepared split."""

    @abstractmethod
    def save_preprocessing(self, directory: Path) -> None:
        """Write what ``rebuild`` needs besides the weights (configs, tokenizer files)."""

    @classmethod
    @abstractmethod
    def rebuild(cls, spec: dict[str, Any], directory: Path) -> "Backbone":
        """The same architecture and preprocessing, with untrained weights to be loaded into."""

    def lengths(self, prepared: Any) -> list[int] | None:
        """Per-example sequence lengths, for length-grouped batches; None when inputs have one size."""
        return None

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Which texts are longer than the model's maximum length (text backbones say; images never are)."""
        return [False] * len(texts)

    def source_probabilities(self, features: torch.Tensor) -> torch.Tensor | None:
        """The pre-training classifier's class probabilities for these features (LEEP, NCE need them);
        None for backbones without one (sentence encoders, hub models loaded without their head)."""
        return None

    def depth(self) -> int | None:
        """How many layers ``keep_bottom_layers`` cuts from, where ``features_by_depth`` gives the features of every
        cut from one pass; None where it does not."""
        return None

    def features_by_depth(self, depths: Sequence[int], **inputs: torch.Tensor) -> torch.Tensor:
        """The features this backbone cut to each of ``depths`` layers would give, side by side (batch x the sum of
        ``depth_widths(depths)``), from one pass (backbones whose ``depth()`` is not None)."""
        raise NotImplementedError(f"{type(self).__name__} cannot give the features of its lower layers")

    def depth_widths(self, depths: Sequence[int]) -> list[int]:
        """How wide the features at each of ``depths`` are, as ``features_by_depth`` lays them side by side."""
        return [self.feature_dim] * len(depths)

    def keep_bottom_layers(self, keep: int) -> None:
        """Keep only the ``keep`` lowest blocks (a smaller student); transformers and EfficientNet-Lite support it."""
        from ..errors import UserError

        raise UserError(f"model '{self.spec.get('name')}' does not support keep_layers: it applies to transformers "
                        f"models and EfficientNet-Lite")

    def add_adapters(self, adapter: dict[str, Any]) -> None:
        """Insert parameter-efficient adapters (LoRA, IA3); backbones that cannot take them say so."""
        from ..errors import UserError

        raise UserError(f"model '{self.spec.get('name')}' does not support {adapter['method']} adapters yet: "
                        f"use bitfit, freeze-bottom or discriminative-lr")

    def adapter_host(self) -> nn.Module | None:
        """The module adapters are added to (None when unsupported)."""
        return None

    def merge_adapters(self) -> None:
        """Fold adapters into the base weights; a no-op without adapters."""

    def save_adapters(self, directory: Path) -> None:
        """Write the adapters alone in PEFT's format; a no-op without adapters."""
