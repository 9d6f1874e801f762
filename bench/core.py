"""Core fine-tuning benchmark: the accuracy each packaged model reaches, and how long it takes.

Experiments (each one full `transferkit.finetune` run, linear-probe baseline included):
- fashion-demo: EfficientNet-Lite0 on Fashion-MNIST with the `make demo` budget;
- fashion-full: the same on all 60,000 training images;
- sst2-8k: all-MiniLM-L6-v2 on 8,000 SST-2 training phrases, a stratified random sample;
- sst2-8k-longest: the same budget spent on the 8,000 longest training phrases, which are mostly the
  full sentences of SST-2 train (the rest of train is their sub-phrases; the test set is sentences);
- sst2-full: the same on all 60,614 phrases.
Validation data chooses the checkpoint; the test sets (Fashion-MNIST's official 10k, SST-2's GLUE dev
set of 872 sentences) are scored once. Results are kept in bench/results/core.json, so experiments can
be run one at a time, and the table in docs/benchmarks.md is rebuilt from all of them.

    python bench/core.py                       # everything (about an hour on 2 CPU cores)
    python bench/core.py --only sst2-8k        # one experiment
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import transferkit
from transferkit.demo import DEMO_BUDGET, FULL_BUDGET

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import DOC, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "bench" / "results" / "core.json"

SST2_BASE = dict(model="minilm-l6", strategy="full", epochs=3, batch_size=32, eval_batch_size=256, lr=1e-4,
                 warmup_ratio=0.06, schedule="linear", patience=None, baseline_epochs=20)

EXPERIMENTS = {
    "fashion-demo": ("Fashion-MNIST", "EfficientNet-Lite0", 0.90, dict(DEMO_BUDGET)),
    "fashion-full": ("Fashion-MNIST", "EfficientNet-Lite0", 0.93, dict(FULL_BUDGET)),
    "sst2-8k": ("SST-2", "MiniLM-L6", 0.88, {**SST2_BASE, "max_train_examples": 8000, "lr_grid": [5e-5, 1e-4, 2e-4]}),
    "sst2-8k-longest": ("SST-2", "MiniLM-L6", 0.88, {**SST2_BASE, "longest": 8000}),
    "sst2-full": ("SST-2", "MiniLM-L6", 0.90, {**SST2_BASE, "epochs": 2}),
}


def _sst2_paths() -> dict:
    if not (SST2 / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {SST2}: the SST-2 experiments need ../shared/data/sst2")
    return {"train": str(SST2 / "train.tsv"), "val": str(SST2 / "dev.tsv"), "test": str(SST2 / "test.tsv"),
            "text_column": "sentence"}


def _longest_rows(source: str, count: int, target: Path) -> str:
    """A TSV of the ``count`` longest rows of ``source`` (selection on training data only)."""
    import pandas as pd

    frame = pd.read_csv(source, sep="\t", dtype=str, keep_default_na=False)
    frame = frame.loc[frame["sentence"].str.split().str.len().sort_values(ascending=False, kind="stable").index[:count]]
    frame.to_csv(target, sep="\t", index=False)
    return str(target)


def run_with_lr_sweep(name: str, previous: dict | None) -> dict:
    """One run per LR of the grid (reusing runs already recorded); keep the one with the best validation
    accuracy. The test set plays no part in the choice."""
    grid = EXPERIMENTS[name][3]["lr_grid"]
    sweep = dict((previous or {}).get("sweep", {}))
    for lr in grid:
        if str(lr) not in sweep:
            sweep[str(lr)] = run(name, lr=lr)
    best = max(sweep.values(), key=lambda r: r["val_accuracy"])
    return {**best, "sweep": sweep}


def run(name: str, lr: float | None = None) -> dict:
    dataset, model, goal, config = EXPERIMENTS[name]
    config = dict(config)
    config.pop("lr_grid", None)
    if lr is not None:
        config["lr"] = lr
    if dataset == "SST-2":
        config.update(_sst2_paths())
    with tempfile.TemporaryDirectory() as out:
        if "longest" in config:
            config["train"] = _longest_rows(config["train"], config.pop("longest"), Path(out) / "train-longest.tsv")
        out = str(Path(out) / "run")
        started = time.time()
        metrics = transferkit.finetune(**config, out=out, overwrite=True)
        wall = time.time() - started
    return {
        "experiment": name, "dataset": dataset, "model": model, "goal": goal,
        "train_examples": metrics["data"]["train"], "epochs": config["epochs"],
        "image_size": config.get("image_size"), "lr": config["lr"],
        "test_accuracy": metrics["test"]["accuracy"], "test_macro_f1": metrics["test"]["macro_f1"],
        "val_accuracy": metrics["history"][metrics["best_epoch"] - 1]["val_accuracy"],
        "probe_accuracy": metrics["baseline"]["test"]["accuracy"], "probe_macro_f1": metrics["baseline"]["test"]["macro_f1"],
        "probe_seconds": metrics["baseline"]["seconds"], "finetune_seconds": metrics["seconds"], "wall_seconds": wall,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }


def table(results: dict) -> str:
    lines = ["| experiment | train examples | epochs | linear probe acc / F1 | fine-tuned acc / F1 | goal | fine-tune time | whole run |",
             "|---|---|---|---|---|---|---|---|"]
    for name in EXPERIMENTS:
        if name not in results:
            continue
        r = results[name]
        met = "met" if r["test_accuracy"] >= r["goal"] else "NOT met"
        lines.append(
            f"| {name} ({r['model']} on {r['dataset']}) | {r['train_examples']:,} | {r['epochs']} | "
            f"{r['probe_accuracy']:.4f} / {r['probe_macro_f1']:.4f} | {r['test_accuracy']:.4f} / {r['test_macro_f1']:.4f} | "
            f">= {r['goal']:.2f}: {met} | {r['finetune_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min |")
    for name, r in results.items():
        if "sweep" in r:
            tried = ", ".join(f"{float(lr):g}: val {s['val_accuracy']:.4f} / test {s['test_accuracy']:.4f}"
                              for lr, s in sorted(r["sweep"].items(), key=lambda kv: float(kv[0])))
            lines.append(f"\n{name}: learning rate {r['lr']:g} chosen by validation accuracy among {tried}.")
    return "\n".join(lines)


def write_doc(results: dict) -> None:
    machines = sorted({r["machine"] for r in results.values()})
    section = "\n".join([
        "## Core fine-tuning (bench/core.py)", "",
        "Test accuracy of the packaged backbones, fine-tuned (`strategy=full`) beside a linear probe on their frozen",
        "features (the run's own baseline, same test set). Fashion-MNIST: official 10k test set, 5% of train held out",
        "for validation, 32x32 inputs. SST-2: `test.tsv` is the GLUE dev set (872 sentences) that papers report;",
        "`dev.tsv` chooses the checkpoint and, where a grid is given, the learning rate. Times are wall-clock on",
        "; ".join(machines) + "; other jobs sometimes shared those cores, so they are upper bounds.", "",
        table(results), "",
        "Published SST-2 accuracies for comparison (GLUE dev): MiniLM-L6-H384 91.5, DistilBERT 91.3, BERT-base 92.7-93.2",
        "(Socher et al. 2013 for the data). Fashion-MNIST: Xiao et al. 2017.", ""])
    replace_section("## Core fine-tuning", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="experiments to run (default: all)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.only or list(EXPERIMENTS):
        if "lr_grid" in EXPERIMENTS[name][3]:
            results[name] = run_with_lr_sweep(name, results.get(name))
        else:
            results[name] = run(name)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    print(table(results))
    write_doc(results)
    print(f"\nwritten to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
