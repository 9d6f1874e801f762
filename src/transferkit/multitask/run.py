"""The flow of one multi-task run: read every task's data, build the shared model, train all tasks
in one engine, test each task, fine-tune each task alone on the same budget for comparison, and write
the run directory (model, metrics, report, plots).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones.registry import create_backbone
from ..data.dataset import encode_labels
from ..data.splits import Splits, load_splits
from ..engine.batches import Batches, map_in_order
from ..engine.checkpoint import CheckpointDir, atomic_write_text
from ..engine.log import JsonlLog
from ..engine.loop import Engine, default_device
from ..errors import UserError
from ..evaluation.metrics import full_report, summary_metrics
from ..finetune import DEFAULT_LR, batch_augmenter, check_augmentation, check_run_dir, engine_settings, finetune
from ..objectives import CrossEntropyObjective, balanced_class_weights
from ..strategies import create_strategy
from ..strategies.base import check_freeze_batchnorm, decay_groups
from .config import MultiTaskConfig
from .model import MultiTaskModel, save_multitask, soft_sharing_penalty
from .plots import plot_task_curves
from .sampling import TaskBatches
from .weighting import LossWeighting, create_weighting

WEIGHTING_LR = 1e-3  # the weighting's own parameters (uncertainty's log-variances), unless --head-lr is given


class MultiTaskTrainer(nn.Module):
    """The model and its loss weighting in one module, so a checkpoint holds both (a resumed run keeps the
    learned weights and DWA's loss history)."""

    def __init__(self, model: MultiTaskModel, weighting: LossWeighting):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, task: str, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(task=task, **inputs)


class MultiTaskObjective:
    """Each part of the step through its task's head and loss; the weighting combines the task losses;
    soft sharing adds its penalty. Several batches of one task in a step average."""

    def __init__(self, trainer: MultiTaskTrainer, criteria: dict[str, CrossEntropyObjective], sharing_strength: float):
        self.trainer = trainer
        self.criteria = criteria
        self.sharing_strength = sharing_strength
        self.step_weights: list[dict[str, float]] = []

    def __call__(self, _model: nn.Module, batch: dict) -> tuple[torch.Tensor, None]:
        model, weighting = self.trainer.model, self.trainer.weighting
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for task, part in batch["parts"]:
            loss, _ = self.criteria[task](model.view(task), part)
            sums[task] = sums[task] + loss if task in sums else loss
            counts[task] = counts.get(task, 0) + 1
        losses = {task: sums[task] / counts[task] for task in sums}
        total = weighting.combine(losses, model.shared_parameters())
        if model.sharing == "soft" and self.sharing_strength > 0:
            total = total + soft_sharing_penalty(model, self.sharing_strength)
        self.step_weights.append(weighting.current_weights())
        return total, None

    def epoch_weights(self) -> dict[str, float]:
        """The mean loss weight of each task over the epoch just finished (recorded in the history)."""
        steps, self.step_weights = self.step_weights, []
        stats = self.trainer.weighting.epoch_stats()
        if not steps:
            return stats
        return {**{f"weight_{t}": float(np.mean([s[t] for s in steps])) for t in steps[0]}, **stats}


def _task_logits(model: MultiTaskModel, task: str, batches: Batches, device: torch.device) -> torch.Tensor:
    model.eval()
    return map_in_order(batches, lambda inputs: model(task=task, **inputs), device)


def _evaluator(model: MultiTaskModel, device: torch.device):
    """Validation: each task's loss/accuracy/macro-F1, and their means (what --monitor watches)."""

    def evaluate(engine: Engine, val: dict[str, Batches]) -> dict[str, float]:
        results: dict[str, float] = {}
        for task, batches in val.items():
            logits = _task_logits(model, task, batches, device)
            results[f"{task}_loss"] = float(torch.nn.functional.cross_entropy(logits, batches.labels))
            for key, value in summary_metrics(batches.labels.numpy(), logits.argmax(1).numpy()).items():
                results[f"{task}_{key}"] = value
        for key in ("loss", "accuracy", "macro_f1"):
            results[key] = float(np.mean([results[f"{t}_{key}"] for t in val]))
        return results

    return evaluate


def _load_tasks(config: MultiTaskConfig) -> dict[str, Splits]:
    splits: dict[str, Splits] = {}
    for name in config.names:
        try:
            splits[name] = load_splits(config.task_config(name))
        except UserError as error:
            raise UserError(f"task '{name}': {error}") from None
    modalities = {name: s.train.modality for name, s in splits.items()}
    if len(set(modalities.values())) > 1:
        raise UserError(f"the tasks hold different kinds of data ({', '.join(f'{n}: {m}s' for n, m in modalities.items())}): "
                        f"one backbone serves one modality")
    return splits


def build_multitask(config: MultiTaskConfig) -> tuple[MultiTaskConfig, dict[str, Splits], Any, MultiTaskModel]:
    """Data, model and strategy; every user mistake surfaces here, before a run directory exists."""
    base = config.base
    strategy = create_strategy(base)
    splits = _load_tasks(config)
    backbone = create_backbone(base.model, image_size=base.image_size, max_length=base.max_length,
                               pooling=base.pooling, allow_pickle=base.allow_pickle)
    if base.keep_layers is not None:
        backbone.keep_bottom_layers(base.keep_layers)
    modality = next(iter(splits.values())).train.modality
    if backbone.modality != modality:
        raise UserError(f"model '{base.model}' takes {backbone.modality}s but the tasks hold {modality}s: choose a {modality} model")
    check_augmentation(base, modality)
    torch.manual_seed(base.seed)
    model = MultiTaskModel(backbone, {t: s.classes for t, s in splits.items()}, base.dropout, config.sharing)
    prepared = set()
    for task in config.names:  # adapters go into each distinct backbone once
        view = model.view(task)
        if id(view.backbone) not in prepared:
            strategy.prepare(view)
            prepared.add(id(view.backbone))
    for task in config.names:
        strategy.apply(model.view(task))
    check_freeze_batchnorm(strategy, model, base.model)
    if base.lr is None:
        config = config.replace(lr=strategy.default_lr or DEFAULT_LR[modality])
    return config, splits, strategy, model


def _param_groups(config: MultiTaskConfig, strategy, model: MultiTaskModel, weighting: LossWeighting) -> list[dict]:
    """Each task's strategy groups, the shared backbone's parameters once, plus the weighting's own."""
    base = config.base
    seen: set[int] = set()
    groups = []
    for task in config.names:
        for group in strategy.param_groups(model.view(task), base.lr, base.head_lr, base.weight_decay):
            params = [p for p in group["params"] if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({**group, "params": params})
    return groups + decay_groups(list(weighting.parameters()), base.head_lr or WEIGHTING_LR, 0.0)


def _single_task_runs(config: MultiTaskConfig, run_dir: Path) -> dict[str, dict]:
    """Each task fine-tuned alone with the same recipe and epochs (the comparison that shows negative transfer)."""
    results = {}
    for name in config.names:
        out = run_dir / "single" / name
        if (out / "metrics.json").is_file():  # finished before an interruption
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            print(f"single-task fine-tuning of '{name}' (the comparison)")
            metrics = finetune(config.task_config(name).replace(out=str(out)), overwrite=True)
        results[name] = {"test": {k: metrics["test"][k] for k in ("accuracy", "macro_f1")},
                         "seconds": metrics["seconds"], "best_epoch": metrics["best_epoch"]}
    return results


def delta_m(multi: dict[str, float], single: dict[str, float]) -> float:
    """Average relative change of the multi-task metric over single-task, in % (Maninis et al. 2019; higher is
    better for accuracy): negative means negative transfer on average."""
    return float(100 * np.mean([(multi[t] - single[t]) / single[t] for t in multi]))


def fit_multitask(config: MultiTaskConfig | str | Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune one model on several tasks; returns the metrics also written to ``metrics.json``.

    Example::

        transferkit.fit_multitask("multi.yaml")
    """
    if isinstance(config, (str, Path)):
        config = MultiTaskConfig.load(config)
    run_dir = Path(config.out)
    check_run_dir(run_dir, resume, overwrite)
    config, splits, strategy, model = build_multitask(config)
    base = config.base
    weighting = create_weighting(config.weighting, config.names, {t.name: t.weight for t in config.tasks})
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    device = default_device()
    backbone = model.unique_backbones()[0]
    train, val, test, criteria = {}, {}, {}, {}
    for name, task_splits in splits.items():
        task_config = config.task_config(name)
        classes = task_splits.classes
        labels = {s: encode_labels(getattr(task_splits, s).labels, classes) for s in ("train", "val", "test")}
        prepared = {s: backbone.prepare(getattr(task_splits, s).inputs) for s in ("train", "val", "test")}
        augmenter = batch_augmenter(task_config, backbone)
        train[name] = Batches(prepared["train"], labels["train"], backbone.collate, base.batch_size, shuffle=True,
                              seed=base.seed, lengths=backbone.lengths(prepared["train"]),
                              oversample=task_config.sampler == "oversample",
                              transform=augmenter if augmenter.active else None)
        val[name], test[name] = (Batches(prepared[s], labels[s], backbone.collate, base.eval_batch_size,
                                         lengths=backbone.lengths(prepared[s])) for s in ("val", "test"))
        weight = balanced_class_weights(labels["train"], len(classes)) if task_config.class_weights == "balanced" else None
        criteria[name] = CrossEntropyObjective(task_config.label_smoothing, weight)
        print(f"task '{name}': {len(task_splits.train)} train, {len(task_splits.val)} val, {len(task_splits.test)} test, "
              f"{len(classes)} classes")

    trainer = MultiTaskTrainer(model, weighting)
    objective = MultiTaskObjective(trainer, criteria, config.sharing_strength)
    task_batches = TaskBatches(train, config.task_sampling, config.sampling_temperature, base.seed)
    views = [model.view(t) for t in config.names]

    def set_train_mode(_trainer: nn.Module) -> None:
        trainer.train()
        for view in views:
            strategy.set_train_mode(view)

    def on_epoch_start(_trainer: nn.Module, epoch: int) -> None:
        for view in views:
            strategy.on_epoch_start(view, epoch)
        weighting.start_epoch(epoch)

    checkpoints = CheckpointDir(run_dir / "checkpoints")
    engine = Engine(trainer, _param_groups(config, strategy, model, weighting), objective, task_batches, val,
                    engine_settings(base, base.epochs), set_train_mode=set_train_mode, on_epoch_start=on_epoch_start,
                    checkpoints=checkpoints, log=JsonlLog(run_dir / "log.jsonl"),
                    description=f"multi-task ({config.sharing}, {config.weighting})",
                    evaluator=_evaluator(model, device), epoch_metrics=objective.epoch_weights)
    resuming = resume and checkpoints.find_resumable() is not None
    if not resuming:
        torch.manual_seed(base.seed + 1)
    started = time.time()
    engine.fit(resume=resuming)
    seconds = time.time() - started

    tasks: dict[str, Any] = {}
    for name, task_splits in splits.items():
        logits = _task_logits(model, name, test[name], device)
        tasks[name] = {"test": full_report(test[name].labels.numpy(), logits.argmax(1).numpy(), task_splits.classes),
                       "data": {"train_source": task_splits.train.source, "train": len(task_splits.train),
                                "val": len(task_splits.val), "test": len(task_splits.test)},
                       "weight": next(t.weight for t in config.tasks if t.name == name)}
    metrics: dict[str, Any] = {
        "kind": "multitask", "model": base.model, "strategy": strategy.name, "sharing": config.sharing,
        "weighting": config.weighting, "task_sampling": config.task_sampling,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "tasks": tasks, "history": engine.history, "best_epoch": engine.best_epoch, "seconds": seconds,
    }
    save_multitask(model.cpu(), run_dir / "model")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if config.single_task_baseline:
        single = _single_task_runs(config, run_dir)
        for name, result in single.items():
            tasks[name]["single_task"] = result
            tasks[name]["relative_change"] = (tasks[name]["test"]["accuracy"] - result["test"]["accuracy"]) / result["test"]["accuracy"]
        metrics["delta_m"] = delta_m({t: tasks[t]["test"]["accuracy"] for t in tasks},
                                     {t: single[t]["test"]["accuracy"] for t in single})
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    metrics["plots"] = [str(p.relative_to(run_dir)) for p in plot_task_curves(engine.history, config.names, plots_dir)]
    (run_dir / "report.md").write_text(multitask_report(metrics), encoding="utf-8")
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def multitask_table(metrics: dict[str, Any]) -> str:
    """Per task: multi-task test accuracy beside single-task, and delta_m."""
    rows = [("task", "multi-task acc", "macro-F1", "single-task acc", "relative change")]
    for name, task in metrics["tasks"].items():
        single = task.get("single_task")
        rows.append((name, f"{task['test']['accuracy']:.4f}", f"{task['test']['macro_f1']:.4f}",
                     f"{single['test']['accuracy']:.4f}" if single else "-",
                     f"{100 * task['relative_change']:+.2f}%" if single else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "delta_m" in metrics:
        lines.append(f"delta_m (mean relative change vs single-task): {metrics['delta_m']:+.2f}%")
    return "\n".join(lines)


def multitask_report(metrics: dict[str, Any]) -> str:
    lines = [f"# Multi-task run: {metrics['model']}, {metrics['strategy']}, {metrics['sharing']} sharing, "
             f"{metrics['weighting']} weighting", "", "```", multitask_table(metrics), "```", "",
             f"Multi-task training: {metrics['seconds']:.0f} s, best epoch {metrics['best_epoch']} (mean validation "
             f"metric over the tasks).", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in metrics.get("plots", [])]
    return "\n".join(lines) + "\n"
