"""A fine-tuned model on disk (``RUN/model/``) and in memory, ready to predict and evaluate.

Layout: ``model.safetensors`` (all weights, no pickle), ``transferkit.json`` (classes and the
backbone spec) and ``backbone/`` (configs and tokenizer or image-processor files). Loading rebuilds
the architecture from the configs and then loads the weights, so no original checkpoint, hub access
or remote code is needed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .backbones.registry import rebuild_backbone
from .data.dataset import Examples, encode_labels
from .data.in_memory import is_table, model_inputs, staged_table
from .data.readers import read_examples, table_columns
from .engine.batches import Batches, map_in_order
from .engine.checkpoint import atomic_write_text, load_weights, save_weights
from .engine.loop import default_device
from .errors import UserError
from .evaluation.metrics import full_report
from .model import Classifier
from .run_directory import model_directory

FORMAT_VERSION = 1


COLUMN_KEYS = ("text_column", "image_column", "label_column")


def save_classifier(model: Classifier, classes: Sequence[str], directory: Path, columns: dict | None = None) -> None:
    """``columns``: the training data's text/image/label column names, which ``read`` then takes by default
    (a file scored later usually has the training file's layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.backbone.save_preprocessing(directory / "backbone")
    model.backbone.save_adapters(directory / "adapter")
    save_weights(model, directory / "model.safetensors")
    meta = {"format": FORMAT_VERSION, "classes": list(classes), "backbone": model.backbone.spec,
            "dropout": model.head.dropout.p}
    columns = {k: v for k, v in (columns or {}).items() if k in COLUMN_KEYS and v}
    if columns:
        meta["columns"] = columns
    atomic_write_text(directory / "transferkit.json", json.dumps(meta, indent=1))


@contextlib.contextmanager
def _read_table(model, table: Any, caller: str, require_labels: bool, columns: dict) -> Iterator[Examples]:
    """A table held in memory, read by ``model.read`` as a file of it would be; its images stay on disk until the
    block ends."""
    with staged_table(table, caller, columns) as (path, columns):
        yield model.read(path, require_labels=require_labels, **columns)


class FineTunedModel:
    """A loaded run: ``predict`` texts or images, ``evaluate`` a labelled file."""

    def __init__(self, model: Classifier, classes: list[str], source: Path, eval_batch_size: int = 128,
                 task: str | None = None, columns: dict | None = None):
        self.model = model.eval()
        self.columns = dict(columns or {})  # the training data's column names: the defaults of ``read``
        self.task = task  # the task of a multi-task run this model predicts, else None
        self.classes = classes
        self.source = source
        self.eval_batch_size = eval_batch_size
        self.device = default_device()
        self.model.to(self.device)

    @classmethod
    def load(cls, run: str | Path, task: str | None = None) -> "FineTunedModel":
        """``task``: which task of a multi-task model to predict (its head over the shared backbone)."""
        run = Path(run)
        directory = model_directory(run)
        meta_path = directory / "transferkit.json"
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") == "multitask":
            from .multitask.model import load_multitask

            tasks = list(meta.get("tasks", {}))
            if task not in tasks:
                raise UserError(f"{run} is a multi-task model: choose its task with --task ({', '.join(tasks)})"
                                if task is None else f"{run} has no task '{task}': its tasks are {', '.join(tasks)}")
            multi = load_multitask(directory, meta)
            return cls(multi.view(task), multi.task_classes[task], run, task=task)
        if task is not None:
            raise UserError(f"{run} is a single-task model: drop --task")
        if meta.get("kind") == "ensemble":
            from .ensemble import EnsembleModel

            return EnsembleModel.load(directory, meta)
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{meta_path} has format {meta.get('format')}; this transferkit reads format {FORMAT_VERSION}")
        backbone = rebuild_backbone(meta["backbone"], directory / "backbone")
        model = Classifier(backbone, len(meta["classes"]), meta.get("dropout", 0.0))
        load_weights(model, directory / "model.safetensors")
        return cls(model, meta["classes"], run, columns=meta.get("columns"))

    def merge_adapters(self) -> None:
        """Fold LoRA/IA3 adapters into the backbone's weights: same predictions, plain architecture."""
        self.model.backbone.merge_adapters()

    @property
    def modality(self) -> str:
        return self.model.backbone.modality

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def backbone_spec(self) -> dict:
        return dict(self.model.backbone.spec)

    def truncated(self, texts) -> list[bool]:
        """Which texts are longer than the model's maximum length (only their first tokens are used)."""
        return self.model.backbone.truncated(model_inputs(texts, "text", "truncated()"))

    @torch.no_grad()
    def predict_logits(self, inputs, progress: str | None = None) -> torch.Tensor:
        """Logits, shape (N, classes), in the order of ``inputs``: a text or a list of texts; image paths, PIL
        images or a uint8 array (N, H, W[, C]); the ImageArray/ImagePaths the readers give; or a table (DataFrame,
        ``datasets.Dataset``, dict of columns) whose input column is read as ``read`` reads a file."""
        if is_table(inputs):  # a DataFrame: its input column, as `transferkit predict` reads a file
            with _read_table(self, inputs, "predict()", False, {}) as read:
                return self.predict_logits(read.inputs, progress)
        backbone = self.model.backbone
        prepared = backbone.prepare(model_inputs(inputs, self.modality))
        batches = Batches(prepared, None, backbone.collate, self.eval_batch_size, lengths=backbone.lengths(prepared))
        return map_in_order(batches, lambda inputs: self.model(**inputs), self.device, progress=progress)

    def predict_proba(self, inputs) -> np.ndarray:
        """Class probabilities, shape (N, classes); ``inputs`` as for ``predict_logits``."""
        return torch.softmax(self.predict_logits(inputs), dim=-1).numpy()

    def predict(self, inputs) -> list[str]:
        """The predicted class of each input (a list, also for one text or image); ``inputs`` as for
        ``predict_logits``."""
        return [self.classes[i] for i in self.predict_proba(inputs).argmax(1)]

    def read(self, path: str | Path, *, text_column: str | None = None, image_column: str | None = None,
             label_column: str | None = None, require_labels: bool = True) -> Examples:
        """A file to evaluate or predict on. Columns not given default to the training data's (a run trained
        with ``text_column=review`` reads ``review``, not a guess), then to 'label' and the usual guesses."""
        trained = self.columns
        if text_column is None and image_column is None and not Path(path).is_dir():
            input_column = trained.get("text_column") or trained.get("image_column")
            if input_column is not None and input_column in table_columns(path):
                text_column, image_column = trained.get("text_column"), trained.get("image_column")
        if label_column is None:
            label_column = trained.get("label_column") or "label"
        examples = read_examples(path, label_column=label_column, text_column=text_column, image_column=image_column,
                                 require_labels=require_labels)
        if examples.modality != self.modality:
            raise UserError(f"{path} holds {examples.modality}s but the model in {self.source} takes {self.modality}s")
        return examples

    def evaluate(self, examples: Examples | str | Path | Any, **columns: str | None) -> dict:
        """Accuracy, macro-F1, per-class report and confusion matrix on labelled data: ``Examples``, a file or
        folder (read as ``read`` does, ``columns`` naming its columns), or a table held in memory (a DataFrame,
        a ``datasets.Dataset``, a dict of columns)."""
        if is_table(examples):
            with _read_table(self, examples, "evaluate()", True, columns) as read:
                return self.evaluate(read)
        if isinstance(examples, (str, Path)):
            examples = self.read(examples, **columns)
        elif not isinstance(examples, Examples):
            raise UserError(f"evaluate() takes a file, a folder, a DataFrame or Examples, not {type(examples).__name__}")
        unknown = sorted(set(examples.labels) - set(self.classes))
        if unknown:
            raise UserError(f"{examples.source}: labels {unknown[:5]} are not classes of this model ({self.classes[:10]}): fix them")
        labels = encode_labels(examples.labels, self.classes)
        predictions = self.predict_proba(examples.inputs).argmax(1)
        return full_report(labels, predictions, self.classes)


def load_run(run: str | Path, task: str | None = None) -> FineTunedModel:
    """Load the model of a finished run directory (or of its ``model/`` folder); ``task`` picks one task of a
    multi-task run."""
    return FineTunedModel.load(run, task)
