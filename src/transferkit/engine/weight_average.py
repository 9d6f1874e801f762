"""An exponential moving average of the model's weights (Polyak averaging; timm's ModelEma).

After every optimiser step ``average = decay * average + (1 - decay) * weights``, over every floating-point
entry of the state dict (parameters and BatchNorm statistics alike); integer buffers are copied. The
decay warms up as ``min(decay, (1 + t) / (10 + t))`` after t updates, so the first steps do not anchor the
average to the pretrained weights for thousands of steps; the warm-up also caps the decay near 0.99 for the
first ~1,000 updates, so on a short run a decay of 0.999 acts like 0.99 (``warmup=False`` applies the decay
from the first update, as timm's ModelEmaV3 does by default). The averaged weights are the ones validated,
checkpointed as the model and kept: they move more smoothly than the last step's, which on small data
sits wherever the last few batches pushed it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        # One entry per storage: tied weights (one tensor under two names) are averaged and swapped once.
        seen: set[int] = set()
        self.names = []
        for name, tensor in model.state_dict().items():
            key = tensor.data_ptr()
            if key == 0 or key not in seen:  # 0: an empty tensor, which shares nothing
                seen.add(key)
                self.names.append(name)
        self.average = self._copy(model)
        self.applied = False  # True while the model holds the average and ``average`` the trained weights

    def _copy(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {name: state[name].detach().clone() for name in self.names}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        state = model.state_dict()
        for name in self.names:
            if state[name].is_floating_point():
                self.average[name].lerp_(state[name].detach(), 1.0 - decay)
            else:
                self.average[name].copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its trained ones again after it."""
        if self.applied:  # nested: already swapped
            yield
            return
        self._swap(model)
        try:
            yield
        finally:
            self._swap(model)

    @torch.no_grad()
    def _swap(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name in self.names:
            tensor = state[name]
            kept = tensor.detach().clone()
            tensor.copy_(self.average[name])
            self.average[name] = kept
        self.applied = not self.applied

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The weights training goes on from (inside ``swapped_in``, the ones set aside)."""
        if not self.applied:
            raise RuntimeError("trained_weights() is only meaningful while the average is swapped in")
        return self.average

    def state_for_resume(self) -> dict[str, Any]:
        return {"updates": self.updates, "trained_weights": self.trained_weights()}

    @torch.no_grad()
    def resume(self, model: nn.Module, state: dict[str, Any]) -> None:
        """The model holds the averaged weights of a checkpoint: keep them as the average and put the
        trained weights of ``state`` back into the model."""
        self.average = self._copy(model)
        weights = model.state_dict()
        for name in self.names:
            weights[name].copy_(state["trained_weights"][name])
        self.updates = int(state["updates"])
        self.applied = False
