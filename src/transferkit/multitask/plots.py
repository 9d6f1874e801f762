"""Multi-task plots: each task's loss weight and validation accuracy per epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_task_curves(history: list[dict], tasks: list[str], directory: Path) -> list[Path]:
    epochs = [record["epoch"] for record in history]
    fig, (weights_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for task in tasks:
        weights_ax.plot(epochs, [r.get(f"weight_{task}", float("nan")) for r in history], marker="o", label=task)
        accuracy_ax.plot(epochs, [r.get(f"val_{task}_accuracy", float("nan")) for r in history], marker="o", label=task)
    weights_ax.set(xlabel="epoch", ylabel="mean loss weight", title="task loss weights")
    accuracy_ax.set(xlabel="epoch", ylabel="validation accuracy", title="per-task validation accuracy")
    for ax in (weights_ax, accuracy_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = directory / "tasks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
