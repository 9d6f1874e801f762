"""Train-time augmentation of collated batches: image flips, crops and small affine warps, Gaussian
pixel noise, and random token masking for text. Randomness comes from torch's global generator, whose
state every checkpoint saves, so a resumed run draws the same augmentations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def flip_images(pixels: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(pixels.shape[0]) < p
    if flip.any():
        pixels = pixels.clone()
        pixels[flip] = pixels[flip].flip(-1)
    return pixels


def pad_and_crop(pixels: torch.Tensor, fraction: float = 0.125) -> torch.Tensor:
    """Reflect-pad by ``fraction`` of the side and crop back at a random offset (one offset per batch)."""
    pad = max(1, int(round(pixels.shape[-1] * fraction)))
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[..., top : top + pixels.shape[-2], left : left + pixels.shape[-1]].contiguous(
        memory_format=torch.channels_last if pixels.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def small_affine(pixels: torch.Tensor, degrees: float = 10.0, scale: float = 0.1, shift: float = 0.1) -> torch.Tensor:
    """Per-image random rotation (+-degrees), scaling (1 +- scale) and translation (+- shift of the side)."""
    n = pixels.shape[0]
    angle = (torch.rand(n) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n) * 2 - 1) * scale
    move = (torch.rand(n, 2) * 2 - 1) * shift * 2  # affine_grid works in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(pixels.dtype), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _chosen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, p: float, keep_ids: set[int]) -> torch.Tensor:
    maskable = attention_mask.bool()
    for token in keep_ids:
        maskable &= input_ids != token
    return (torch.rand(input_ids.shape) < p) & maskable


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, p: float, mask_id: int,
                keep_ids: set[int]) -> torch.Tensor:
    """Replace a fraction ``p`` of real tokens (not padding or special tokens) with ``mask_id``."""
    return input_ids.masked_fill(_chosen_tokens(input_ids, attention_mask, p, keep_ids), mask_id)


def drop_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, p: float) -> torch.Tensor:
    """Word dropout for models without a mask token (static embeddings): a fraction ``p`` of the real
    tokens leave the attention mask, so the average ignores them."""
    return attention_mask.masked_fill(_chosen_tokens(input_ids, attention_mask, p, set()), 0)


class BatchAugmenter:
    """The augmentations a run asked for, applied to each training batch."""

    def __init__(self, *, flip: bool = False, crop: bool = False, affine: bool = False, noise: float = 0.0,
                 token_mask: float = 0.0, mask_id: int | None = None, keep_ids: set[int] | None = None):
        self.flip, self.crop, self.affine, self.noise = flip, crop, affine, noise
        self.token_mask, self.mask_id, self.keep_ids = token_mask, mask_id, keep_ids or set()

    @property
    def active(self) -> bool:
        return bool(self.flip or self.crop or self.affine or self.noise or self.token_mask)

    def __call__(self, batch: dict) -> dict:
        inputs = dict(batch["inputs"])
        if "pixel_values" in inputs:
            pixels = inputs["pixel_values"]
            if self.flip:
                pixels = flip_images(pixels)
            if self.crop:
                pixels = pad_and_crop(pixels)
            if self.affine:
                pixels = small_affine(pixels)
            if self.noise:
                pixels = pixels + self.noise * torch.randn_like(pixels)
            inputs["pixel_values"] = pixels
        if "input_ids" in inputs and self.token_mask:
            if self.mask_id is None:
                inputs["attention_mask"] = drop_tokens(inputs["input_ids"], inputs["attention_mask"], self.token_mask)
            else:
                inputs["input_ids"] = mask_tokens(inputs["input_ids"], inputs["attention_mask"], self.token_mask,
                                                  self.mask_id, self.keep_ids)
        return {**batch, "inputs": inputs}
