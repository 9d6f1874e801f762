"""Personal parts: the weights each client keeps to itself, from round to round, instead of sharing them.

A client trains its whole trainable part every round, but only the shared part travels to the server; the
personal part stays in the client's Flower state (``context.state``) and is put back on top of the next
round's global weights. The model each client uses is then the federation's shared part plus its own part.

- ``none``: everything that trains is shared (FedAvg and its kin);
- ``head``: the classification head stays local (FedPer, Arivazhagan et al. 2019): clients whose label
  mixes or label meanings differ share a feature extractor, each with its own decision rule;
- ``batchnorm``: BatchNorm layers (their scale, shift and running statistics) stay local (FedBN, Li et al.
  2021): for clients whose inputs differ in style (scanners, cameras, domains), not in what they show.

Each is a small function from a model to the state-dict keys it keeps local, registered in ``PERSONAL_PARTS``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

PERSONAL_PARTS: dict[str, Callable[[nn.Module], set[str]]] = {}
STATE_KEY = "transferkit-personal"  # the client's personal weights in its Flower context state
ROUNDS_KEY = "transferkit-personal-rounds"  # how many rounds have trained them (the report shows it)


def register(name: str):
    def wrap(function):
        PERSONAL_PARTS[name] = function
        return function

    return wrap


@register("none")
def no_personal_part(model: nn.Module) -> set[str]:
    return set()


@register("head")
def head_part(model: nn.Module) -> set[str]:
    return {f"head.{key}" for key in model.head.state_dict()}


@register("batchnorm")
def batchnorm_part(model: nn.Module) -> set[str]:
    keys = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys |= {f"{module_name}.{key}" for key in module.state_dict()}
    return keys


def personal_keys(model: nn.Module, part: str, trained: list[str]) -> list[str]:
    """The keys of ``part`` among those that train (``trained``, state-dict order); empty for ``none``."""
    keys = PERSONAL_PARTS[part](model)
    return [key for key in trained if key in keys]


def keep(state, weights: dict[str, torch.Tensor]) -> None:
    """Store this client's personal weights in its Flower context state, for its next round."""
    from flwr.app import ArrayRecord, ConfigRecord

    state[STATE_KEY] = ArrayRecord(weights)  # serialised to bytes: a copy, whatever happens to the tensors next
    state[ROUNDS_KEY] = ConfigRecord({"rounds": kept_rounds(state) + 1})


def kept_rounds(state) -> int:
    """How many rounds trained this client's personal weights (0 before its first round)."""
    return int(state[ROUNDS_KEY]["rounds"]) if ROUNDS_KEY in state else 0


def kept(state) -> tuple[dict[str, torch.Tensor] | None, int]:
    """The personal weights this client kept, and how many rounds trained them (None, 0 before its first round)."""
    if STATE_KEY not in state:
        return None, 0
    return state[STATE_KEY].to_torch_state_dict(), kept_rounds(state)
