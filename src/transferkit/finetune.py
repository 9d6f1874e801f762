"""The high-level flow of one fine-tuning run, from a RunConfig to a finished run directory.

read data -> load backbone -> (baseline: linear probe on cached frozen features) -> fine-tune with the
chosen strategy -> pick the best epoch on validation -> test once -> save model, metrics, plots, report.
Everything that can be checked is checked before the run directory is created, so a user mistake
never leaves a directory that looks like a run.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backbones.registry import create_backbone
from .config import RunConfig
from .data.dataset import ImageArray, ImagePaths, encode_labels, typical_image_side
from .data.in_memory import keep_staged, staged_tables
from .data.readers import read_examples
from .data.splits import Splits, load_splits
from .engine import distributed
from .engine.batches import Batches, feature_collate
from .engine.checkpoint import CheckpointDir, atomic_write_text, load_weights, save_weights
from .engine.cpu_memory import keep_freed_memory_for_reuse
from .engine.feature_cache import cached_features
from .engine.prefix_cache import FrozenPrefix
from .engine.log import JsonlLog
from .engine.loop import Engine, EngineSettings, default_device, precision_warning
from .errors import UserError
from .evaluation.metrics import full_report
from .evaluation.plots import plot_confusion_matrix, plot_learning_curves
from .evaluation.report import write_report
from .model import ClassificationHead, Classifier
from .data.augmentation import BatchAugmenter
from .objectives import (CrossEntropyObjective, L1Penalty, L2SPPenalty, MixupObjective, RegularisedObjective,
                         balanced_class_weights, class_log_prior)
from .objectives.distillation import DistillationObjective
from .deploy.model_card import write_model_card
from .saved_model import COLUMN_KEYS, FineTunedModel, save_classifier
from .strategies import Strategy, create_strategy
from .strategies.base import check_freeze_batchnorm, decay_groups
from .teacher import check_teacher, median_latency_ms, teacher_logits
from .adaptation import (backbone_features, deep_embedded_validation, dev_warning, load_target, plot_domains,
                         proxy_a_distance, sample_indices)
from .objectives.domain import ADAPTATION_METHODS, DomainAdaptationObjective, TargetStream

DEFAULT_LR = {"probe": 1e-3, "text": 5e-5, "image": 5e-4}
IMBALANCE_WARNING = 5.0  # largest/smallest class ratio above which an unhandled imbalance is flagged


class HeadOnFeatures(nn.Module):
    """The head alone, fed cached backbone features."""

    def __init__(self, head: ClassificationHead):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def resolve_config(config: RunConfig | str | Path | None, fields: dict[str, Any]) -> RunConfig:
    """A RunConfig from a config object or YAML path, with keyword overrides."""
    if isinstance(config, (str, Path)):
        config = RunConfig.load(config)
    if config is None:
        return RunConfig.from_dict(fields, source="finetune()")
    return RunConfig.from_dict({**config.to_dict(), **fields}, source="finetune()")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: resume continues a run, overwrite deletes it")
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"run directory {run_dir} has no config.yaml: there is nothing to resume; drop --resume")
        if (run_dir / "metrics.json").is_file():
            raise UserError(f"run {run_dir} already finished: nothing to resume; use another --out for a new run")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"run directory {run_dir} already exists: choose another --out, pass --resume to continue it, or --overwrite to replace it")


def engine_settings(config: RunConfig, epochs: int, data_parallel: bool = False) -> EngineSettings:
    return EngineSettings(epochs=epochs, schedule=config.schedule, warmup_ratio=config.warmup_ratio,
                          grad_clip=config.grad_clip, precision=config.precision, monitor=config.monitor,
                          patience=config.patience, checkpoint_every=config.checkpoint_every,
                          on_divergence=config.on_divergence, optimizer=config.optimizer, momentum=config.momentum,
                          accumulate=config.accumulate, compile=config.compile, data_parallel=data_parallel,
                          ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)


def _train_head_on_features(config: RunConfig, features: dict[str, torch.Tensor], labels: dict[str, np.ndarray],
                            num_classes: int, *, epochs: int, lr: float, description: str,
                            checkpoints: CheckpointDir | None, log: JsonlLog, resume: bool,
                            objective=None, oversample: bool = False) -> tuple[HeadOnFeatures, Engine]:
    torch.manual_seed(config.seed)
    probe = HeadOnFeatures(ClassificationHead(features["train"].shape[1], num_classes, config.dropout))
    groups = decay_groups(list(probe.parameters()), lr, config.weight_decay)
    train = Batches(features["train"], labels["train"], feature_collate, config.batch_size, shuffle=True, seed=config.seed,
                    oversample=oversample)
    val = Batches(features["val"], labels["val"], feature_collate, config.eval_batch_size)
    engine = Engine(probe, groups, objective or CrossEntropyObjective(), train, val, engine_settings(config, epochs),
                    checkpoints=checkpoints, log=log, description=description)
    engine.fit(resume=resume and checkpoints is not None and checkpoints.find_resumable() is not None)
    return probe, engine


def _objective(config: RunConfig, model: Classifier, train_labels: np.ndarray, teacher_logits: torch.Tensor | None = None):
    """Cross-entropy (class-weighted, smoothed, or mixup as asked), distilled from a teacher's logits when
    given, plus L2-SP and L1 penalties."""
    labelled = train_labels[train_labels >= 0]  # transfer examples (label -1) have no class
    classes = model.head.linear.out_features
    weight = balanced_class_weights(labelled, classes) if config.class_weights == "balanced" else None
    offset = None if config.logit_adjustment is None else class_log_prior(labelled, classes, config.logit_adjustment)
    if config.mixup:
        objective = MixupObjective(config.mixup, weight=weight, label_smoothing=config.label_smoothing, logit_offset=offset)
    else:
        objective = CrossEntropyObjective(label_smoothing=config.label_smoothing, weight=weight, logit_offset=offset)
    if teacher_logits is not None:
        objective = DistillationObjective(objective, teacher_logits, config.distill_alpha, config.distill_temperature)
    penalties = []
    if config.l2_sp:
        penalties.append(L2SPPenalty(model.backbone, config.l2_sp))  # the backbone is still at its pretrained weights
    if config.l1:
        penalties.append(L1Penalty(config.l1))
    return RegularisedObjective(objective, penalties) if penalties else objective


def batch_augmenter(config: RunConfig, backbone) -> BatchAugmenter:
    # A transformers tokenizer masks with its mask (or unknown) token; a static model's plain tokenizer has
    # neither, and token masking drops words instead.
    tokenizer = getattr(backbone, "tokenizer", None)
    mask_id, keep_ids = None, set()
    if hasattr(tokenizer, "all_special_ids"):
        mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        keep_ids = set(tokenizer.all_special_ids)
    augmentations = config.augmentations
    return BatchAugmenter(flip="flip" in augmentations, crop="crop" in augmentations, affine="affine" in augmentations,
                          noise=config.noise or 0.0, token_mask=config.token_mask or 0.0, mask_id=mask_id,
                          keep_ids=keep_ids)


def check_augmentation(config: RunConfig, modality: str) -> None:
    if modality == "text" and (config.image_augment or config.noise):
        raise UserError("'image_augment' and 'noise' apply to images, but this run's data are texts: "
                        "use token_mask or mixup for text")
    if modality == "image" and config.token_mask:
        raise UserError("'token_mask' applies to texts, but this run's data are images: use image_augment, noise or mixup")


def image_size_note(inputs, backbone, config: RunConfig) -> str | None:
    """A note when small images are upsampled a lot to the weights' own input size (the default), which costs
    compute with the square of the factor: 28 px digits at 224 px cost 64x what they cost at 28 px."""
    if backbone.modality != "image" or config.image_size is not None:
        return None
    side, size = typical_image_side(inputs), getattr(backbone, "image_size", None)
    if not side or not size or side * 4 > size:
        return None
    small = max(32, 1 << (side - 1).bit_length())  # the next power of two, at least 32
    options = [s for s in (small, 2 * small) if s < size]
    if not options:
        return None
    other = f" ({options[1]}: ~1/{(size / options[1]) ** 2:.0f})" if len(options) > 1 else ""
    return (f"the images are about {side} px and {config.model} takes {size} px (its weights' own size), so each is "
            f"upsampled {size / side:.0f}x: --image-size {options[0]} needs ~1/{(size / options[0]) ** 2:.0f} of the "
            f"compute per image{other}; compare their accuracy on validation")


def below_probe_warning(baseline: dict, history: list[dict], best_epoch: int, strategy: str) -> str | None:
    """A warning when the fine-tuned model's best validation accuracy is below the linear probe's (validation only:
    the test set chooses nothing). Too few epochs for a large LR-sensitive update, or too high an LR, are the
    usual causes; the probe already shows what the frozen features give."""
    def best(records: list[dict], epoch: int | None) -> float | None:
        if not records or not epoch:
            return None
        return records[epoch - 1].get("val_accuracy")

    probe, tuned = best(baseline.get("history", []), baseline.get("best_epoch")), best(history, best_epoch)
    if probe is None or tuned is None or tuned >= probe:
        return None
    return (f"fine-tuned ({strategy}) validation accuracy {tuned:.4f} is below the linear probe's {probe:.4f}: the saved "
            f"model is the fine-tuned one; try more --epochs, another --lr (transferkit lr-find), --head-init probe, "
            f"or --strategy linear-probe")


def describe_classes(labels: list[str], classes: list[str], config: RunConfig) -> str | None:
    """Print the class counts; return a warning when imbalance is strong and nothing handles it."""
    counts = {c: 0 for c in classes}
    for label in labels:
        counts[label] += 1
    shown = ", ".join(f"{c} {n}" for c, n in list(counts.items())[:20]) + (" ..." if len(counts) > 20 else "")
    print(f"training examples per class: {shown}")
    ratio = max(counts.values()) / max(1, min(counts.values()))
    if (ratio >= IMBALANCE_WARNING and config.class_weights == "none" and config.sampler == "shuffle"
            and config.logit_adjustment is None):
        monitor = "" if config.monitor == "val_macro_f1" else ", and --monitor val_macro_f1"
        return (f"classes are imbalanced (largest/smallest = {ratio:.1f}) and nothing compensates: consider "
                f"--class-weights balanced, --sampler oversample or --logit-adjustment 1{monitor}")
    return None


def _test_report(engine: Engine, features_or_batches: Batches, labels: np.ndarray, classes: list[str]) -> dict:
    logits = engine.predict_logits(features_or_batches)
    return full_report(labels, logits.argmax(1), classes)


def _write_run(run_dir: Path, config: RunConfig, strategy_name: str, model: Classifier, classes: list[str],
               metrics: dict[str, Any]) -> None:
    """model/, plots/, report.html/.md, then metrics.json (last: its presence marks the run finished)."""
    save_classifier(model.cpu(), classes, run_dir / "model",
                    columns={k: getattr(config, k) for k in COLUMN_KEYS})
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    baseline = metrics.get("baseline") or {}
    plots = {"Confusion matrix (test)": plot_confusion_matrix(metrics["test"]["confusion_matrix"], classes,
                                                              plots_dir / "confusion_matrix.png",
                                                              f"{config.model}, {strategy_name}"),
             "Learning curves": plot_learning_curves(
                 {"linear probe": baseline.get("history", []), strategy_name: metrics["history"]},
                 plots_dir / "learning_curves.png", metrics.get("monitor", config.monitor))}
    write_report(run_dir, metrics, plots)
    # The best weights now live in model/; the cache and checkpoints only served an unfinished run.
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_model_card(run_dir)


def _concatenate(first, second):
    """Two prepared splits as one (token-id lists, or images of one kind)."""
    if isinstance(first, list) and isinstance(second, list):
        return first + second
    if isinstance(first, ImageArray) and isinstance(second, ImageArray) and first.pixels.shape[1:] == second.pixels.shape[1:]:
        return ImageArray(np.concatenate([first.pixels, second.pixels]))
    if isinstance(first, ImagePaths) and isinstance(second, ImagePaths):
        return ImagePaths(first.paths + second.paths)
    raise UserError("the transfer data and the training data are stored differently (e.g. an image folder and an IDX "
                    "file, or images of other sizes): give the transfer images in the training data's form")


def _frozen_prefix_cache(config: RunConfig, strategy, model: Classifier, augmenter: BatchAugmenter, prepared,
                         device: torch.device) -> tuple[FrozenPrefix | None, dict | None]:
    """The frozen layers' output, cached when the run allows it (engine/prefix_cache.py), and what was decided
    (for metrics.json; None for strategies whose frozen layers change)."""
    backbone = model.backbone
    if not strategy.fixed_frozen_prefix:
        return None, None
    why_not = None
    if not config.cache_frozen:
        why_not = "turned off (cache_frozen: false)"
    elif augmenter.active or (config.mixup and backbone.modality == "image"):
        why_not = "the inputs are augmented, so the frozen layers see new inputs every epoch"
    elif config.compile:
        why_not = "torch.compile traces the whole forward pass; the replay would break its graph"
    prefix = None
    if why_not is None:
        prefix = FrozenPrefix(backbone, len(strategy.frozen_groups(model)))
        if not prefix.usable:
            why_not = "no frozen block to skip (at most the embeddings or the stem are frozen)"
        else:
            started = time.time()
            model.to(device)
            why_not = prefix.compute(prepared, backbone.collate, config.eval_batch_size, backbone.lengths(prepared), device)
            if why_not is None and not prefix.replay_matches(model, prepared, backbone.collate):
                why_not = "replaying the cached layers did not reproduce this architecture's outputs"
    if why_not is not None:
        if prefix is not None:
            prefix.remove()
        if config.cache_frozen:
            print(f"frozen layers not cached: {why_not}")
        return None, {"used": False, "reason": why_not}
    seconds = time.time() - started
    print(f"frozen layers cached: {len(prefix.skipped)} block(s), {prefix.megabytes:.0f} MB for {len(prepared):,} "
          f"examples, {seconds:.1f} s; later passes run only the trainable layers")
    return prefix, {"used": True, "skipped_blocks": len(prefix.skipped), "megabytes": round(prefix.megabytes, 1),
                    "seconds": round(seconds, 2)}


def _adaptation_objective(config: RunConfig, model: Classifier, target_prepared, train_labels: np.ndarray,
                          steps_per_epoch: int, device: torch.device):
    backbone = model.backbone
    target = Batches(target_prepared, None, backbone.collate, config.batch_size, shuffle=True, seed=config.seed + 7,
                     lengths=backbone.lengths(target_prepared))
    method = ADAPTATION_METHODS[config.adapt_method](backbone.feature_dim, model.head.linear.out_features).to(device)
    weight = balanced_class_weights(train_labels, model.head.linear.out_features) if config.class_weights == "balanced" else None
    objective = DomainAdaptationObjective(method, TargetStream(target, device), steps_per_epoch * config.epochs,
                                          config.adapt_weight, config.label_smoothing, weight)
    return objective, method


def _domain_features(model: Classifier, prepared: dict, sample: dict, batch_size: int, device: torch.device):
    return tuple(backbone_features(model, prepared[name], sample[name], batch_size, device) for name in ("train", "target"))


def _dev_estimate(model: Classifier, prepared: dict, sample: dict, val_labels: np.ndarray, batch_size: int,
                  device: torch.device) -> tuple[dict[str, float], tuple]:
    """DEV's estimate of the model's target risk (no target labels), and the (train, target) features it used."""
    features = _domain_features(model, prepared, sample, batch_size, device)
    val_features = backbone_features(model, prepared["val"], np.arange(len(prepared["val"])), batch_size, device)
    with torch.no_grad():
        logits = model.head(torch.from_numpy(val_features).to(device)).float().cpu()
    val_losses = torch.nn.functional.cross_entropy(logits, torch.as_tensor(val_labels), reduction="none").numpy()
    return deep_embedded_validation(*features, val_features, val_losses), features


def _dev_risk_record(*args) -> dict[str, float]:
    """The DEV risk of the model as it stands, for an epoch's history record (``_dev_estimate``'s arguments)."""
    return {"dev_risk": _dev_estimate(*args)[0]["risk"]}


def _selects_by_dev(config: RunConfig, strategy) -> bool:
    """Whether an adaptation run keeps the epoch with the lowest DEV risk. A linear probe trains on cached
    features and keeps the source-validation choice."""
    return bool(config.target) and config.adapt_selection == "dev" and not strategy.uses_feature_cache


def _adaptation_report(config: RunConfig, model: Classifier, splits: Splits, prepared: dict, sample: dict,
                       before: tuple, classes: list[str], val_labels: np.ndarray, device: torch.device,
                       run_dir: Path, selection: str) -> dict[str, Any]:
    """Target test accuracy (labels used only here), the A-distance before and after, the DEV estimate of the
    target risk (for choosing among runs without target labels), the embedding plot."""
    dev, after = _dev_estimate(model, prepared, sample, val_labels, config.eval_batch_size, device)
    report: dict[str, Any] = {"method": config.adapt_method, "weight": config.adapt_weight, "target": config.target,
                              "target_examples": len(splits.target.inputs), "selection": selection,
                              "a_distance_before": proxy_a_distance(*before), "a_distance_after": proxy_a_distance(*after),
                              "dev": dev}
    if splits.target_test is not None:
        student = FineTunedModel(model, classes, run_dir, config.eval_batch_size)
        full = student.evaluate(splits.target_test)
        report["target_test"] = {"source": config.target_test, "accuracy": full["accuracy"], "macro_f1": full["macro_f1"],
                                 "examples": len(splits.target_test.inputs)}
    plot = plot_domains(before, after, run_dir / "plots" / "domains.png",
                        f"source vs target features ({config.adapt_method}); A-distance "
                        f"{report['a_distance_before']:.2f} -> {report['a_distance_after']:.2f}")
    report["plot"] = str(plot.relative_to(run_dir))
    model.train(False)
    return report


def _compare_with_teacher(config: RunConfig, teacher: FineTunedModel, model: Classifier, classes: list[str],
                          splits: Splits) -> dict[str, Any]:
    """The teacher on this run's test split, and both models' size and latency on a batch of test inputs."""
    report = teacher.evaluate(splits.test)
    student = FineTunedModel(model, classes, Path(config.out), config.eval_batch_size)
    n = min(64, len(splits.test))
    sample = splits.test.subset(list(range(n))).inputs
    student_ms = median_latency_ms(student.predict_logits, sample)
    teacher_ms = median_latency_ms(teacher.predict_logits, sample)
    return {"teacher": config.teacher, "alpha": config.distill_alpha, "temperature": config.distill_temperature,
            "transfer_examples": len(splits.transfer.inputs) if splits.transfer is not None else 0,
            "teacher_test": {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]},
            "teacher_parameters": teacher.parameter_count(),
            "student_parameters": sum(p.numel() for p in model.parameters()),
            "latency_examples": n,
            "teacher_latency_ms": teacher_ms, "student_latency_ms": student_ms,
            "speedup": teacher_ms / student_ms}


def build(config: RunConfig) -> tuple[RunConfig, Splits, Strategy, Classifier]:
    """Everything a run needs before it writes anything: data, backbone, head, strategy, resolved LR.

    Every user mistake surfaces here, before a run directory exists.
    """
    strategy = create_strategy(config)
    splits = load_splits(config)
    if config.teacher:  # before the backbone loads: a wrong teacher is a quick, clean error
        check_teacher(config.teacher, splits.classes, splits.train.modality)
    if config.distill_data:
        splits.transfer = read_examples(config.distill_data, text_column=config.text_column,
                                        image_column=config.image_column, label_column=config.label_column,
                                        require_labels=False)
        if splits.transfer.modality != splits.train.modality or len(splits.transfer.inputs) == 0:
            raise UserError(f"{config.distill_data}: the transfer data must hold {splits.train.modality}s like the "
                            f"training data, and at least one")
    if config.target:
        if config.adapt_method not in ADAPTATION_METHODS:
            raise UserError(f"unknown adaptation method '{config.adapt_method}': choose one of {', '.join(ADAPTATION_METHODS)}")
        columns = dict(text_column=config.text_column, image_column=config.image_column, label_column=config.label_column)
        splits.target = load_target(config.target, classes=splits.classes, modality=splits.train.modality,
                                    role="target", **columns)
        if config.target_test:
            splits.target_test = load_target(config.target_test, classes=splits.classes, modality=splits.train.modality,
                                             role="target test", **columns)
    backbone = create_backbone(config.model, image_size=config.image_size, max_length=config.max_length,
                               pooling=config.pooling, allow_pickle=config.allow_pickle)
    if config.keep_layers is not None:
        backbone.keep_bottom_layers(config.keep_layers)
    if backbone.modality != splits.train.modality:
        raise UserError(f"model '{config.model}' takes {backbone.modality}s but {splits.train.source} holds "
                        f"{splits.train.modality}s: choose a {splits.train.modality} model")
    check_augmentation(config, backbone.modality)
    torch.manual_seed(config.seed)
    model = Classifier(backbone, len(splits.classes), config.dropout)
    strategy.prepare(model)
    strategy.apply(model)
    check_freeze_batchnorm(strategy, model, config.model)
    if config.lr is None:
        default = "probe" if strategy.uses_feature_cache else backbone.modality
        config = config.replace(lr=strategy.default_lr or DEFAULT_LR[default])
    return config, splits, strategy, model


def finetune(config: RunConfig | str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
             **fields: Any) -> dict[str, Any]:
    """Fine-tune a pretrained model on labelled data; returns the metrics also written to ``metrics.json``.

    Example::

        transferkit.finetune(model="minilm-l6", train="reviews.csv", text_column="review", out="runs/reviews")

    ``train``, ``val`` and ``test`` may also be tables held in memory (a pandas DataFrame, a Hugging Face
    ``datasets.Dataset``, a dict of columns): they are stored in ``RUN/data/`` as Parquet, which ``config.yaml``
    names, so the run replays and resumes from its directory.

    Launched by ``torchrun --nproc_per_node N`` (or ``accelerate launch``), the fine-tuning is
    data-parallel across the N processes; process 0 writes the run directory.
    """
    keep_freed_memory_for_reuse()
    created_group = distributed.join_process_group()
    try:
        with staged_tables(fields, "finetune()") as (fields, staged):
            return _finetune(config, resume, overwrite, fields, staged)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _finetune(config: RunConfig | str | Path | None, resume: bool, overwrite: bool, fields: dict[str, Any],
              staged: Path | None = None) -> dict[str, Any]:
    parallel = distributed.world_size() > 1
    main = distributed.is_main()
    if resume and config is None:
        # Resuming needs only the run directory: its config.yaml says everything else.
        check_run_dir(Path(fields.get("out", RunConfig.out)), resume, overwrite)
        config = RunConfig.load(Path(fields.get("out", RunConfig.out)) / "config.yaml")
    config = resolve_config(config, fields)
    run_dir = Path(config.out)
    check_run_dir(run_dir, resume, overwrite)
    config, splits, strategy, model = build(config)
    backbone = model.backbone
    if parallel and config.mixup and backbone.modality == "text":
        raise UserError("mixup on text mixes pooled features outside the model's forward pass, which data-parallel "
                        "runs cannot synchronise: drop --mixup or run in one process")
    distributed.barrier()  # every process has checked the run directory before process 0 changes it

    if main:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = keep_staged(config, staged, run_dir)
        config.save(run_dir / "config.yaml")
        if parallel:
            print(f"data-parallel run: {distributed.world_size()} processes, "
                  f"{torch.distributed.get_backend()} backend, {config.batch_size} examples per step in all")
        warning = describe_classes(splits.train.labels, splits.classes, config)
        if warning:
            print(f"transferkit: warning: {warning}", file=sys.stderr)
        if note := image_size_note(splits.train.inputs, backbone, config):
            print(f"transferkit: note: {note}", file=sys.stderr)
    distributed.barrier()
    log = JsonlLog(run_dir / "log.jsonl" if main else None)
    device = default_device()
    if main and (warning := precision_warning(config.precision, device)):
        print(f"transferkit: warning: {warning}", file=sys.stderr)
    classes = splits.classes
    labels = {name: encode_labels(getattr(splits, name).labels, classes) for name in ("train", "val", "test")}
    prepared = {name: backbone.prepare(getattr(splits, name).inputs) for name in ("train", "val", "test")}
    domains_before = None
    if splits.target is not None:
        prepared["target"] = backbone.prepare(splits.target.inputs)
        # The same examples before and after: the pretrained features' domain gap, then the fine-tuned one.
        domain_sample = {name: sample_indices(len(prepared[name]), config.seed) for name in ("train", "target")}
        domains_before = _domain_features(model, prepared, domain_sample, config.eval_batch_size, device)

    teacher, soft_targets = None, None
    if config.teacher:
        teacher = FineTunedModel.load(config.teacher)
        soft_targets = teacher_logits(teacher, splits.train.inputs, classes)
    train_prepared, train_labels = prepared["train"], labels["train"]
    if splits.transfer is not None:
        # Appended after the labelled examples with label -1: only the teacher's soft term teaches them.
        # (The baseline and the reports keep the labelled training split alone.)
        soft_targets = torch.cat([soft_targets, teacher_logits(teacher, splits.transfer.inputs, classes)])
        train_prepared = _concatenate(prepared["train"], backbone.prepare(splits.transfer.inputs))
        train_labels = np.concatenate([train_labels, np.full(len(splits.transfer.inputs), -1, dtype=train_labels.dtype)])

    features: dict[str, torch.Tensor] = {}
    baseline_path = run_dir / "baseline.json"
    baseline_done = resume and baseline_path.is_file()
    # LP-FT: the probe's head is kept (in the cache, removed with it when the run finishes) to start fine-tuning.
    probe_head_path = run_dir / "cache" / "probe_head.safetensors"
    probe_head_needed = config.head_init == "probe" and not (resume and probe_head_path.is_file())
    train_probe = main and not strategy.uses_feature_cache and ((config.baseline and not baseline_done) or probe_head_needed)
    feature_started = time.time()
    # In a data-parallel run only process 0 trains the probe; a frozen-backbone strategy trains the same
    # head in every process (cheap), and only process 0 keeps files.
    if strategy.uses_feature_cache or train_probe:
        for name in ("train", "val", "test"):
            features[name] = cached_features(run_dir / "cache" if main else None, name, backbone, prepared[name],
                                             config.eval_batch_size, device)
    feature_seconds = time.time() - feature_started

    baseline = None
    if train_probe:
        started = time.time() - feature_seconds
        probe, probe_engine = _train_head_on_features(
            config, features, labels, len(classes), epochs=config.baseline_epochs, lr=config.baseline_lr,
            description="linear probe", checkpoints=None, log=log, resume=False)
        if config.head_init == "probe":
            probe_head_path.parent.mkdir(parents=True, exist_ok=True)
            save_weights(probe.head, probe_head_path)
        if config.baseline:
            test_batches = Batches(features["test"], labels["test"], feature_collate, config.eval_batch_size)
            baseline = {"test": _test_report(probe_engine, test_batches, labels["test"], classes),
                        "history": probe_engine.history, "best_epoch": probe_engine.best_epoch,
                        "seconds": time.time() - started}
            atomic_write_text(baseline_path, json.dumps(baseline))
    elif config.baseline and baseline_done and main and not strategy.uses_feature_cache:
        baseline = json.loads(baseline_path.read_text())

    started = time.time()
    checkpoints = CheckpointDir(run_dir / "checkpoints")
    metrics_extra: dict[str, Any] = {}
    if strategy.uses_feature_cache:
        probe, engine = _train_head_on_features(
            config, features, labels, len(classes), epochs=config.epochs, lr=config.head_lr or config.lr,
            description="linear probe", checkpoints=checkpoints if main else None, log=log, resume=resume and main,
            objective=_objective(config, model, labels["train"], soft_targets), oversample=config.sampler == "oversample")
        model.head = probe.head
        test_batches = Batches(features["test"], labels["test"], feature_collate, config.eval_batch_size)
    else:
        if config.head_init == "probe":
            distributed.barrier()  # process 0 has written the probe's head
            load_weights(model.head, probe_head_path)
        augmenter = batch_augmenter(config, backbone)
        prefix, cache_report = _frozen_prefix_cache(config, strategy, model, augmenter, train_prepared, device)
        if cache_report is not None:
            metrics_extra["frozen_prefix_cache"] = cache_report
        collate = prefix.collate(backbone.collate) if prefix is not None else backbone.collate
        train = Batches(train_prepared, train_labels, collate, config.batch_size, shuffle=True,
                        seed=config.seed, lengths=backbone.lengths(train_prepared),
                        oversample=config.sampler == "oversample", transform=augmenter if augmenter.active else None)
        val = Batches(prepared["val"], labels["val"], backbone.collate, config.eval_batch_size,
                      lengths=backbone.lengths(prepared["val"]))
        groups = strategy.param_groups(model, config.lr, config.head_lr, config.weight_decay,
                                       backbone_weight_decay=0.0 if config.l2_sp else None)
        objective = _objective(config, model, train_labels, soft_targets)
        if splits.target is not None:
            if parallel:
                raise UserError("domain adaptation runs in one process: launch it without torchrun/accelerate")
            objective, method = _adaptation_objective(config, model, prepared["target"], labels["train"], len(train), device)
            groups += decay_groups(list(method.parameters()), config.adapt_lr or config.head_lr or config.lr,
                                   config.weight_decay)
        settings, epoch_metrics = engine_settings(config, config.epochs, data_parallel=parallel), None
        if _selects_by_dev(config, strategy):
            # Under a domain shift the source validation accuracy is a poor guide to the target: with 150 source
            # examples it kept epoch 1 of an amazon -> imdb run whose last epoch had 3.4 pts more target accuracy
            # (README, 'Adapt to another domain'). DEV estimates each epoch's target risk without target labels.
            settings.monitor = "dev_risk"
            epoch_metrics = functools.partial(_dev_risk_record, model, prepared, domain_sample, labels["val"],
                                              config.eval_batch_size, device)
        engine = Engine(model, groups, objective, train, val, settings,
                        set_train_mode=strategy.set_train_mode, on_epoch_start=strategy.on_epoch_start,
                        checkpoints=checkpoints, log=log, description=f"fine-tune ({strategy.name})",
                        epoch_metrics=epoch_metrics)
        resuming = resume and checkpoints.find_resumable() is not None
        if not resuming:
            # A fixed seed here makes the fine-tuning phase independent of whether the baseline ran in
            # this process or was read back from baseline.json after an interruption.
            torch.manual_seed(config.seed + 1)
        engine.fit(resume=resuming)
        if prefix is not None:
            prefix.remove()  # the hooks and the cached tensors served training only
        test_batches = Batches(prepared["test"], labels["test"], backbone.collate, config.eval_batch_size,
                               lengths=backbone.lengths(prepared["test"]))
    seconds = time.time() - started + (feature_seconds if strategy.uses_feature_cache else 0.0)
    test = _test_report(engine, test_batches, labels["test"], classes)
    metrics: dict[str, Any] = {
        "model": config.model, "strategy": strategy.name,
        "trainable_parameters": strategy.trainable_parameters(model),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "data": {"train_source": config.train if staged else splits.train.source, "train": len(splits.train), "val": len(splits.val),
                 "test": len(splits.test), "classes": classes},
        "test": test, "history": engine.history, "best_epoch": engine.best_epoch, "monitor": engine.settings.monitor,
        "seconds": seconds, **metrics_extra,
    }
    if baseline is not None:
        metrics["baseline"] = baseline
        if main and (warning := below_probe_warning(baseline, engine.history, engine.best_epoch, strategy.name)):
            metrics["warnings"] = [warning]
            print(f"transferkit: warning: {warning}", file=sys.stderr)
    if teacher is not None:
        metrics["distillation"] = _compare_with_teacher(config, teacher, model, classes, splits)
    if domains_before is not None and main:
        selection = "lowest DEV target risk" if _selects_by_dev(config, strategy) else "source validation split"
        metrics["adaptation"] = _adaptation_report(config, model, splits, prepared, domain_sample, domains_before,
                                                   classes, labels["val"], device, run_dir, selection)
        warning = dev_warning([h["dev_risk"] for h in engine.history if "dev_risk" in h]) \
            if _selects_by_dev(config, strategy) else None
        if warning:
            metrics["adaptation"]["dev_warning"] = warning
            print(f"transferkit: warning: {warning}", file=sys.stderr)
    if main:
        _write_run(run_dir, config, strategy.name, model, classes, metrics)
    distributed.barrier()  # no process returns before the run directory is complete
    return metrics

