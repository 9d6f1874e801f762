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
        personal = _personal_part(run)
        if personal:
            raise UserError(f"{run} is a federated run with a personal {personal} on each client (personal: {personal}): "
                            f"it saved no model, since no single model serves every client; run it without "
                            f"'personal' for a global model to predict with")
        raise UserError(f"{run} holds no finished model (no model/transferkit.json): point at a finished run directory")
    return directory


def _personal_part(run: Path) -> str | None:
    """The personal part ("head", "batchnorm") of a finished federated run that kept one on each client."""
    import json

    try:
        personal = json.loads((run / "metrics.json").read_text()).get("personal")
    except (OSError, ValueError, AttributeError):
        return None
    return personal.get("part") if isinstance(personal, dict) else None
