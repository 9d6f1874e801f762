"""Plots people would rather see than read: the confusion matrix and the learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (each row sums to 1), with the counts written in the cells."""
    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    n = len(classes)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(histories: dict[str, list[dict]], path: Path, monitor: str) -> Path:
    """Train loss and validation metric per epoch, one line per training phase (baseline, fine-tune)."""
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in histories.items():
        if not history:
            continue
        epochs = [r["epoch"] for r in history]
        loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label=f"{name} train")
        if "val_loss" in history[0]:
            loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="x", linestyle="--", label=f"{name} val")
        if monitor in history[0]:
            metric_ax.plot(epochs, [r[monitor] for r in history], marker="o", label=name)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("loss")
    loss_ax.legend()
    metric_ax.set_xlabel("epoch")
    metric_ax.set_ylabel(monitor.replace("_", " "))
    metric_ax.set_title(monitor.replace("_", " "))
    metric_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_vs_cost(names: Sequence[str], points: Sequence[tuple[float, float]], front: Sequence[int], path: Path,
                       score_name: str) -> Path:
    """Transferability score against FLOPs per example; the Pareto front (nothing cheaper scores higher) joined."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    costs = np.array([max(p[0], 1.0) for p in points]) / 1e9
    scores = np.array([p[1] for p in points])
    on_front = np.zeros(len(points), dtype=bool)
    on_front[list(front)] = True
    ax.scatter(costs[~on_front], scores[~on_front], color="tab:gray", label="dominated")
    ax.scatter(costs[on_front], scores[on_front], color="tab:red", label="Pareto front")
    order = sorted(front, key=lambda i: costs[i])
    ax.plot(costs[order], scores[order], color="tab:red", linewidth=1)
    for name, x, y in zip(names, costs, scores):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per example (inference, counted)")
    ax.set_ylabel(score_name)
    ax.set_title(f"{score_name} vs cost")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
