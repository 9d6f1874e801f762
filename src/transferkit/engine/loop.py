"""The one training loop. It knows nothing of text vs images, strategies or tasks.

It takes a model, optimiser parameter groups, an objective ``(model, batch) -> (loss, logits)``,
train/val batches and settings; it runs epochs with a warm-up schedule, gradient clipping, optional
bf16 autocast, validation, early stopping with restore-best, atomic checkpoints, resume, a progress
bar with ETA and a JSONL log.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..evaluation.metrics import summary_metrics
from .batches import Batches, map_in_order
from . import distributed
from .checkpoint import CheckpointDir, load_weights, rng_state, set_rng_state
from .log import JsonlLog
from .schedules import make_schedule
from .weight_average import WeightAverage


LOWER_IS_BETTER = ("val_loss", "dev_risk")  # monitors where a smaller value is the better epoch


@dataclass
class EngineSettings:
    epochs: int = 3
    schedule: str = "linear"
    warmup_ratio: float = 0.06
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    monitor: str = "val_accuracy"
    patience: int | None = 2
    log_every: int = 20
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints (epoch ends always save)
    on_divergence: str = "stop"  # or "skip": skip a NaN/inf batch and halve the learning rate
    optimizer: str = "adamw"  # or "sgd" (with momentum)
    accumulate: int = 1  # batches whose gradients add up to one optimiser step
    momentum: float = 0.9
    compile: bool = False  # torch.compile the model (dynamic shapes: text batches vary in length)
    data_parallel: bool = False  # split each batch across the processes of a torchrun/accelerate launch
    ema_decay: float | None = None  # validate, checkpoint and keep an exponential moving average of the weights
    ema_warmup: bool = True  # the average's decay warms up (min(decay, (1 + t) / (10 + t))); False: the decay throughout


def default_device() -> torch.device:
    # The current CUDA device: a data-parallel launcher gives each process its own.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def precision_warning(precision: str, device: torch.device) -> str | None:
    """Why bf16 would slow this run down, if it would. A CPU without native bf16 matrix instructions
    (AVX-512 BF16 or AMX; e.g. an AVX2-only CPU) emulates them: on such a 2-core AMD EPYC a 384x1536 linear
    layer's forward and backward ran 32x slower under bf16 autocast than in fp32."""
    if precision != "bf16" or device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f"--precision bf16 on a CPU without native bf16 instructions ({torch.backends.cpu.get_cpu_capability()}): "
            f"bf16 is emulated here and much slower than fp32; use --precision fp32")


def _optimizer(param_groups: list[dict], settings: EngineSettings) -> torch.optim.Optimizer:
    """AdamW (the fused kernel where it is safe, else multi-tensor foreach) or SGD.

    The fused AdamW makes one pass over each parameter's memory instead of one per operation: 4x faster
    than foreach for MiniLM's 22.7M parameters on CPU, about a fifth of a training step. It is used only
    when every parameter has the default (contiguous) layout: with torch 2.13 on CPU the fused kernel
    mis-updates a parameter whose gradient has other strides than the parameter (seen with
    channels_last convolutions), so convolutional backbones keep foreach.
    """
    if settings.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=settings.momentum, foreach=True)
    parameters = [p for group in param_groups for p in group["params"]]
    if parameters and all(p.is_contiguous() and p.dtype in (torch.float32, torch.bfloat16) for p in parameters):
        try:
            return torch.optim.AdamW(param_groups, fused=True)
        except (RuntimeError, ValueError):  # a device without a fused kernel
            pass
    return torch.optim.AdamW(param_groups, foreach=True)


def move_batch(device: torch.device, batch: dict) -> dict:
    if "parts" in batch:  # a multi-task step: (task, batch) pairs; "labels" counts the step's examples
        parts = [(task, move_batch(device, part)) for task, part in batch["parts"]]
        return {"parts": parts, "labels": torch.cat([part["labels"] for _, part in parts])}
    moved = {"inputs": {k: v.to(device, non_blocking=True) for k, v in batch["inputs"].items()}}
    if "labels" in batch:
        moved["labels"] = batch["labels"].to(device, non_blocking=True)
    if "indices" in batch:  # which examples these are: objectives with per-example targets look them up
        moved["indices"] = batch["indices"]
    return moved


class Engine:
    def __init__(self, model: nn.Module, param_groups: list[dict], objective: Callable, train: Batches,
                 val: Batches | None, settings: EngineSettings, *,
                 set_train_mode: Callable[[nn.Module], None] | None = None,
                 on_epoch_start: Callable[[nn.Module, int], None] | None = None,
                 checkpoints: CheckpointDir | None = None, log: JsonlLog | None = None,
                 description: str = "train", device: torch.device | None = None,
                 evaluator: Callable[["Engine", Batches], dict[str, float]] | None = None,
                 epoch_metrics: Callable[[], dict[str, float]] | None = None):
        self.device = device or default_device()
        self.model = model.to(self.device)
        self.objective = objective
        self.train_batches = train
        self.val_batches = val
        self.settings = settings
        self.set_train_mode = set_train_mode or (lambda m: m.train())
        self.on_epoch_start = on_epoch_start or (lambda m, e: None)
        self.checkpoints = checkpoints
        self.log = log or JsonlLog(None)
        self.description = description
        # Validation metrics; classification (loss, accuracy, macro-F1) unless an objective brings its own.
        self.evaluator = evaluator
        # Extra values recorded in each epoch's history (e.g. multi-task loss weights); checkpointed with it.
        self.epoch_metrics = epoch_metrics
        self.optimizer = _optimizer(param_groups, settings)
        # The compiled module shares its parameters with self.model, which stays the one saved and loaded.
        self.eval_model = torch.compile(self.model, dynamic=True) if settings.compile else self.model
        self.parallel = settings.data_parallel and distributed.world_size() > 1
        self.shard = (distributed.rank(), distributed.world_size()) if self.parallel else None
        self.main = distributed.is_main()
        self._wrapped_for: frozenset[int] | None = None
        self.forward_model = self.eval_model
        total = settings.epochs * math.ceil(len(train) / settings.accumulate)
        self.scheduler = make_schedule(self.optimizer, settings.schedule, total, int(settings.warmup_ratio * total))
        self.history: list[dict] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.lr_scale = 1.0
        self._best_state: dict | None = None
        self.weight_average = (WeightAverage(self.model, settings.ema_decay, settings.ema_warmup)
                               if settings.ema_decay else None)

    # -- evaluation -------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.precision == "bf16")

    @torch.no_grad()
    def predict_logits(self, batches: Batches) -> np.ndarray:
        self.model.eval()
        def forward(inputs: dict) -> torch.Tensor:
            with self._autocast():
                return self.eval_model(**inputs)

        return map_in_order(batches, forward, self.device).numpy()

    def evaluate(self, batches: Batches) -> dict[str, float]:
        if self.evaluator is not None:
            return self.evaluator(self, batches)
        logits = self.predict_logits(batches)
        labels = batches.labels.numpy()
        loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), batches.labels))
        return {"loss": loss, **summary_metrics(labels, logits.argmax(1))}

    # -- early stopping ---------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.settings.monitor in LOWER_IS_BETTER:
            return value < self.best_value
        return value > self.best_value

    # -- resume -----------------------------------------------------------------------------------
    def _state(self, epoch: int, steps_done: int, running: float, seen: int) -> dict:
        return {"epoch": epoch, "steps_done": steps_done, "running_loss": running, "seen": seen,
                "best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "history": self.history, "lr_scale": self.lr_scale}

    def _restore(self) -> tuple[int, int, float, int]:
        """Load the newest intact checkpoint; returns (epoch, first step, running loss sum, examples seen)."""
        folder, state, resumable = self.checkpoints.load_state()
        for warning in self.checkpoints.warnings:
            tqdm.write(f"transferkit: warning: {warning}", file=sys.stderr)
        load_weights(self.model, folder / "model.safetensors")
        if self.weight_average is not None and "weight_average" in resumable:
            self.weight_average.resume(self.model, resumable["weight_average"])
        elif self.weight_average is not None:  # a checkpoint from before the average: it starts here
            self.weight_average = WeightAverage(self.model, self.settings.ema_decay, self.settings.ema_warmup)
        self.optimizer.load_state_dict(resumable["optimizer"])
        self.scheduler.load_state_dict(resumable["scheduler"])
        set_rng_state(resumable["rng"])
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs, self.history = state["bad_epochs"], state["history"]
        self.lr_scale = state.get("lr_scale", 1.0)
        epoch, steps_done = int(state["epoch"]), int(state["steps_done"])
        if steps_done >= len(self.train_batches):
            return epoch + 1, 0, 0.0, 0
        return epoch, steps_done, float(state["running_loss"]), int(state["seen"])

    # -- training ---------------------------------------------------------------------------------
    def _diverged(self, what: str, epoch: int, step: int) -> bool:
        """Stop, or (with on_divergence='skip') skip the batch and halve the learning rate."""
        where = f"epoch {epoch + 1}, batch {step + 1}"
        if self.settings.on_divergence != "skip":
            raise UserError(f"{self.description}: the {what} at {where}: lower --lr, or use --precision fp32 "
                            f"(the best checkpoint so far is kept)")
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scale *= 0.5
        self.scheduler.base_lrs = [lr * 0.5 for lr in self.scheduler.base_lrs]
        tqdm.write(f"transferkit: warning: {self.description}: the {what} at {where}; batch skipped, learning rate halved",
                   file=sys.stderr)
        self.log.write(phase=self.description, event="diverged", epoch=epoch + 1, step=step + 1, what=what)
        return True

    def _train_step(self, batch: dict, epoch: int, step: int) -> float | None:
        """Forward and backward one batch; every ``accumulate`` batches (and at the epoch's end) an optimiser
        step. Returns the loss, or None when the batch was skipped as divergent."""
        settings = self.settings
        steps_per_epoch = len(self.train_batches)
        group_start = step - step % settings.accumulate
        group_size = min(settings.accumulate, steps_per_epoch - group_start)
        with self._autocast():
            loss, _ = self.objective(self.forward_model, batch)
        finite = bool(torch.isfinite(loss))
        if self.parallel:  # every process must take the same decision, or the gradient exchange hangs
            finite = distributed.all_true(finite, self.device)
        if not finite:
            self._diverged(f"loss became {loss.item()}", epoch, step)
            return None
        if step + 1 < group_start + group_size:
            # Gradients of the group's earlier batches stay local; the last backward averages the sum.
            with self.forward_model.no_sync() if self.parallel else contextlib.nullcontext():
                (loss / group_size).backward()
            return loss.item()
        (loss / group_size).backward()
        parameters = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip or math.inf)
        if not torch.isfinite(norm):
            self._diverged(f"gradient norm became {norm.item()}", epoch, step)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.weight_average is not None:
            self.weight_average.update(self.model)
        return loss.item()

    def _averaged(self):
        """With an EMA of the weights, the model holds it inside the block (what is validated and saved)."""
        return self.weight_average.swapped_in(self.model) if self.weight_average is not None else contextlib.nullcontext()

    def _at_step_boundary(self, step: int) -> bool:
        """Whether no gradients are pending after batch ``step`` (a checkpoint may be taken)."""
        return (step + 1) % self.settings.accumulate == 0

    def fit(self, resume: bool = False) -> list[dict]:
        epoch, start, running, seen = self._restore() if resume else (0, 0, 0.0, 0)
        settings = self.settings
        steps_per_epoch = len(self.train_batches)
        stopped = self.bad_epochs >= (settings.patience or math.inf)
        bar = tqdm(total=settings.epochs * steps_per_epoch, initial=epoch * steps_per_epoch + start,
                   desc=self.description, unit="step", dynamic_ncols=True, mininterval=1.0, leave=True,
                   disable=True if not self.main else None)
        while epoch < settings.epochs and not stopped:
            started = time.time()
            self.optimizer.zero_grad(set_to_none=True)
            self.on_epoch_start(self.model, epoch)
            self.set_train_mode(self.model)
            self._wrap_for_data_parallel()
            for step, batch in enumerate(self.train_batches.iterate(epoch, start, shard=self.shard), start=start):
                batch = move_batch(self.device, batch)
                loss = self._train_step(batch, epoch, step)
                if loss is not None:
                    running += loss * len(batch["labels"])
                    seen += len(batch["labels"])
                bar.update(1)
                if step % settings.log_every == 0 and seen:
                    bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
                    self.log.write(phase=self.description, epoch=epoch + 1, step=step + 1, loss=loss,
                                   lr=self.scheduler.get_last_lr()[0])
                every = settings.checkpoint_every
                if (every and self.checkpoints is not None and (step + 1) % every == 0 and step + 1 < steps_per_epoch
                        and self._at_step_boundary(step)):
                    self._save(epoch, step + 1, running, seen, improved=False)
            record = {"epoch": epoch + 1, "train_loss": running / max(seen, 1), "seconds": time.time() - started}
            with self._averaged():  # the weights validated are the ones saved
                if self.val_batches is not None:
                    record.update({f"val_{k}": v for k, v in self.evaluate(self.val_batches).items()})
                if self.epoch_metrics is not None:
                    record.update(self.epoch_metrics())
            improved = self.val_batches is None or self._improved(record[settings.monitor])
            if improved:
                self.best_value = record.get(settings.monitor)
                self.best_epoch = epoch + 1
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            self.history.append(record)
            self.log.write(phase=self.description, **record)
            shown = {k: f"{v:.4f}" for k, v in record.items()
                     if k in ("train_loss", "val_loss", "val_accuracy", settings.monitor)}
            bar.set_postfix(**shown, refresh=True)
            if self.main:
                bar.write(f"{self.description} epoch {epoch + 1}/{settings.epochs}: "
                          + ", ".join(f"{k} {v}" for k, v in shown.items()) + (" (best)" if improved else ""))
            stopped = settings.patience is not None and self.bad_epochs >= settings.patience
            self._save(epoch, steps_per_epoch, running, seen, improved)
            epoch, start, running, seen = epoch + 1, 0, 0.0, 0
        bar.close()
        self._restore_best()
        return self.history

    def _wrap_for_data_parallel(self) -> None:
        """Wrap the model in DDP for the parameters that train now; strategies such as gradual unfreezing
        change that set between epochs, and DDP only exchanges gradients of the set it was built with."""
        if not self.parallel:
            return
        trainable = frozenset(id(p) for p in self.model.parameters() if p.requires_grad)
        if trainable != self._wrapped_for:
            self.forward_model = distributed.wrap(self.eval_model, self.device)
            self._wrapped_for = trainable

    def _save(self, epoch: int, steps_done: int, running: float, seen: int, improved: bool) -> None:
        with self._averaged():
            self._save_held_weights(epoch, steps_done, running, seen, improved)

    def _save_held_weights(self, epoch: int, steps_done: int, running: float, seen: int, improved: bool) -> None:
        if self.checkpoints is None:
            if improved:
                self._best_state = copy.deepcopy(self.model.state_dict())
            return
        if self.main:  # all processes hold the same weights; one writes them
            resumable = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "rng": rng_state()}
            if self.weight_average is not None:  # the model file holds the average; training resumes from these
                resumable["weight_average"] = self.weight_average.state_for_resume()
            pointers = ("latest", "best") if improved else ("latest",)
            self.checkpoints.save(f"epoch-{epoch + 1:04d}-step-{steps_done:06d}", self.model,
                                  self._state(epoch, steps_done, running, seen), resumable, pointers)
        if self.parallel:
            distributed.barrier()

    def _restore_best(self) -> None:
        if self.checkpoints is not None:
            best = self.checkpoints.find("best")
            if best is not None:
                load_weights(self.model, best / "model.safetensors")
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)
