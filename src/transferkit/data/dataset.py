"""In-memory containers for labelled examples: texts, or images held as arrays or as file paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError


class ImageArray:
    """Images decoded in memory as uint8, shape (N, H, W) or (N, H, W, C)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.pixels[index]

    def subset(self, indices: Sequence[int]) -> "ImageArray":
        return ImageArray(self.pixels[np.asarray(indices, dtype=np.int64)])


def to_rgb_array(image) -> np.ndarray:
    """A PIL image as an (H, W, 3) uint8 array. 16-bit and 32-bit grey images (microscopy, medical, depth) are
    scaled from their full range: PIL's own conversion clips every value above 255 to white, which turns a
    16-bit image into a nearly blank one."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        if image.mode == "F" and pixels.max(initial=0) <= 1.0:
            top = 1.0  # floats in [0, 1]
        grey = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


class ImagePaths:
    """Images on disk, decoded lazily so that large folders need not fit in memory."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return to_rgb_array(image)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise UserError(f"image {path} could not be decoded ({error}): replace or remove the file") from None

    def subset(self, indices: Sequence[int]) -> "ImagePaths":
        return ImagePaths([self.paths[i] for i in indices])


class DecodedImages:
    """Images decoded in memory that may differ in size (what a caller holding PIL images passes)."""

    def __init__(self, images: Sequence[np.ndarray]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]

    def subset(self, indices: Sequence[int]) -> "DecodedImages":
        return DecodedImages([self.images[i] for i in indices])


def typical_image_side(images, sample: int = 64) -> int | None:
    """The median longer side, in pixels, of up to ``sample`` evenly spaced images (headers only for files);
    None for inputs that are not images."""
    if isinstance(images, ImageArray):
        return int(max(images.pixels.shape[1:3]))
    if isinstance(images, DecodedImages):
        sides = [max(i.shape[:2]) for i in images.images[:: max(1, len(images) // sample)]]
    elif isinstance(images, ImagePaths):
        from PIL import Image

        sides = []
        for path in images.paths[:: max(1, len(images) // sample)]:
            with Image.open(path) as image:  # reads the header, not the pixels
                sides.append(max(image.size))
    else:
        return None
    return int(np.median(sides)) if sides else None


@dataclass
class Examples:
    """One split: inputs, their labels as strings (None for unlabelled data) and where they came from."""

    inputs: list | ImageArray | ImagePaths | DecodedImages
    labels: list[str] | None
    source: str
    modality: str  # "text" or "image"

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, indices: Sequence[int]) -> "Examples":
        if isinstance(self.inputs, list):
            inputs = [self.inputs[i] for i in indices]
        else:
            inputs = self.inputs.subset(indices)
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return Examples(inputs, labels, self.source, self.modality)


def sort_classes(labels: Sequence[str]) -> list[str]:
    """Classes in a stable order: numerically when every label is an integer, else alphabetically."""
    unique = set(labels)
    try:
        return sorted(unique, key=lambda label: int(label))
    except ValueError:
        return sorted(unique)


def encode_labels(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(classes)}
    return np.asarray([index[label] for label in labels], dtype=np.int64)
