"""Dynamic micro-batching: concurrent requests share one forward pass.

Requests wait in a queue. A single worker takes the oldest, then keeps adding queued requests until
the batch holds ``max_batch_size`` inputs or ``max_wait_ms`` have passed since it started collecting,
runs the model once on all of their inputs in a worker thread (the event loop keeps accepting
requests meanwhile) and hands each request its own rows. ``max_batch_size=1`` turns batching off:
one forward pass per request (a request's own inputs still go together), which is what a
one-request-at-a-time server does.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np


@dataclass
class _Pending:
    inputs: Sequence[Any]
    future: asyncio.Future


@dataclass
class BatchStats:
    """Counters the server reports on /health, so a caller can see batching happen."""

    requests: int = 0
    inputs: int = 0
    forward_passes: int = 0
    largest_batch: int = 0
    started: float = field(default_factory=time.time)


class MicroBatcher:
    def __init__(self, predict: Callable[[list], np.ndarray], max_batch_size: int = 32, max_wait_ms: float = 5.0):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        # One thread: the model runs one batch at a time; torch parallelises inside the batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transferkit-predict")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: Sequence[Any]) -> np.ndarray:
        """The model's output rows for ``inputs``, computed in a shared batch."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(list(inputs), future))
        return await future

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        size = len(batch[0].inputs)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch_size:
            # A request that would overflow the batch waits for the next one (it is never split).
            if not self._queue.empty():
                head = self._queue._queue[0]  # peek: asyncio.Queue keeps a deque
                if size + len(head.inputs) > self.max_batch_size:
                    break
                batch.append(self._queue.get_nowait())
                size += len(head.inputs)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            if size + len(item.inputs) > self.max_batch_size:
                # Too big to join: it leads the next batch, ahead of anything queued after it.
                self._queue._queue.appendleft(item)
                break
            batch.append(item)
            size += len(item.inputs)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.done()]  # a client that went away needs no answer
            if not live:
                continue
            inputs = [x for p in live for x in p.inputs]
            try:
                outputs = await loop.run_in_executor(self._executor, self.predict, inputs)
            except Exception as error:  # noqa: BLE001  (the request fails, the server goes on)
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(error)
                continue
            self.stats.forward_passes += 1
            self.stats.requests += len(live)
            self.stats.inputs += len(inputs)
            self.stats.largest_batch = max(self.stats.largest_batch, len(inputs))
            start = 0
            for p in live:
                if not p.future.done():
                    p.future.set_result(outputs[start:start + len(p.inputs)])
                start += len(p.inputs)
