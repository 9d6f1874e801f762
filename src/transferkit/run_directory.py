"""Where a finished run keeps its model: found without importing PyTorch, so a torch-free server can use it."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def model_directory(run: str | Path) -> Path:
    """The ``model/`` folder of a finished run (or ``run`` itself when it is that folder)."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"run directory {run} does not exist: point at the --out of a finished 'transferkit fit'")
    directory = run / "model" if (run / "model").is_dir() else run
    if not (directory / "transferkit.json").is_file():
        raise UserError(f"{run} holds no finished model (no model/transferkit.json): point at a finished run directory")
    return directory
