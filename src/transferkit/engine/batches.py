"""Mini-batches over a prepared split, in an order fixed by (seed, epoch) so a resumed run replays it."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

MEGABATCH = 50  # batches per length-sorted chunk, as in the HF Trainer's length grouping
Collate = Callable[[Any, Sequence[int]], dict[str, torch.Tensor]]


class Batches:
    """Yields ``{"inputs": {...}, "labels": tensor, "indices": array}`` batches.

    ``prepared`` is whatever the backbone's ``prepare`` returned (token ids, images) or a feature
    tensor; ``collate`` turns the examples at some indices into model inputs.
    """

    def __init__(self, prepared: Any, labels: np.ndarray | None, collate: Collate, batch_size: int,
                 shuffle: bool = False, seed: int = 0, lengths: Sequence[int] | None = None,
                 oversample: bool = False, transform: Callable[[dict], dict] | None = None):
        self.prepared = prepared
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.collate = collate
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.size = len(labels) if labels is not None else len(prepared)
        # With lengths (token counts), batches group examples of similar length, so dynamic padding
        # pads little: sorted for evaluation, and within shuffled mega-batches for training.
        self.lengths = None if lengths is None else np.asarray(lengths)
        # Oversampling draws each epoch's examples with probability inversely proportional to their
        # class's frequency, so every class is seen about equally often.
        self.oversample = oversample
        # A train-time transform of collated batches (augmentation); evaluation batches have none.
        self.transform = transform

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``: a pure function of (seed, epoch), so resume replays it."""
        if not self.shuffle:
            if self.lengths is None:
                return np.arange(self.size)
            return np.argsort(-self.lengths, kind="stable")
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.oversample:
            counts = torch.bincount(self.labels).double()
            weights = (1.0 / counts)[self.labels]
            order = torch.multinomial(weights, self.size, replacement=True, generator=generator).numpy()
        else:
            order = torch.randperm(self.size, generator=generator).numpy()
        if self.lengths is None:
            return order
        mega = self.batch_size * MEGABATCH
        chunks = [order[i : i + mega] for i in range(0, self.size, mega)]
        chunks = [chunk[np.argsort(-self.lengths[chunk], kind="stable")] for chunk in chunks]
        batches = [b for chunk in chunks for b in np.array_split(chunk, range(self.batch_size, len(chunk), self.batch_size))]
        # Keep the last (possibly short) batch last; shuffle the others so lengths do not follow a pattern.
        shuffled = torch.randperm(len(batches) - 1, generator=generator).tolist() + [len(batches) - 1]
        return np.concatenate([batches[i] for i in shuffled])

    def iterate(self, epoch: int = 0, start: int = 0, shard: tuple[int, int] | None = None) -> Iterator[dict]:
        """Batches of ``epoch`` from batch number ``start`` on.

        ``shard=(rank, processes)``: this process's part of each batch in a data-parallel run, so all
        processes together see exactly the one-process batches (a batch smaller than the number of
        processes is given whole to each, which averages to the same gradient).
        """
        order = self.order(epoch)
        for b in range(start, len(self)):
            indices = order[b * self.batch_size : (b + 1) * self.batch_size]
            if shard is not None and len(indices) >= shard[1]:
                indices = np.array_split(indices, shard[1])[shard[0]]
            batch = {"inputs": self.collate(self.prepared, indices), "indices": indices}
            if self.labels is not None:
                batch["labels"] = self.labels[indices]
            if self.transform is not None:
                batch = self.transform(batch)
            yield batch


@torch.no_grad()
def map_in_order(batches: Batches, forward: Callable[[dict], torch.Tensor], device: torch.device,
                 progress: str | None = None) -> torch.Tensor:
    """``forward(inputs)`` on every batch, rows returned in the examples' original order.

    Batches may be length-sorted, so each output is scattered back to its examples' indices.
    """
    iterator = batches.iterate()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(batches), desc=progress, unit="batch", mininterval=1.0, dynamic_ncols=True)
    outputs = None
    for batch in iterator:
        result = forward({k: v.to(device, non_blocking=True) for k, v in batch["inputs"].items()}).float().cpu()
        if outputs is None:
            outputs = torch.empty(batches.size, *result.shape[1:])
        outputs[torch.as_tensor(batch["indices"], dtype=torch.long)] = result
    return outputs


def feature_collate(features: torch.Tensor, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    return {"features": features[torch.as_tensor(np.asarray(indices), dtype=torch.long)]}
