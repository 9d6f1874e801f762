"""Freed tensor memory stays in the process for the next batch (glibc on Linux)."""

import resource
import sys

import pytest
import torch

from transferkit.engine import cpu_memory


def _faults_of_a_64_mib_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()  # 64 MiB, written once, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_tensor_is_reused_instead_of_paged_in_again():
    if not cpu_memory.keep_freed_memory_for_reuse():
        pytest.skip("not glibc")
    rounds = [_faults_of_a_64_mib_tensor() for _ in range(10)]
    # Untuned, glibc serves it with a fresh mmap every time: 16,384 pages faulted in, every round. Tuned, the heap
    # grows to hold it within a few rounds and then reuses that memory.
    assert max(rounds[-3:]) < 1000, rounds


def test_the_tuning_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_tuned", False)
    monkeypatch.setenv("TRANSFERKIT_MALLOC_TUNING", "0")
    assert cpu_memory.keep_freed_memory_for_reuse() is False
