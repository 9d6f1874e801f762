"""Core fine-tuning benchmark: the accuracy each packaged model reaches, and how long it takes.

Experiments (each one full `transferkit.finetune` run, linear-probe baseline included):
- fashion-demo: EfficientNet-Lite0 on Fashion-MNIST with the `make demo` budget;
- fashion-full: the same on all 60,000 training images;
- sst2-8k: all-MiniLM-L6-v2 on 8,000 SST-2 training phrases, a stratified random sample; a small grid of
  recipes is tried and the one with the best validation accuracy is kept;
- sst2-full: the same on all 60,614 phrases, with the recipe sst2-8k chose on validation (3 epochs).
SST-2 validation: `dev.tsv` holds phrases while the test set holds full sentences, so phrase accuracy is
a poor guide to sentence accuracy. The SST-2 experiments therefore validate on 872 full sentences held
out from `train.tsv` (rows that are no sub-phrase of another row), and drop every training row that is
a sub-phrase of a held-out sentence, so nothing of the validation sentences is trained on.
Validation data chooses the checkpoint and the recipe; the test sets (Fashion-MNIST's official 10k, SST-2's GLUE dev
set of 872 sentences) are scored once. Results are kept in bench/results/core.json, so experiments can
be run one at a time, and the table in docs/benchmarks.md is rebuilt from all of them.

    python bench/core.py                       # everything (about an hour on 2 CPU cores)
    python bench/core.py --only sst2-8k        # one experiment
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import transferkit
from transferkit.demo import DEMO_BUDGET, FULL_BUDGET

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import DOC, machine, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "bench" / "results" / "core.json"

SST2_BASE = dict(model="minilm-l6", strategy="full", epochs=3, batch_size=32, eval_batch_size=256, lr=1e-4,
                 warmup_ratio=0.06, schedule="linear", patience=None, baseline_epochs=20)

EXPERIMENTS = {
    "fashion-demo": ("Fashion-MNIST", "EfficientNet-Lite0", 0.90, dict(DEMO_BUDGET)),
    "fashion-full": ("Fashion-MNIST", "EfficientNet-Lite0", 0.93, dict(FULL_BUDGET)),
    "sst2-8k": ("SST-2", "MiniLM-L6", 0.88, {**SST2_BASE, "max_train_examples": 8000, "grid": [
        {"lr": 5e-5}, {"lr": 1e-4}, {"lr": 5e-5, "epochs": 5},
        {"lr": 5e-5, "head_init": "probe"},
        {"strategy": "discriminative-lr", "lr": 1e-4, "lr_decay": 0.8, "epochs": 5},
        # "at most 8,000 training sentences": the treebank's full sentences, then its longest phrases, instead of
        # a random sample of rows (half of which are phrases of seven words or fewer).
        {"lr": 5e-5, "head_init": "probe", "rows": "sentences"},
        {"lr": 5e-5, "head_init": "probe", "rows": "sentences", "epochs": 5},
        {"lr": 1e-4, "head_init": "probe", "rows": "sentences"},
        {"lr": 5e-5, "head_init": "probe", "rows": "sentences", "epochs": 8},
        # Regularisers on the best 5-epoch recipe (8k sentences are few for 22M trained parameters).
        {"lr": 5e-5, "head_init": "probe", "rows": "sentences", "epochs": 5, "token_mask": 0.1},
        {"lr": 5e-5, "head_init": "probe", "rows": "sentences", "epochs": 5, "label_smoothing": 0.1},
        # An exponential moving average of the weights (validated and kept instead of the last step's), over about
        # the last 100 steps (0.4 epoch). A longer window buys little here: the warm-up (1+t)/(10+t) caps the
        # decay below 0.99 for the first 890 of the 1,250 steps, and at 0.993 by the end.
        {"lr": 5e-5, "head_init": "probe", "rows": "sentences", "epochs": 5, "ema_decay": 0.99},
        # Layer-wise LR decay (as BERT's GLUE recipes use it) on the best data and head recipe: the top layer at
        # 1e-4, each lower one 0.8x, so the embeddings move least.
        {"strategy": "discriminative-lr", "lr": 1e-4, "lr_decay": 0.8, "head_init": "probe", "rows": "sentences",
         "epochs": 5}]}),
    # The full set is too large for a grid here: it takes the recipe that won sst2-8k's validation (its epochs
    # excepted: passes over 52k phrases are more steps than over 8k). Three epochs, the best one chosen on
    # validation: a 2-epoch run's validation accuracy was still rising at its end (0.8784, 0.8842).
    "sst2-full": ("SST-2", "MiniLM-L6", 0.90, {**SST2_BASE, "epochs": 3, "recipe_from": "sst2-8k"}),
    # A greedy weight soup (Wortsman et al. 2022) of the recipe sst2-8k chose, fine-tuned with three seeds: the
    # result is one MiniLM-L6 (the averaged weights), at three times the training cost. Validation chooses the
    # ingredients; the test set is scored once, on the soup.
    "sst2-8k-soup": ("SST-2", "MiniLM-L6", 0.88, {**SST2_BASE, "max_train_examples": 8000, "soup_of": "sst2-8k",
                                                  "seeds": [0, 1, 2]}),
}
NOT_INHERITED = ("epochs", "rows")  # the full set trains on every row
PATHS = ("out", "val_file", "test_file")  # where a kept run lies; not recorded


def grid_winner(name: str, results: dict) -> dict:
    """The overrides of the grid recipe with the best validation accuracy recorded for ``name`` (ties: the first)."""
    sweep = results.get(name, {}).get("sweep", {})
    if not sweep:
        sys.exit(f"{name} has no recorded grid: run 'python bench/core.py --only {name}' first")
    best = max(sweep, key=lambda key: sweep[key]["val_accuracy"])  # max keeps the first of equal values
    return next(o for o in EXPERIMENTS[name][3]["grid"] if _recipe_key(o) == best)


def _sst2_paths() -> dict:
    if not (SST2 / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {SST2}: the SST-2 experiments need ../shared/data/sst2")
    return {"train": str(SST2 / "train.tsv"), "val": str(SST2 / "dev.tsv"), "test": str(SST2 / "test.tsv"),
            "text_column": "sentence"}


def _sentence_validation(source: str, count: int, folder: Path, seed: int = 0,
                         longest: int | None = None) -> tuple[str, str]:
    """Split ``source`` into (train, validation) TSVs: ``count`` full sentences, stratified by label, for
    validation; training keeps every row that is not one of them or a sub-phrase of one (with ``longest``, only
    that many rows: the remaining sentences first, then the longest phrases)."""
    import pandas as pd

    frame = pd.read_csv(source, sep="\t", dtype=str, keep_default_na=False)
    tokens = [row.split() for row in frame["sentence"]]

    def spans(words: list[str]) -> set[str]:
        return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}

    # A sentence is a row that no other row contains (the treebank's roots); short rows cannot be one.
    contained: set[str] = set()
    for words in tokens:
        contained |= spans(words) - {" ".join(words)}
    keys = [" ".join(words) for words in tokens]
    is_root = pd.Series([len(w) >= 5 and k not in contained for w, k in zip(tokens, keys)], index=frame.index)
    roots = frame[is_root]
    share = count / len(roots)
    validation = pd.concat([group.sample(round(len(group) * share), random_state=seed)
                            for _, group in roots.groupby("label")])
    held_out: set[str] = set()
    for sentence in validation["sentence"]:
        held_out |= spans(sentence.split())
    train = frame[[k not in held_out for k in keys]]
    if longest is not None:
        order = pd.DataFrame({"root": is_root[train.index], "words": [len(tokens[i]) for i in train.index]},
                             index=train.index).sort_values(["root", "words"], ascending=False, kind="stable")
        train = train.loc[order.index[:longest]]
    train_path, val_path = folder / "train-without-val.tsv", folder / "val-sentences.tsv"
    train.to_csv(train_path, sep="\t", index=False)
    validation.to_csv(val_path, sep="\t", index=False)
    return str(train_path), str(val_path)


def _recipe_key(overrides: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(overrides.items()))


def run_grid(name: str, results: dict) -> None:
    """One run per recipe of the grid (reusing runs already recorded); keep the one with the best
    validation accuracy. The test set plays no part in the choice. Each finished recipe is saved at
    once, so an interrupted sweep goes on where it stopped."""
    sweep = dict(results.get(name, {}).get("sweep", {}))
    for overrides in EXPERIMENTS[name][3]["grid"]:
        key = _recipe_key(overrides)
        if key not in sweep:
            sweep[key] = run(name, overrides)
            best = max(sweep.values(), key=lambda r: r["val_accuracy"])
            results[name] = {**best, "sweep": sweep}
            save(results)


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def run(name: str, overrides: dict | None = None, keep_in: Path | None = None) -> dict:
    """One fine-tuning run; with ``keep_in``, its run directory (and the data split) stays in that folder."""
    if keep_in is not None:
        return _run(name, overrides, keep_in)
    with tempfile.TemporaryDirectory() as folder:
        record = _run(name, overrides, Path(folder))
    return {k: v for k, v in record.items() if k not in PATHS}


def _run(name: str, overrides: dict | None, folder: Path) -> dict:
    dataset, model, goal, config = EXPERIMENTS[name]
    config = {k: v for k, v in config.items() if k not in ("grid", "recipe_from", "soup_of", "seeds")}
    config.update(overrides or {})
    rows = config.pop("rows", "random")
    if dataset == "SST-2":
        config.update(_sst2_paths())
        longest = config["max_train_examples"] if rows == "sentences" else None
        config["train"], config["val"] = _sentence_validation(config["train"], 872, folder, longest=longest)
    out = str(folder / f"run-seed{config.get('seed', 0)}")
    started = time.time()
    metrics = transferkit.finetune(**config, out=out, overwrite=True)
    wall = time.time() - started
    return {
        "experiment": name, "dataset": dataset, "model": model, "goal": goal,
        "train_examples": metrics["data"]["train"], "epochs": config["epochs"],
        "image_size": config.get("image_size"), "lr": config["lr"], "strategy": config["strategy"],
        "recipe": _recipe_key(overrides or {}),
        "validation": "872 sentences held out from train" if dataset == "SST-2" else f"{config['val_fraction']:.0%} of train",
        "test_accuracy": metrics["test"]["accuracy"], "test_macro_f1": metrics["test"]["macro_f1"],
        "val_accuracy": metrics["history"][metrics["best_epoch"] - 1]["val_accuracy"],
        "probe_accuracy": metrics["baseline"]["test"]["accuracy"], "probe_macro_f1": metrics["baseline"]["test"]["macro_f1"],
        "probe_seconds": metrics["baseline"]["seconds"], "finetune_seconds": metrics["seconds"], "wall_seconds": wall,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"), "out": out, "val_file": config.get("val"), "test_file": config.get("test"),
    }


def run_soup(name: str, results: dict) -> dict:
    """The winning recipe of the experiment named by ``soup_of``, once per seed, then a greedy soup of the runs
    chosen on the validation file. Times add up the seeds' runs and the soup."""
    from transferkit.ensemble import build_ensemble

    spec = EXPERIMENTS[name][3]
    recipe = grid_winner(spec["soup_of"], results)
    with tempfile.TemporaryDirectory() as folder:
        seeds = [run(name, {**recipe, "seed": seed}, keep_in=Path(folder)) for seed in spec["seeds"]]
        started = time.time()
        soup = build_ensemble([s["out"] for s in seeds], method="soup", val=seeds[0]["val_file"],
                              test=seeds[0]["test_file"], text_column="sentence", out=str(Path(folder) / "soup"))
        soup_seconds = time.time() - started
    first = {k: v for k, v in seeds[0].items() if k not in PATHS}
    outs = [s["out"] for s in seeds]
    ingredients = [spec["seeds"][outs.index(path)] for path in soup["ensemble"]["ingredients"]]
    return {**first, "recipe": _recipe_key(recipe) + f", greedy soup of seeds {', '.join(map(str, spec['seeds']))}",
            "soup_of": spec["soup_of"], "ingredients": ingredients,
            "test_accuracy": soup["test"]["accuracy"], "test_macro_f1": soup["test"]["macro_f1"],
            "val_accuracy": soup["ensemble"]["soup_val_accuracy"],
            "finetune_seconds": sum(s["finetune_seconds"] for s in seeds) + soup_seconds,
            "wall_seconds": sum(s["wall_seconds"] for s in seeds) + soup_seconds,
            "seeds": {str(seed): {k: r[k] for k in ("val_accuracy", "test_accuracy", "finetune_seconds")}
                      for seed, r in zip(spec["seeds"], seeds)}}


def table(results: dict) -> str:
    lines = ["| experiment | train examples | epochs | validation | linear probe acc / F1 | fine-tuned acc / F1 | goal | fine-tune time | whole run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in EXPERIMENTS:
        if name not in results:
            continue
        r = results[name]
        met = "met" if r["test_accuracy"] >= r["goal"] else "NOT met"
        lines.append(
            f"| {name} ({r['model']} on {r['dataset']}) | {r['train_examples']:,} | {r['epochs']} | {r.get('validation', '')} | "
            f"{r['probe_accuracy']:.4f} / {r['probe_macro_f1']:.4f} | {r['test_accuracy']:.4f} / {r['test_macro_f1']:.4f} | "
            f">= {r['goal']:.2f}: {met} | {r['finetune_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min |")
    for name, r in results.items():
        if r.get("recipe_from"):
            lines += ["", f"{name}: recipe `{r['recipe'] or 'the defaults'}`, the one {r['recipe_from']} chose on validation "
                      f"(its epochs excepted){_stale(r['recipe'], r['recipe_from'], results, NOT_INHERITED)}, {r['epochs']} epochs."]
        if "soup_of" in r:
            chosen = r["recipe"].split(", greedy soup")[0]
            lines += ["", f"{name}: the recipe {r['soup_of']} chose{_stale(chosen, r['soup_of'], results)}, fine-tuned once "
                      f"per seed; the greedy soup (validation accuracy decides which runs join the average) took seeds "
                      f"{', '.join(map(str, r['ingredients']))}:", "",
                      "| seed | val acc | test acc (not used to choose) | fine-tune time |", "|---|---|---|---|"]
            lines += [f"| {seed} | {s['val_accuracy']:.4f} | {s['test_accuracy']:.4f} | {s['finetune_seconds'] / 60:.1f} min |"
                      for seed, s in r["seeds"].items()]
            lines += [f"| soup | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['finetune_seconds'] / 60:.1f} min in all |"]
        if "sweep" in r:
            lines += ["", f"{name}: recipe `{r['recipe']}` chosen by validation accuracy (a tie goes to the first recipe of the grid) among:", "",
                      "| recipe | val acc | test acc (not used to choose) | fine-tune time |", "|---|---|---|---|"]
            lines += [f"| {key} | {s['val_accuracy']:.4f} | {s['test_accuracy']:.4f} | {s['finetune_seconds'] / 60:.1f} min |"
                      for key, s in r["sweep"].items()]
    return "\n".join(lines)


def _stale(recorded: str, source: str, results: dict, dropped: tuple = ()) -> str:
    """A note when the recipe a run inherited is no longer the one its source's grid chooses (a recipe added to
    the grid later won, and this run was not repeated)."""
    if source not in results or "sweep" not in results[source]:
        return ""
    now = grid_winner(source, results)
    if _recipe_key({k: v for k, v in now.items() if k not in dropped}) == recorded:
        return ""
    return f" before `{_recipe_key(now)}` joined the grid and won it (not rerun since)"


def write_doc(results: dict) -> None:
    machines = sorted({r["machine"] for r in results.values()})
    section = "\n".join([
        "## Core fine-tuning (bench/core.py)", "",
        "Test accuracy of the packaged backbones, fine-tuned (`strategy=full`) beside a linear probe on their frozen",
        "features (the run's own baseline, same test set). Fashion-MNIST: official 10k test set, 5% of train held out",
        "for validation, 32x32 inputs. SST-2: `test.tsv` is the GLUE dev set (872 sentences) that papers report;",
        "872 full sentences held out from `train.tsv` (with all their sub-phrases removed from training) choose the",
        "checkpoint and, where a grid is given, the recipe: `dev.tsv` holds phrases, a poor guide to sentence accuracy.",
        "Times are wall-clock on",
        "; ".join(machines) + "; other jobs sometimes shared those cores, so they are upper bounds.", "",
        table(results), "",
        "Published SST-2 accuracies for comparison (GLUE dev): MiniLM-L6-H384 91.5, DistilBERT 91.3, BERT-base 92.7-93.2",
        "(Socher et al. 2013 for the data). Fashion-MNIST: Xiao et al. 2017.", ""])
    replace_section("## Core fine-tuning", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="experiments to run (default: all)")
    parser.add_argument("--doc-only", action="store_true", help="rebuild the docs table from recorded results")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in [] if args.doc_only else (args.only or list(EXPERIMENTS)):
        if "grid" in EXPERIMENTS[name][3]:
            run_grid(name, results)
        elif "soup_of" in EXPERIMENTS[name][3]:
            results[name] = run_soup(name, results)
            save(results)
        elif "recipe_from" in EXPERIMENTS[name][3]:
            source = EXPERIMENTS[name][3]["recipe_from"]
            overrides = {k: v for k, v in grid_winner(source, results).items() if k not in NOT_INHERITED}
            results[name] = {**run(name, overrides), "recipe_from": source}
            save(results)
        else:
            results[name] = run(name)
            save(results)
    print(table(results))
    write_doc(results)
    print(f"\nwritten to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
