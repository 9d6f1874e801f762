"""Features of a frozen backbone, computed once per split and kept on disk.

A frozen backbone gives the same features every epoch, so a linear probe (or any head trained on a
frozen backbone) pays for the backbone's forward pass once instead of once per epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..backbones.base import Backbone
from .batches import Batches, map_in_order


@torch.no_grad()
def compute_features(backbone: Backbone, prepared, batch_size: int, description: str, device: torch.device,
                     forward: Callable[[dict], torch.Tensor] | None = None) -> torch.Tensor:
    """The backbone's features of every example in order (``forward(inputs)`` instead of ``backbone(**inputs)``
    where given, e.g. the features at several depths)."""
    backbone.eval().to(device)
    batches = Batches(prepared, None, backbone.collate, batch_size, lengths=backbone.lengths(prepared))
    return map_in_order(batches, forward or (lambda inputs: backbone(**inputs)), device, progress=description)


def cached_features(cache_dir: Path | None, split: str, backbone: Backbone, prepared, batch_size: int,
                    device: torch.device) -> torch.Tensor:
    """Features for ``split``, read from ``cache_dir`` when an earlier (interrupted) run computed them."""
    path = None if cache_dir is None else cache_dir / f"features-{split}.safetensors"
    if path is not None and path.is_file():
        features = load_file(path)["features"]
        if len(features) == len(prepared):
            return features
    features = compute_features(backbone, prepared, batch_size, f"features ({split})", device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        save_file({"features": features.contiguous()}, str(temporary))
        os.replace(temporary, path)
    return features
