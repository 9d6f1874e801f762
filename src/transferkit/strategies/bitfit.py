from __future__ import annotations

from ..config import RunConfig
from ..model import Classifier
from .base import Strategy
from .registry import register


@register
class BitFit(Strategy):
    """Only the backbone's biases and normalisation parameters train, with the new head.

    Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
    Language-models". Here "biases" means every 1-D parameter (biases, LayerNorm/BatchNorm scales and
    shifts), so it also applies to convolutional networks whose convolutions have no bias.
    """

    name = "bitfit"
    summary = "train only the backbone's biases and norm parameters (about 0.1% of a transformer), plus the head"
    default_lr = 5e-4  # the paper's range is 1e-4 to 1e-3: so few parameters need larger steps than full fine-tuning

    @classmethod
    def from_config(cls, config: RunConfig) -> "BitFit":
        return cls()

    def apply(self, model: Classifier) -> None:
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(parameter.ndim <= 1)
        for parameter in model.head.parameters():
            parameter.requires_grad_(True)
