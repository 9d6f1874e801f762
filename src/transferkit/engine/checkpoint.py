"""Checkpoints: atomic (temporary folder, fsync, rename), pickle-free weights, resumable state.

Layout under ``checkpoints/``: one folder per saved epoch plus two pointer files, ``latest`` and
``best``, each replaced atomically. A crash mid-write leaves at most a ``*.tmp`` folder, never a
pointer to a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import UserError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """safetensors, written beside the target then renamed over it."""
    temporary = path.with_name(path.name + ".tmp")
    save_model(model, str(temporary))
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as error:  # safetensors raises its own error types on corrupt files
        raise UserError(f"weights file {path} is corrupt or incomplete ({type(error).__name__}): re-run or restore it") from None
    if missing or unexpected:
        raise UserError(f"weights file {path} does not match the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


class CheckpointDir:
    """Saves and finds the ``latest`` and ``best`` checkpoints of one run."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def save(self, tag: str, model: nn.Module, training_state: dict[str, Any], resumable: dict[str, Any],
             pointers: tuple[str, ...]) -> Path:
        """Write checkpoint ``tag`` and point each name in ``pointers`` ("latest", "best") at it."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / tag
        temporary = self.root / (tag + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        save_weights(model, temporary / "model.safetensors")
        torch.save(resumable, temporary / "optimizer.pt")
        atomic_write_text(temporary / "state.json", json.dumps(training_state, indent=1))
        _fsync_dir(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync_dir(self.root)
        for pointer in pointers:
            atomic_write_text(self.root / pointer, tag)
        self._prune()
        return final

    def find(self, pointer: str) -> Path | None:
        path = self.root / pointer
        if not path.is_file():
            return None
        target = self.root / path.read_text().strip()
        return target if (target / "state.json").is_file() else None

    def load_state(self, pointer: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        folder = self.find(pointer)
        if folder is None:
            raise UserError(f"{self.root} holds no '{pointer}' checkpoint: there is nothing to resume; start without --resume")
        state = json.loads((folder / "state.json").read_text())
        # weights_only=True: optimiser files may come from elsewhere and must not run pickled code.
        resumable = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        return folder, state, resumable

    def _prune(self) -> None:
        keep = {p.read_text().strip() for p in (self.root / "latest", self.root / "best") if p.is_file()}
        for child in self.root.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)
