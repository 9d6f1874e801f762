"""Interleave the tasks' batches: every training step holds K batches (K = number of tasks).

- ``round-robin``: one batch of every task per step;
- ``proportional``: the step's K batches drawn task by task with probability proportional to the
  task's training-set size;
- ``temperature``: probability proportional to size^(1/T) (T = 1 is proportional, large T uniform),
  as in multilingual and T5-style mixtures.

An epoch has ceil(sum_i batches_i / K) steps, so it processes about as many examples as one epoch of
each task alone: a multi-task run and its single-task runs get the same budget. A task whose batches
run out starts its next shuffled pass. Everything follows from (seed, epoch), so a resumed run draws
the same batches.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..engine.batches import Batches
from ..errors import UserError

SAMPLING = ("round-robin", "proportional", "temperature")


class TaskBatches:
    def __init__(self, batches: dict[str, Batches], sampling: str = "round-robin", temperature: float = 2.0,
                 seed: int = 0):
        if sampling not in SAMPLING:
            raise UserError(f"task sampling '{sampling}' is unknown: choose one of {', '.join(SAMPLING)}")
        self.batches = batches
        self.tasks = list(batches)
        self.sampling = sampling
        self.seed = seed
        sizes = np.array([b.size for b in batches.values()], dtype=float)
        power = 1.0 if sampling == "proportional" else 1.0 / temperature
        self.probabilities = sizes ** power / (sizes ** power).sum()
        self.steps = math.ceil(sum(len(b) for b in batches.values()) / len(self.tasks))

    def __len__(self) -> int:
        return self.steps

    def schedule(self, epoch: int) -> list[list[int]]:
        """For each step of ``epoch``, the task index of each of its K batches."""
        k = len(self.tasks)
        if self.sampling == "round-robin":
            return [list(range(k)) for _ in range(self.steps)]
        rng = np.random.default_rng([self.seed, epoch])
        return rng.choice(k, size=(self.steps, k), p=self.probabilities).tolist()

    def _consumed(self, epoch: int, start: int) -> list[int]:
        """How many batches of each task were drawn before step ``start`` of ``epoch``."""
        counts = [0] * len(self.tasks)
        for e in range(epoch + 1):
            for step in self.schedule(e)[: start if e == epoch else None]:
                for t in step:
                    counts[t] += 1
        return counts

    def _stream(self, task: int, drawn: int) -> Iterator[dict]:
        batches = self.batches[self.tasks[task]]
        passes, position = divmod(drawn, len(batches))
        while True:
            yield from batches.iterate(passes, position)
            passes, position = passes + 1, 0

    def iterate(self, epoch: int = 0, start: int = 0, shard=None) -> Iterator[dict]:
        if shard is not None:
            raise UserError("multi-task training runs in one process: launch it without torchrun/accelerate")
        streams = [self._stream(t, n) for t, n in enumerate(self._consumed(epoch, start))]
        for step in self.schedule(epoch)[start:]:
            yield {"parts": [(self.tasks[t], next(streams[t])) for t in step]}
