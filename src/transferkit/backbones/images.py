"""Image preprocessing shared by the vision backbones: uint8 arrays -> normalised float batches."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import ImageArray


def _to_chw_float(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W[, C]) uint8 -> (B, 3, H, W) float in [0, 1]; grey images are repeated to 3 channels."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(-1)
    tensor = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    channels = tensor.shape[1]
    if channels == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    elif channels == 4:
        tensor = tensor[:, :3]
    elif channels != 3:
        raise ValueError(f"images have {channels} channels; 1, 3 or 4 are supported")
    return tensor


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-2:] == (size, size):
        return batch
    downsampling = batch.shape[-1] > size or batch.shape[-2] > size
    return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=downsampling)


def _center_square(image: np.ndarray) -> np.ndarray:
    """Crop the central square, so resizing keeps the aspect ratio (the usual eval transform)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def images_to_batch(source, indices: Sequence[int], size: int, mean: Sequence[float], std: Sequence[float],
                    channels_last: bool) -> torch.Tensor:
    """Collate images at ``indices`` into a normalised (B, 3, size, size) tensor."""
    if isinstance(source, ImageArray):
        batch = _resize(_to_chw_float(source.pixels[np.asarray(indices)]), size)
    else:
        batch = torch.cat([_resize(_to_chw_float(_center_square(source[i])[None]), size) for i in indices])
    mean_t = torch.tensor(mean, dtype=batch.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=batch.dtype).view(1, 3, 1, 1)
    batch = (batch - mean_t) / std_t
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch
