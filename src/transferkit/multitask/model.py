"""A multi-task model: one pretrained backbone (hard sharing) or one copy per task (soft sharing), and a
head per task. ``forward(task=..., **inputs)`` routes the batch to its task's head.

``view(task)`` is a plain ``Classifier`` over the task's backbone and head (the same modules, not
copies): the fine-tuning strategies, the predictor, the exporter and the server all work on it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..backbones.base import Backbone
from ..backbones.registry import rebuild_backbone
from ..engine.checkpoint import atomic_write_text, load_weights, save_weights
from ..errors import UserError
from ..model import ClassificationHead, Classifier

SHARING = ("hard", "soft")
FORMAT_VERSION = 1


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: Backbone, task_classes: dict[str, list[str]], dropout: float = 0.1,
                 sharing: str = "hard"):
        super().__init__()
        if sharing not in SHARING:
            raise UserError(f"sharing '{sharing}' is unknown: choose hard (one backbone) or soft (a backbone per task)")
        self.sharing = sharing
        self.task_classes = {t: list(c) for t, c in task_classes.items()}
        if sharing == "hard":
            self.backbone = backbone
        else:
            # Every copy starts at the same pretrained weights; the soft-sharing penalty keeps them close.
            self.backbones = nn.ModuleDict({t: backbone if i == 0 else copy.deepcopy(backbone)
                                            for i, t in enumerate(task_classes)})
        self.heads = nn.ModuleDict({t: ClassificationHead(backbone.feature_dim, len(c), dropout)
                                    for t, c in task_classes.items()})
        self._views: dict[str, Classifier] = {}  # a plain dict: views hold no parameters of their own

    @property
    def tasks(self) -> list[str]:
        return list(self.task_classes)

    def backbone_for(self, task: str) -> Backbone:
        return self.backbone if self.sharing == "hard" else self.backbones[task]

    def unique_backbones(self) -> list[Backbone]:
        return [self.backbone] if self.sharing == "hard" else list(self.backbones.values())

    def view(self, task: str) -> Classifier:
        if task not in self.task_classes:
            raise UserError(f"unknown task '{task}': this model's tasks are {', '.join(self.tasks)}")
        if task not in self._views:
            head = self.heads[task]
            self._views[task] = Classifier(self.backbone_for(task), head.linear.out_features, head=head)
        return self._views[task]

    def forward(self, task: str, **inputs: torch.Tensor) -> torch.Tensor:
        return self.view(task)(**inputs)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss reaches (hard sharing); none with soft sharing."""
        return list(self.backbone.parameters()) if self.sharing == "hard" else []


def soft_sharing_penalty(model: MultiTaskModel, strength: float) -> torch.Tensor:
    """``strength * sum_t sum_p ||theta_t,p - mean_t theta_t,p||^2`` over the trainable backbone parameters:
    zero for identical copies, growing as the tasks' copies drift apart."""
    copies = [dict(b.named_parameters()) for b in model.unique_backbones()]
    total = torch.zeros(())
    for name, first in copies[0].items():
        if not first.requires_grad:
            continue
        stacked = torch.stack([c[name] for c in copies])
        total = total + (stacked - stacked.mean(0, keepdim=True)).pow(2).sum()
    return strength * total


def save_multitask(model: MultiTaskModel, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    first = model.unique_backbones()[0]
    first.save_preprocessing(directory / "backbone")
    if model.sharing == "hard":
        first.save_adapters(directory / "adapter")
    else:
        for task in model.tasks:
            model.backbones[task].save_adapters(directory / "adapter" / task)
    save_weights(model, directory / "model.safetensors")
    head = next(iter(model.heads.values()))
    meta = {"format": FORMAT_VERSION, "kind": "multitask", "sharing": model.sharing, "tasks": model.task_classes,
            "backbone": first.spec, "dropout": head.dropout.p}
    atomic_write_text(directory / "transferkit.json", json.dumps(meta, indent=1))


def load_multitask(directory: Path, meta: dict | None = None) -> MultiTaskModel:
    meta = meta or json.loads((directory / "transferkit.json").read_text())
    if meta.get("format") != FORMAT_VERSION or meta.get("kind") != "multitask":
        raise UserError(f"{directory / 'transferkit.json'} is not a multi-task model of format {FORMAT_VERSION}")
    backbone = rebuild_backbone(meta["backbone"], directory / "backbone")
    model = MultiTaskModel(backbone, meta["tasks"], meta.get("dropout", 0.0), meta["sharing"])
    load_weights(model, directory / "model.safetensors")
    return model
