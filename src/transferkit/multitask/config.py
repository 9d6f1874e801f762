"""A multi-task run's configuration: the shared recipe (any RunConfig field but the data), the tasks
(each its data, columns and an optional fixed loss weight), and how they share and are weighted.

YAML::

    model: minilm-l6
    epochs: 2
    sharing: hard            # hard: one backbone; soft: a copy per task, tied by an L2 penalty
    weighting: uncertainty   # equal, uncertainty, dwa, gradnorm, pcgrad
    task_sampling: round-robin
    tasks:
      - {name: sentiment, train: sst2.tsv, text_column: sentence}
      - {name: topic, train: topics.csv, text_column: text, label_column: topic, weight: 0.5}

On the command line: ``--task name=sentiment,train=sst2.tsv,text_column=sentence`` once per task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, read_yaml
from ..errors import UserError
from .model import SHARING
from .sampling import SAMPLING
from .weighting import WEIGHTINGS

# What a task may set: its data, and how its own loss is computed and weighted.
TASK_FIELDS = ("train", "val", "test", "text_column", "image_column", "label_column", "val_fraction",
               "test_fraction", "max_train_examples", "class_weights", "sampler", "label_smoothing")
UNSUPPORTED = {"teacher": "distil each task's run separately", "target": "adapt each task separately",
               "distill_data": "distil each task's run separately", "mixup": "drop --mixup",
               "baseline": "the comparison of a multi-task run is single-task fine-tuning (single_task_baseline)",
               "l1": "drop l1", "l2_sp": "drop l2_sp (weight_decay still applies)"}


@dataclass
class Task:
    name: str
    data: dict[str, Any]
    weight: float = 1.0


@dataclass
class MultiTaskConfig:
    recipe: dict[str, Any]
    tasks: list[Task]
    sharing: str = "hard"
    weighting: str = "equal"
    task_sampling: str = "round-robin"
    sampling_temperature: float = 2.0
    sharing_strength: float = 0.1
    single_task_baseline: bool = True
    source: str = "config"
    run_configs: dict[str, RunConfig] = field(default_factory=dict, repr=False)

    OPTIONS = ("sharing", "weighting", "task_sampling", "sampling_temperature", "sharing_strength", "single_task_baseline")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        source = self.source
        if len(self.tasks) < 2:
            raise UserError(f"{source}: a multi-task run needs at least two tasks ({len(self.tasks)} given): "
                            f"use 'transferkit fit' without tasks for one")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"{source}: task name(s) {', '.join(duplicates)} appear more than once: give each task its own name")
        for name, value, options in (("sharing", self.sharing, SHARING), ("weighting", self.weighting, tuple(WEIGHTINGS)),
                                     ("task_sampling", self.task_sampling, SAMPLING)):
            if value not in options:
                raise UserError(f"{source}: '{name}' is '{value}': choose one of {', '.join(options)}")
        if not self.sampling_temperature > 0:
            raise UserError(f"{source}: 'sampling_temperature' is {self.sampling_temperature}: it must be positive")
        if not self.sharing_strength >= 0:
            raise UserError(f"{source}: 'sharing_strength' is {self.sharing_strength}: it must be >= 0")
        if self.sharing == "soft" and WEIGHTINGS[self.weighting].needs_shared_parameters:
            raise UserError(f"{source}: weighting '{self.weighting}' acts on the shared backbone's gradients, but soft "
                            f"sharing gives each task its own backbone: use sharing hard, or equal/uncertainty/dwa")
        for key, fix in UNSUPPORTED.items():
            if self.recipe.get(key) not in (None, False):
                raise UserError(f"{source}: '{key}' is not supported in a multi-task run: {fix}")
        if self.recipe.get("head_init", "random") != "random":
            raise UserError(f"{source}: 'head_init' is '{self.recipe['head_init']}': a multi-task run's heads start "
                            f"from seeded random weights; drop head_init")
        for task in self.tasks:
            if not task.name or not str(task.name).replace("-", "").replace("_", "").isalnum():
                raise UserError(f"{source}: task name '{task.name}' must be letters, digits, '-' or '_'")
            unknown = sorted(set(task.data) - set(TASK_FIELDS))
            if unknown:
                raise UserError(f"{source}: task '{task.name}' sets {', '.join(unknown)}, which a task cannot set: "
                                f"a task sets {', '.join(TASK_FIELDS)}, and weight; set the rest once for all tasks")
            if not task.data.get("train"):
                raise UserError(f"{source}: task '{task.name}' has no 'train': give its training data")
            if not task.weight > 0:
                raise UserError(f"{source}: task '{task.name}' has weight {task.weight}: it must be positive")
            self.run_configs[task.name] = RunConfig.from_dict(
                {**self.recipe, **task.data, "baseline": False}, source=f"{source}: task '{task.name}'")
        if self.recipe.get("strategy") == "linear-probe":
            raise UserError(f"{source}: linear-probe freezes the shared backbone, so the tasks cannot share anything: "
                            f"use full, freeze-bottom, lora, bitfit, ... (or one linear probe per task)")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def base(self) -> RunConfig:
        """The recipe as a RunConfig (the first task's data stands in for the data fields)."""
        return self.run_configs[self.tasks[0].name]

    @property
    def out(self) -> str:
        return self.base.out

    def task_config(self, name: str) -> RunConfig:
        return self.run_configs[name]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "MultiTaskConfig":
        values = dict(values)
        raw_tasks = values.pop("tasks", None)
        if not isinstance(raw_tasks, list) or not all(isinstance(t, dict) for t in raw_tasks):
            raise UserError(f"{source}: 'tasks' must be a list of mappings, each with a name and its train data")
        tasks = []
        for i, raw in enumerate(raw_tasks):
            raw = dict(raw)
            name = str(raw.pop("name", "") or "")
            if not name:
                raise UserError(f"{source}: task {i + 1} has no 'name': name every task")
            try:
                weight = float(raw.pop("weight", 1.0))
            except (TypeError, ValueError):
                raise UserError(f"{source}: task '{name}' has a weight that is not a number") from None
            tasks.append(Task(name, raw, weight))
        options = {k: values.pop(k) for k in cls.OPTIONS if k in values}
        for key, kind in (("sampling_temperature", float), ("sharing_strength", float)):
            if key in options:
                try:
                    options[key] = kind(options[key])
                except (TypeError, ValueError):
                    raise UserError(f"{source}: '{key}' is {options[key]!r}, which is not a number") from None
        if "single_task_baseline" in options:
            options["single_task_baseline"] = str(options["single_task_baseline"]).lower() in ("true", "1", "yes")
        for data_field in TASK_FIELDS:
            if data_field in ("train", "val", "test") and values.get(data_field):
                raise UserError(f"{source}: '{data_field}' is set for all tasks: give each task its own data under 'tasks'")
        values.pop("train", None)
        return cls(values, tasks, source=source, **options)

    @classmethod
    def load(cls, path: str | Path) -> "MultiTaskConfig":
        return cls.from_dict(read_yaml(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        recipe = {k: v for k, v in self.base.to_dict().items() if k not in TASK_FIELDS and k != "baseline"}
        options = {k: getattr(self, k) for k in self.OPTIONS}
        tasks = [{"name": t.name, **t.data, "weight": t.weight} for t in self.tasks]
        return {**recipe, **options, "tasks": tasks}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> "MultiTaskConfig":
        recipe = {**self.recipe, **{k: v for k, v in changes.items() if k not in self.OPTIONS}}
        options = {k: v for k, v in changes.items() if k in self.OPTIONS}
        return dataclasses.replace(self, recipe=recipe, run_configs={}, **options)


def is_multitask_config(path: str | Path) -> bool:
    return "tasks" in read_yaml(path)
