"""The embedded demo: EfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST, linear probe beside it.

The default budget (a stratified 36,000-image sample of the training set at 32x32 pixels, 2 epochs)
ends within 10 minutes on 2 CPU cores; ``--full`` trains on all 60,000 images for longer.
The official 10,000-image test set is used once, at the end.
"""

from __future__ import annotations

from typing import Any

from .config import RunConfig

DEMO_BUDGET: dict[str, Any] = dict(
    train="fashion-mnist", model="efficientnet-lite0", image_size=32, strategy="full",
    max_train_examples=36_000, val_fraction=0.05, epochs=2, batch_size=64, eval_batch_size=256,
    lr=1e-3, warmup_ratio=0.05, schedule="cosine", dropout=0.2, patience=None, baseline_epochs=20,
)
FULL_BUDGET: dict[str, Any] = {**DEMO_BUDGET, "max_train_examples": None, "epochs": 6}


def demo_config(full: bool = False, out: str = "runs/demo") -> RunConfig:
    return RunConfig.from_dict({**(FULL_BUDGET if full else DEMO_BUDGET), "out": out}, source="demo")


def results_table(metrics: dict[str, Any]) -> str:
    """The before/after table printed at the end of the demo."""
    rows = [("method", "test accuracy", "test macro-F1", "time (s)")]
    if "baseline" in metrics:
        base = metrics["baseline"]
        rows.append(("linear probe (frozen)", f"{base['test']['accuracy']:.4f}", f"{base['test']['macro_f1']:.4f}",
                     f"{base['seconds']:.0f}"))
    rows.append((f"fine-tuned ({metrics['strategy']})", f"{metrics['test']['accuracy']:.4f}",
                 f"{metrics['test']['macro_f1']:.4f}", f"{metrics['seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
