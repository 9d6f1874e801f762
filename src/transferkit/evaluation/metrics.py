"""Classification metrics, computed with scikit-learn."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def summary_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean of per-class F1, so rare classes count as much as common ones)."""
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def full_report(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> dict:
    """Summary metrics, per-class precision/recall/F1/support, and the confusion matrix (rows: true class)."""
    ids = list(range(len(classes)))
    per_class = classification_report(labels, predictions, labels=ids, target_names=list(classes),
                                      output_dict=True, zero_division=0)
    return {
        **summary_metrics(labels, predictions),
        "per_class": {c: {k: float(v) for k, v in per_class[c].items()} for c in classes},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
    }
