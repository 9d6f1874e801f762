"""The client's optimiser state from round to round: reset (FedAvg's usual) or kept in its Flower state.

Each round's local training builds a fresh AdamW. With a few dozen steps per round, Adam then spends every
round re-estimating its moments from nothing, and its bias correction makes the first steps of each round
full-size steps along a noisy direction. ``keep`` stores the moments and step count in the client's Flower
context state (``context.state``) after each round and loads them into the next round's optimiser, whose
parameters now hold the new global weights (Wang et al., "Local Adaptivity in Federated Learning", 2021,
study such stateful local optimisers). The state never leaves the client.
"""

from __future__ import annotations

from typing import Any

import torch

CHOICES = ("reset", "keep")
STATE_KEY = "transferkit-optimizer"  # the client's optimiser moments in its Flower context state


def keep(state, optimizer_state: dict[int, dict[str, Any]]) -> None:
    """Store ``optimizer.state_dict()["state"]`` (parameter index -> moments) in the client's context state."""
    from flwr.app import ArrayRecord

    flat = {f"{index}.{name}": torch.as_tensor(value).detach().cpu()
            for index, moments in optimizer_state.items() for name, value in moments.items()}
    state[STATE_KEY] = ArrayRecord(flat)  # serialised: a copy, whatever the next round does to the tensors


def kept(state) -> dict[int, dict[str, torch.Tensor]] | None:
    """The optimiser state a client kept after its last round (None before its first)."""
    if STATE_KEY not in state:
        return None
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state[STATE_KEY].to_torch_state_dict().items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    return moments


def load(optimizer: torch.optim.Optimizer, moments: dict[int, dict[str, torch.Tensor]] | None) -> None:
    """Put kept moments into a new round's optimiser; its own hyper-parameters (learning rate, ...) stay."""
    if not moments:
        return
    parameters = sum(len(group["params"]) for group in optimizer.param_groups)
    if max(moments) >= parameters:
        raise RuntimeError(f"the kept optimiser state covers {max(moments) + 1} parameters but this round's "
                           f"optimiser has {parameters}: the trainable parameters changed between rounds")
    # Copies: load_state_dict keeps tensors of the right dtype and device as they are, and Adam counts its steps
    # in place, which would change the caller's copy too.
    copies = {index: {name: value.clone() for name, value in values.items()} for index, values in moments.items()}
    optimizer.load_state_dict({"state": copies, "param_groups": optimizer.state_dict()["param_groups"]})
