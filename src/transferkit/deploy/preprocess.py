"""A run's preprocessing in NumPy and Hugging Face ``tokenizers`` alone, for serving without PyTorch.

The ONNX runtime path must turn texts and images into exactly the tensors the backbone saw in training.
Training preprocesses with transformers' fast tokenizer and ``torch.nn.functional.interpolate``; this
module reproduces both without importing either: the fast tokenizer *is* a ``tokenizers.Tokenizer``
(its ``tokenizer.json`` is saved with every run), and bilinear resizing, with or without antialiasing,
is one fixed weight matrix per axis. Tests check both against the PyTorch path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError


def _resize_weights(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """(size_out, size_in) weights of bilinear resampling, as torch's ``interpolate(mode="bilinear",
    align_corners=False)`` computes them: a triangle filter centred on each output pixel, widened by the
    scale when shrinking with antialiasing (the PIL filter torch follows), rows normalised to 1."""
    scale = size_in / size_out
    support = scale if antialias and scale > 1 else 1.0
    centres = scale * (np.arange(size_out) + 0.5)
    distance = (np.arange(size_in)[None, :] + 0.5 - centres[:, None]) / support
    weights = np.clip(1.0 - np.abs(distance), 0.0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(batch: np.ndarray, size: int) -> np.ndarray:
    """(B, C, H, W) float -> (B, C, size, size), bilinear, antialiased when shrinking (as in training)."""
    height, width = batch.shape[-2:]
    if (height, width) == (size, size):
        return batch
    antialias = height > size or width > size
    rows, columns = _resize_weights(height, size, antialias), _resize_weights(width, size, antialias)
    return np.einsum("oh,bchw,pw->bcop", rows, batch, columns, optimize=True)


def _to_chw_float(pixels: np.ndarray) -> np.ndarray:
    """(B, H, W[, C]) uint8 -> (B, 3, H, W) float32 in [0, 1]; grey repeated to 3 channels, alpha dropped."""
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    batch = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
    channels = batch.shape[1]
    if channels == 1:
        return np.repeat(batch, 3, axis=1)
    if channels == 4:
        return batch[:, :3]
    if channels != 3:
        raise ValueError(f"images have {channels} channels; 1, 3 or 4 are supported")
    return batch


def _center_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def images_to_array(images: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Decoded uint8 images -> the normalised (B, 3, size, size) float32 batch the backbone expects, as in
    training: a list of images (any sizes) is cropped to each one's central square; an array of equal-sized
    images (B, H, W[, C]), as a dataset holds them, is resized whole."""
    if isinstance(images, np.ndarray):
        batch = resize(_to_chw_float(images), size)
    else:
        batch = np.concatenate([resize(_to_chw_float(_center_square(image)[None]), size) for image in images])
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((batch - mean_a) / std_a).astype(np.float32)


class TextEncoder:
    """The run's fast tokenizer (``backbone/tokenizer.json``) with the backbone's max length and pad token
    (special tokens added as the transformers tokenizer adds them; static embeddings take none)."""

    def __init__(self, directory: Path, max_length: int, add_special_tokens: bool = True):
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist: serving with --runtime onnx needs the fast tokenizer's "
                            f"tokenizer.json; serve this run with --runtime torch")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        self.pad_id = self._pad_id(directory)

    def _pad_id(self, directory: Path) -> int:
        config_path = directory / "tokenizer_config.json"
        pad = json.loads(config_path.read_text()).get("pad_token") if config_path.is_file() else None
        if isinstance(pad, dict):  # older files store an AddedToken as a dict
            pad = pad.get("content")
        pad_id = self.tokenizer.token_to_id(pad) if pad else None
        return 0 if pad_id is None else int(pad_id)

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (special tokens added, cut at the max length) and whether each was cut."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def pad(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Rows padded to the longest one, with the attention mask (int64, as exported)."""
        width = max(1, max(len(r) for r in rows))  # an empty text (static embeddings) still gets one position
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
