"""Ensembles of fine-tuned runs vs their best member, on SST-2 with the packaged MiniLM-L6.

Members: the same backbone fine-tuned with different strategies and seeds (linear probe, BitFit, LoRA,
full), each on the same training sentences, each choosing its checkpoint on 872 full sentences held
out from train (bench/core.py's protocol). Every ensemble method learns only from those validation
sentences; the GLUE dev set (`test.tsv`, 872 sentences) is predicted once to report.

    python bench/ensemble.py                     # about 10 min on 2 CPU cores
    python bench/ensemble.py --tiny --model DIR  # seconds: a smoke run on a tiny local model (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "bench" / "results" / "ensemble.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import machine, replace_section, save_results  # noqa: E402

# (strategy, lr, seed): fine-tunes of similar quality that differ by seed (head init, data order, dropout)
# and, for one member, by strategy. A first run with linear-probe, BitFit, LoRA and full members (2,000
# sentences) found no gain: one member was much stronger than the rest (bench/results/ensemble-mixed-strategies.json,
# shown under the main table in docs/benchmarks.md).
MEMBERS = [("full", 1e-4, 0), ("full", 1e-4, 1), ("full", 1e-4, 2), ("lora", 5e-4, 3)]
METHODS = ["vote", "average", "weighted", "stack", "soup"]


def data_files(folder: Path, tiny: bool) -> dict:
    if tiny:
        from tiny_data import tiny_sentences

        return tiny_sentences(folder)
    from core import _sentence_validation

    train, val = _sentence_validation(str(SST2 / "train.tsv"), 872, folder)
    return {"train": train, "val": val, "test": str(SST2 / "test.tsv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--examples", type=int, default=2000, help="training sentences per member (default 2000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke run: --model is a tiny local model, tiny data")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="rebuild the docs section from the recorded results")
    args = parser.parse_args()
    if args.doc_only:
        write_doc(json.loads(Path(args.results).read_text()))
        return

    import transferkit
    from transferkit.ensemble import build_ensemble

    results = {"machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "model": args.model, "examples": args.examples, "epochs": args.epochs,
               "members": [], "ensembles": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = data_files(folder, args.tiny)
        runs = []
        for strategy, lr, seed in MEMBERS:
            out = folder / f"{strategy}-{seed}"
            started = time.time()
            metrics = transferkit.finetune(model=args.model, train=files["train"], val=files["val"], test=files["test"],
                                           text_column="sentence", max_train_examples=args.examples, strategy=strategy,
                                           lr=lr, seed=seed, epochs=args.epochs, patience=None, baseline=False, out=str(out))
            best = metrics["history"][metrics["best_epoch"] - 1] if metrics.get("best_epoch") else {}
            results["members"].append({"run": f"{strategy} (seed {seed})", "strategy": strategy, "seed": seed,
                                       "val_accuracy": best.get("val_accuracy"),
                                       "test_accuracy": metrics["test"]["accuracy"], "seconds": time.time() - started})
            runs.append(str(out))
        for method in METHODS:
            started = time.time()
            metrics = build_ensemble(runs, method=method, val=files["val"], test=files["test"], text_column="sentence",
                                     out=str(folder / f"ensemble-{method}"))
            results["ensembles"].append({"method": method, "test_accuracy": metrics["test"]["accuracy"],
                                         "test_macro_f1": metrics["test"]["macro_f1"],
                                         "val_accuracy": metrics["ensemble"].get("val_accuracy",
                                                                                 metrics["ensemble"].get("soup_val_accuracy")),
                                         "gain": metrics["gain_over_best_member"],
                                         "ingredients": len(metrics["ensemble"].get("ingredients", runs)),
                                         "seconds": time.time() - started})
            print(f"{method:10s} test {metrics['test']['accuracy']:.4f} ({100 * metrics['gain_over_best_member']:+.2f} pts)",
                  flush=True)
    save_results(args.results, results)
    print(table(results))
    if not args.no_doc:
        write_doc(results)


def table(results: dict) -> str:
    best = max(results["members"], key=lambda m: m["test_accuracy"])
    best_by_val = max(results["members"], key=lambda m: m["val_accuracy"] or 0)
    lines = [f"### {results['model']} on SST-2, {results['examples']} training sentences, {results['epochs']} epochs per member "
             f"({results['machine']}, {results['date']})", "",
             "| model | val accuracy | test accuracy | vs best member (test) | time (s) |", "|---|---|---|---|---|"]
    for m in results["members"]:
        lines.append(f"| member: {m['run']} | {m['val_accuracy'] or 0:.4f} | {m['test_accuracy']:.4f} | "
                     f"{100 * (m['test_accuracy'] - best['test_accuracy']):+.2f} | {m['seconds']:.0f} |")
    for e in results["ensembles"]:
        extra = f" ({e['ingredients']} of {len(results['members'])} ingredients)" if e["method"] == "soup" else ""
        val = f"{e['val_accuracy']:.4f}" if e.get("val_accuracy") is not None else "-"
        lines.append(f"| ensemble: {e['method']}{extra} | {val} | {e['test_accuracy']:.4f} | {100 * e['gain']:+.2f} | "
                     f"{e['seconds']:.0f} |")
    winner = max(results["ensembles"], key=lambda e: e["test_accuracy"])
    lines += ["", f"Best method on test: {winner['method']}, {100 * winner['gain']:+.2f} pts over the best member "
                  f"({best['run']}). Chosen without test labels, a user would take the member with the best validation "
                  f"accuracy ({best_by_val['run']}, test {best_by_val['test_accuracy']:.4f}) or the method with the best "
                  f"validation accuracy."]
    return "\n".join(lines)


def write_doc(results: dict) -> None:
    intro = ("## Ensembles (bench/ensemble.py)\n\nFour fine-tunes of one backbone (different seeds and strategies) and "
             "every ensemble method over them. The weighted, stack and soup methods learn from the 872 held-out "
             "training sentences only; `test.tsv` (the GLUE dev set) is predicted once.\n\n")
    earlier = RESULTS.with_name("ensemble-mixed-strategies.json")
    extra = ""
    if earlier.is_file():
        # An earlier run with members of very different quality (linear probe .. full), kept for contrast.
        extra = "\n\n#### Earlier run: members of very different quality\n\n" + table(json.loads(earlier.read_text()))
    replace_section("## Ensembles (bench/ensemble.py)", intro + table(results) + extra + "\n")


if __name__ == "__main__":
    main()
