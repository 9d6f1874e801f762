"""Checkpoints: atomic (temporary folder, fsync, rename), pickle-free weights, resumable state.

Layout under ``checkpoints/``: one folder per checkpoint plus pointer files ``latest``, ``previous``
and ``best``, each replaced atomically. A crash mid-write leaves at most a ``*.tmp`` folder, never a
pointer to a half-written checkpoint; a checkpoint damaged later is caught by its manifest.
"""

from __future__ import annotations

import hashlib
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


def replace_with(temporary: Path, path: Path) -> None:
    """Make the finished file ``temporary`` durable, then rename it over ``path`` (atomic on one filesystem)."""
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """safetensors, written beside the target then renamed over it."""
    temporary = path.with_name(path.name + ".tmp")
    save_model(model, str(temporary))
    replace_with(temporary, path)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointDir:
    """Saves and finds the ``latest``, ``previous`` and ``best`` checkpoints of one run.

    Each checkpoint folder holds ``manifest.json`` (size and SHA-256 of every file); a checkpoint whose
    files do not match it (truncated, corrupted, half-copied) is reported and the previous one is used.
    """

    POINTERS = ("latest", "previous", "best")

    def __init__(self, root: Path):
        self.root = Path(root)
        self.warnings: list[str] = []

    def save(self, tag: str, model: nn.Module, training_state: dict[str, Any], resumable: dict[str, Any],
             pointers: tuple[str, ...]) -> Path:
        """Write checkpoint ``tag`` and point each name in ``pointers`` ("latest", "best") at it.

        A failed write (disk full, permissions) removes the partial folder and raises a UserError;
        the pointers still name the last good checkpoint.
        """
        final = self.root / tag
        temporary = self.root / (tag + ".tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            save_weights(model, temporary / "model.safetensors")
            with open(temporary / "optimizer.pt", "wb") as handle:
                torch.save(resumable, handle)
                handle.flush()
                os.fsync(handle.fileno())
            atomic_write_text(temporary / "state.json", json.dumps(training_state, indent=1))
            manifest = {name: {"size": (temporary / name).stat().st_size, "sha256": _sha256(temporary / name)}
                        for name in ("model.safetensors", "optimizer.pt", "state.json")}
            atomic_write_text(temporary / "manifest.json", json.dumps(manifest, indent=1))
            _fsync_dir(temporary)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            _fsync_dir(self.root)
            if "latest" in pointers and (self.root / "latest").is_file():
                previous = (self.root / "latest").read_text().strip()
                if previous != tag:
                    atomic_write_text(self.root / "previous", previous)
            for pointer in pointers:
                atomic_write_text(self.root / pointer, tag)
        except OSError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise UserError(
                f"could not write checkpoint {final} ({error.strerror or error}): free disk space or fix permissions, "
                f"then continue with --resume (the last good checkpoint is kept)"
            ) from None
        self._prune()
        return final

    def verify(self, folder: Path) -> str | None:
        """None when every file matches the manifest, else what is wrong."""
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            return "no manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError):
            return "an unreadable manifest.json"
        for name, expected in manifest.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} has {path.stat().st_size} bytes instead of {expected['size']}"
            if _sha256(path) != expected["sha256"]:
                return f"{name} does not match its checksum"
        return None

    def find(self, pointer: str) -> Path | None:
        """The checkpoint a pointer names, if it exists and verifies."""
        path = self.root / pointer
        if not path.is_file():
            return None
        target = self.root / path.read_text().strip()
        if not target.is_dir():
            return None
        problem = self.verify(target)
        if problem is not None:
            self.warnings.append(f"checkpoint {target} is damaged ({problem}); it was skipped")
            return None
        return target

    def find_resumable(self) -> Path | None:
        """The newest good checkpoint: ``latest``, or ``previous`` when ``latest`` is damaged."""
        return self.find("latest") or self.find("previous")

    def load_state(self) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        folder = self.find_resumable()
        if folder is None:
            raise UserError(f"{self.root} holds no intact checkpoint: there is nothing to resume; start without --resume")
        state = json.loads((folder / "state.json").read_text())
        # weights_only=True: optimiser files may come from elsewhere and must not run pickled code.
        resumable = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        return folder, state, resumable

    def _prune(self) -> None:
        keep = {(self.root / p).read_text().strip() for p in self.POINTERS if (self.root / p).is_file()}
        for child in self.root.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)
