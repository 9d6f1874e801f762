"""Image backbones from Hugging Face transformers (ViT, DeiT, ConvNeXt, ResNet, ...) via AutoModel.

The normalisation and input size come from the checkpoint's own image-processor config; the pixel
work is done here on whole batches, which is much faster than the processor's per-image path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .adapters import PeftAdapterHost
from .base import Backbone
from .images import images_to_batch
from .layers import keep_bottom_layers, stack_layer_groups

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _processor_size(processor: Any) -> int:
    size = getattr(processor, "size", None) or {}
    if isinstance(size, int):
        return size
    size = dict(size)
    return int(size.get("height") or size.get("shortest_edge") or 224)


class HFVisionBackbone(PeftAdapterHost, Backbone):
    """A transformers vision encoder; features are the mean (or CLS token) of the last hidden state."""

    modality = "image"

    def __init__(self, encoder: nn.Module, processor: Any, spec: dict[str, Any]):
        super().__init__()
        self.encoder = encoder
        if getattr(self.encoder, "pooler", None) is not None and spec["pooling"] == "mean":
            self.encoder.pooler = None
        self.processor = processor
        self.spec = spec
        self.image_size = int(spec["image_size"])
        config = encoder.config
        hidden = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [None])[-1]
        self.feature_dim = int(hidden)

    @classmethod
    def from_pretrained(cls, source: str, *, image_size: int | None, pooling: str, name: str,
                        allow_pickle: bool = False) -> "HFVisionBackbone":
        from transformers import AutoImageProcessor, AutoModel

        processor = AutoImageProcessor.from_pretrained(source)
        encoder = AutoModel.from_pretrained(source, dtype=torch.float32, use_safetensors=not allow_pickle)
        spec = {
            "family": "hf-vision", "name": name, "pooling": pooling,
            "image_size": int(image_size or _processor_size(processor)),
            "mean": list(getattr(processor, "image_mean", None) or IMAGENET_MEAN),
            "std": list(getattr(processor, "image_std", None) or IMAGENET_STD),
        }
        return cls(encoder, processor, spec)

    @classmethod
    def rebuild(cls, spec: dict[str, Any], directory: Path) -> "HFVisionBackbone":
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory), dtype=torch.float32)
        backbone = cls(encoder, AutoImageProcessor.from_pretrained(directory), dict(spec))
        if spec.get("adapter"):
            backbone.add_adapters(spec["adapter"])
        return backbone

    def save_preprocessing(self, directory: Path) -> None:
        self.encoder.config.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        native = _native(self.encoder)
        kwargs = {"interpolate_pos_encoding": True} if native is not None and native != self.image_size else {}
        hidden = self.encoder(pixel_values=pixel_values, **kwargs).last_hidden_state
        if hidden.ndim == 4:  # convolutional encoders: (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        if self.spec["pooling"] == "cls":
            return hidden[:, 0]
        return hidden.mean(dim=1)

    def layer_groups(self) -> list[nn.Module]:
        return stack_layer_groups(self.encoder)

    def keep_bottom_layers(self, keep: int) -> None:
        keep_bottom_layers(self.encoder, keep)
        self.spec = {**self.spec, "layers_kept": keep}  # the saved config already rebuilds the shorter model

    def prepare(self, images):
        return images

    def collate(self, prepared, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"pixel_values": images_to_batch(prepared, indices, self.image_size, self.spec["mean"], self.spec["std"],
                                                channels_last=False)}


def _native(encoder: nn.Module) -> int | None:
    size = getattr(encoder.config, "image_size", None)
    return int(size) if isinstance(size, int) else None
