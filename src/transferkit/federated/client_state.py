"""A client's own state on its disk, round by round, so that a resumed federation gives it back.

What a client keeps between rounds (its personal part, its kept optimiser moments: see ``personal`` and
``optimizer_state``) lives in its Flower context state, which a new Flower run starts empty; and
``--resume`` is a new run. So after each round's training the client also writes that state to
``FOLDER/round-N.safetensors`` (the tensors, and the personal part's round count in the file's metadata).
A client whose context state is empty when round N arrives (the first round after a resume) loads the
newest file of a round before N: the round the server resumed after, even if the client had trained a
later round that the server never checkpointed. The state never leaves the client's machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..engine.checkpoint import replace_with
from . import optimizer_state, personal

KEPT = (personal.STATE_KEY, optimizer_state.STATE_KEY)  # the context-state records that persist
FILE = re.compile(r"^round-(\d+)\.safetensors$")


def _rounds(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    return {int(match.group(1)): path for path in folder.iterdir() if (match := FILE.match(path.name))}


def save(folder: Path, round_number: int, state) -> None:
    """Write what ``state`` keeps after ``round_number``'s training; older rounds but the previous one go."""
    from safetensors.torch import save_file

    tensors = {f"{key}/{name}": tensor.contiguous()
               for key in KEPT if key in state for name, tensor in state[key].to_torch_state_dict().items()}
    if not tensors:
        return
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"round-{round_number}.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(temporary), metadata={"personal_rounds": str(personal.kept_rounds(state))})
    replace_with(temporary, folder / f"round-{round_number}.safetensors")
    # The previous round stays: the server may resume after it if it crashes before checkpointing this one.
    for number, path in _rounds(folder).items():
        if number < round_number - 1:
            path.unlink(missing_ok=True)


def restore(folder: Path, before_round: int | None, state) -> int | None:
    """Fill an empty ``state`` from the newest file of a round before ``before_round`` (None: any round).
    Returns the round restored, or None (state not empty, or no such file)."""
    from flwr.app import ArrayRecord, ConfigRecord
    from safetensors import safe_open

    if any(key in state for key in KEPT):
        return None
    candidates = [n for n in _rounds(folder) if before_round is None or n < before_round]
    if not candidates:
        return None
    number = max(candidates)
    with safe_open(str(folder / f"round-{number}.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name in handle.keys():
            key, _, inner = name.partition("/")
            grouped.setdefault(key, {})[inner] = handle.get_tensor(name)
    for key, tensors in grouped.items():
        state[key] = ArrayRecord(tensors)
    if personal.STATE_KEY in grouped:
        state[personal.ROUNDS_KEY] = ConfigRecord({"rounds": int(metadata.get("personal_rounds", 0))})
    return number
