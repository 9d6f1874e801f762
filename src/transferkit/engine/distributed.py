"""Data-parallel runs: which process this is, and how processes wait for each other.

A run launched by ``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N`` gets
WORLD_SIZE/RANK/MASTER_ADDR in its environment; the process group is created from them (gloo on CPU,
NCCL on GPUs). Every process loads the same data and model; each global batch is split across the
processes (so the effective batch size and the number of optimiser steps equal a one-process run),
gradients are averaged by ``DistributedDataParallel``, and only process 0 writes files.
Without those variables everything here is a no-op and the run is an ordinary one-process run.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def join_process_group() -> bool:
    """Create the process group a launcher prepared the environment for; returns whether this call
    created it (and so should destroy it). A no-op in a one-process run or when a group exists."""
    if world_size() <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds in every process (each process must call it at the same point)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class DataParallel(nn.parallel.DistributedDataParallel):
    """DDP whose wrapped model's attributes (``backbone``, ``head``) stay reachable, as objectives use them."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DDP, with only the parameters that train now (rewrap when that set changes)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DataParallel(model, device_ids=device_ids)
