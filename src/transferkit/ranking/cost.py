"""What a candidate costs: parameters (total, and trainable under a strategy), FLOPs per example counted
by torch's FLOP counter, inference latency at batch 1 and 32, and peak memory of a batch-32 forward."""

from __future__ import annotations

import statistics
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..model import Classifier
from ..strategies import Strategy


class _PeakRss:
    """Samples the process's resident memory in a thread: on CPU there is no allocator peak counter."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.peak, self._running = 0, False

    def __enter__(self) -> "_PeakRss":
        self.start = self.peak = self.process.memory_info().rss
        self._running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def profile_cost(model: Classifier, strategy: Strategy, batch_1: dict, batch_32: dict, device: torch.device,
                 repeats: int = 5) -> dict:
    """The cost table's columns for one candidate (``batch_*``: collated inputs of 1 and 32 examples)."""
    model.eval().to(device)
    batch_1 = {k: v.to(device) for k, v in batch_1.items()}
    batch_32 = {k: v.to(device) for k, v in batch_32.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch_32)
    per_example = counter.get_total_flops() / len(next(iter(batch_32.values())))
    latency = {}
    for name, batch in (("batch_1", batch_1), ("batch_32", batch_32)):
        model(**batch)  # warm-up: kernel selection, allocator
        timings = []
        for _ in range(repeats):
            _synchronise(device)
            started = time.perf_counter()
            model(**batch)
            _synchronise(device)
            timings.append(time.perf_counter() - started)
        latency[name] = statistics.median(timings) * 1000
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        model(**batch_32)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with _PeakRss() as rss:
            model(**batch_32)
        peak = weights + (rss.peak - rss.start)
    return {"total_parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": strategy.trainable_parameters(model),
            "flops_per_example": per_example, "latency_ms_batch_1": latency["batch_1"],
            "latency_ms_batch_32": latency["batch_32"], "peak_memory_mib": peak / 2**20}
