"""Mini-batches over a prepared split, in an order fixed by (seed, epoch) so a resumed run replays it."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

Collate = Callable[[Any, Sequence[int]], dict[str, torch.Tensor]]


class Batches:
    """Yields ``{"inputs": {...}, "labels": tensor, "indices": array}`` batches.

    ``prepared`` is whatever the backbone's ``prepare`` returned (token ids, images) or a feature
    tensor; ``collate`` turns the examples at some indices into model inputs.
    """

    def __init__(self, prepared: Any, labels: np.ndarray | None, collate: Collate, batch_size: int,
                 shuffle: bool = False, seed: int = 0):
        self.prepared = prepared
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.collate = collate
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.size = len(labels) if labels is not None else len(prepared)

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).numpy()

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """Batches of ``epoch`` from batch number ``start`` on."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            indices = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = {"inputs": self.collate(self.prepared, indices), "indices": indices}
            if self.labels is not None:
                batch["labels"] = self.labels[indices]
            yield batch


def feature_collate(features: torch.Tensor, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    return {"features": features[torch.as_tensor(np.asarray(indices), dtype=torch.long)]}
