"""The teacher of a distillation run: checked before anything is written, then asked once for its logits."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from .errors import UserError
from .saved_model import FineTunedModel, model_directory


def check_teacher(teacher: str, classes: list[str], modality: str) -> None:
    """The teacher run exists, is finished, takes the same modality and knows exactly the student's classes."""
    directory = model_directory(teacher)
    meta = json.loads((directory / "transferkit.json").read_text())
    if meta.get("kind") == "ensemble":  # an ensemble teaches too; its members share one modality
        member = json.loads((directory / meta["members"][0] / "transferkit.json").read_text())
        meta = {**meta, "backbone": member["backbone"]}
    family = meta["backbone"].get("family")
    teacher_modality = "text" if family == "hf-text" else "image"
    if teacher_modality != modality:
        raise UserError(f"teacher {teacher} takes {teacher_modality}s but the training data are {modality}s: "
                        f"choose a teacher trained on {modality}s")
    missing, extra = sorted(set(classes) - set(meta["classes"])), sorted(set(meta["classes"]) - set(classes))
    if missing or extra:
        raise UserError(f"teacher {teacher} has other classes than the training data: only in the data {missing[:10]}, "
                        f"only in the teacher {extra[:10]}; distil on data with the teacher's label set")


def teacher_logits(teacher: FineTunedModel, inputs, classes: list[str]) -> torch.Tensor:
    """The teacher's logits for ``inputs``, columns in the student's class order."""
    logits = teacher.predict_logits(inputs, progress="teacher logits")
    order = [teacher.classes.index(c) for c in classes]
    return logits[:, order].contiguous()


def median_latency_ms(predict, inputs, repeats: int = 3) -> float:
    """Median wall time of ``predict(inputs)`` after one warm-up call."""
    predict(inputs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(inputs)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))
