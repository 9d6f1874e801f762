"""The frozen bottom of a backbone, computed once per training example and replayed every epoch.

With ``freeze-bottom`` the k lowest layer groups never change and run in eval mode (no dropout, fixed
BatchNorm statistics), so the input of the first trainable block is the same tensor every epoch. It is
computed once, kept in memory, and fed back in later epochs while the frozen blocks are skipped: an epoch
then costs only the trainable top (forward and backward) instead of the whole network's forward pass.

How the replay works, for any backbone whose ``layer_groups`` are its blocks in order:
- a batch carries the cached tensor as an extra input, ``frozen_prefix``; a pre-hook on the backbone takes
  it out of the inputs before the backbone's own ``forward`` sees them;
- while that forward runs, the frozen blocks are pass-throughs (their output is replaced anyway) and a
  pre-hook on the first trainable block swaps its input for the cached tensor;
- cheap frozen modules outside the block stack (embeddings, a convolutional stem) still run, since the
  code between them and the blocks may need their output's shape.
Before it is used, the replay is checked on a batch against the ordinary forward pass; an architecture
where it does not match exactly (e.g. blocks that read each other's outputs) trains uncached.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..backbones.base import Backbone
from ..backbones.layers import ParameterGroup
from .batches import Batches

MEMORY_LIMIT_BYTES = 2 * 1024**3  # beyond this the cache would compete with training for memory: train uncached
PREFIX_INPUT = "frozen_prefix"


class _Captured(Exception):
    """Stops a forward pass once the first trainable block's input is known (the top is not needed)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def _first_argument(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], tuple]]:
    """A block's input tensor and a function that rebuilds (args, kwargs) around a replacement."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], lambda value: ((value, *args[1:]), kwargs)
    for key in ("hidden_states", "x", "hidden_state"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], lambda value, key=key: (args, {**kwargs, key: value})
    return None, lambda value: (args, kwargs)


class FrozenPrefix:
    """The frozen blocks of ``backbone`` (its ``frozen`` lowest layer groups) and how to skip them."""

    def __init__(self, backbone: Backbone, frozen: int):
        groups = backbone.layer_groups()
        self.backbone = backbone
        # Blocks only: grouped modules (embeddings, a stem) are cheap and sit outside the block stack.
        self.skipped = [g for g in groups[:frozen] if not isinstance(g, ParameterGroup)]
        entry = groups[frozen] if frozen < len(groups) else None
        self.entry = entry.members[0] if isinstance(entry, ParameterGroup) else entry
        self.output_format: Any = None  # what a skipped block returns: a tensor, or a tuple of this length
        self.rows: list[torch.Tensor] | torch.Tensor | None = None
        self.megabytes = 0.0
        self._saved_forwards: list[Any] = []
        self._armed: torch.Tensor | None = None
        self._hooks = [backbone.register_forward_pre_hook(self._take_prefix, with_kwargs=True),
                       backbone.register_forward_hook(self._disarm, always_call=True)]
        if self.entry is not None:
            self._hooks.append(self.entry.register_forward_pre_hook(self._replace_input, with_kwargs=True))

    @property
    def usable(self) -> bool:
        """Whether there are blocks to skip and a trainable block to feed."""
        return bool(self.skipped) and self.entry is not None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.rows = None

    # -- replay -----------------------------------------------------------------------------------
    def _take_prefix(self, module: nn.Module, args: tuple, kwargs: dict):
        prefix = kwargs.pop(PREFIX_INPUT, None)
        if prefix is not None:
            self._armed = prefix
            # A block may already carry its own instance-level forward (e.g. an accelerate hook): keep it.
            self._saved_forwards = [block.__dict__.get("forward") for block in self.skipped]
            for block in self.skipped:
                block.forward = self._pass_through
        return args, kwargs

    def _disarm(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._armed is None:
            return
        self._armed = None
        for block, saved in zip(self.skipped, self._saved_forwards):
            if saved is None:
                del block.forward  # the class's forward again
            else:
                block.forward = saved

    def _pass_through(self, *args, **kwargs):
        value, _ = _first_argument(args, kwargs)
        if isinstance(self.output_format, int):
            return (value,) + (None,) * (self.output_format - 1)
        return value

    def _replace_input(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._armed is None:
            return None
        value, rebuild = _first_argument(args, kwargs)
        prefix = self._armed
        if value is not None and value.ndim == 3 and prefix.shape[1] != value.shape[1]:
            raise RuntimeError(f"cached prefix has {prefix.shape[1]} positions, the batch {value.shape[1]}")
        if value is None:
            return rebuild(prefix)
        prefix = prefix.to(device=value.device, dtype=value.dtype)
        if value.ndim == 4 and value.is_contiguous(memory_format=torch.channels_last):
            prefix = prefix.contiguous(memory_format=torch.channels_last)  # as the convolutions were given it
        return rebuild(prefix)

    # -- computing the cache ----------------------------------------------------------------------
    @torch.no_grad()
    def _capture(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        def capture(module, args, kwargs):
            value, _ = _first_argument(args, kwargs)
            if value is None:
                raise RuntimeError(f"{type(module).__name__} takes no tensor as its first input")
            raise _Captured(value)

        def record_format(module, args, output):
            self.output_format = len(output) if isinstance(output, tuple) else None

        hooks = [self.entry.register_forward_pre_hook(capture, with_kwargs=True),
                 self.skipped[-1].register_forward_hook(record_format)]
        try:
            self.backbone(**inputs)
        except _Captured as captured:
            return captured.value
        finally:
            for hook in hooks:
                hook.remove()
        raise RuntimeError("the backbone's forward pass never reached its first trainable block")

    @staticmethod
    def _per_example(value: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per example; token sequences without their padding (batches pad to their own width)."""
        value = value.detach().float().cpu()
        mask = inputs.get("attention_mask")
        if mask is not None and value.ndim == 3 and value.shape[1] == mask.shape[1]:
            return [row[: int(n)].clone() for row, n in zip(value, mask.sum(1).tolist())]
        return [row.clone() for row in value]

    def compute(self, prepared: Any, collate, batch_size: int, lengths: Sequence[int] | None, device: torch.device,
                progress: str | None = "frozen layers (once)") -> str | None:
        """Fill the cache for every example of ``prepared``; returns why it was not filled, or None."""
        batches = Batches(prepared, None, collate, batch_size, lengths=lengths)
        iterator = batches.iterate()
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(batches), desc=progress, unit="batch", mininterval=1.0, dynamic_ncols=True)
        rows: list[torch.Tensor | None] = [None] * batches.size
        size, done = 0, 0
        tokens = sum(lengths) if lengths is not None else 0
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            for batch in iterator:
                inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
                per_example = self._per_example(self._capture(inputs), inputs)
                for index, row in zip(batch["indices"], per_example):
                    rows[int(index)] = row
                size += sum(row.numel() * row.element_size() for row in per_example)
                # Token sequences are kept unpadded, so their size follows the token count (batches come longest
                # first: counting examples would overestimate); fixed-size inputs follow the example count.
                per_token = lengths is not None and per_example[0].ndim == 2
                done += sum(len(row) for row in per_example) if per_token else len(per_example)
                estimate = size / done * (tokens if per_token else batches.size)
                if estimate > MEMORY_LIMIT_BYTES:
                    return (f"it would take about {estimate / 1024**3:.1f} GiB of memory "
                            f"(the limit is {MEMORY_LIMIT_BYTES / 1024**3:.0f} GiB)")
        finally:
            self.backbone.train(was_training)
        shapes = {tuple(row.shape) for row in rows}
        self.rows = torch.stack(rows) if len(shapes) == 1 and rows[0].ndim != 2 else rows
        self.megabytes = size / 1024**2
        return None

    def batch(self, indices: Sequence[int], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cached prefix of the examples at ``indices``, padded like ``inputs``."""
        if isinstance(self.rows, torch.Tensor):
            return self.rows[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
        padded = pad_sequence([self.rows[int(i)] for i in indices], batch_first=True)
        width = inputs["attention_mask"].shape[1] if "attention_mask" in inputs else padded.shape[1]
        return nn.functional.pad(padded, (0, 0, 0, width - padded.shape[1]))  # to the batch's own width

    def collate(self, collate) -> Callable[[Any, Sequence[int]], dict[str, torch.Tensor]]:
        """``collate`` with each batch's cached prefix added to its inputs."""

        def with_prefix(prepared, indices):
            inputs = collate(prepared, indices)
            return {**inputs, PREFIX_INPUT: self.batch(indices, inputs)}

        return with_prefix

    @torch.no_grad()
    def replay_matches(self, model: nn.Module, prepared: Any, collate, count: int = 8) -> bool:
        """Whether the model's outputs with the replayed prefix equal its ordinary outputs (eval mode)."""
        indices = list(range(min(count, len(prepared))))
        inputs = collate(prepared, indices)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            plain = model(**{k: v.to(device) for k, v in inputs.items()})
            replayed = model(**{k: v.to(device) for k, v in {**inputs, PREFIX_INPUT: self.batch(indices, inputs)}.items()})
        finally:
            model.train(was_training)
        return torch.allclose(plain.float(), replayed.float(), rtol=1e-4, atol=1e-4)

