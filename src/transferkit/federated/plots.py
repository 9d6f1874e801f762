"""Federated plots: validation accuracy per round (mean and per client), and each client's three models."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_rounds(history: list[dict], names: list[str], path: Path) -> Path:
    rounds = [h["round"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, name in enumerate(names):
        ax.plot(rounds, [h["client_val_accuracy"].get(str(index), np.nan) for h in history], alpha=0.4, lw=1, label=name)
    ax.plot(rounds, [h["val_accuracy"] for h in history], color="black", lw=2.5, marker="o", label="weighted mean")
    ax.set(xlabel="round", ylabel="validation accuracy (global model)", title="federated rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_clients(per_client: dict[str, dict], path: Path) -> Path:
    names = list(per_client)
    kinds = [k for k in ("local_only", "global", "personalised") if any(k in r for r in per_client.values())]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(kinds))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 4))
    for i, kind in enumerate(kinds):
        ax.bar(x + i * width, [per_client[n].get(kind, np.nan) for n in names], width, label=kind.replace("_", "-"))
    ax.set_xticks(x + width * (len(kinds) - 1) / 2, names, rotation=30, ha="right")
    ax.set(ylabel="test accuracy (client's own split)", title="per client")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
