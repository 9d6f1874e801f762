"""Continued pre-training before few-label fine-tuning, on SST-2 with the packaged MiniLM-L6.

1. Masked-LM pre-training of MiniLM-L6 on unlabelled SST-2 training text (labels dropped; the 872
   held-out validation sentences and all their sub-phrases excluded, bench/core.py's protocol).
2. Few-label fine-tuning: the same 200 labelled training sentences (a seeded stratified sample, a new
   sample per seed) fine-tuned from the original and from the adapted encoder, same recipe; checkpoints
   on the 872 held-out sentences; `test.tsv` (the GLUE dev set) predicted once. Three seeds.

    python bench/pretrain.py                      # about 12 min on 2 CPU cores
    python bench/pretrain.py --tiny --model DIR   # seconds: a smoke run on a tiny local model (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pretrain.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import machine, replace_section, save_results  # noqa: E402
from ensemble import data_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--unlabelled", type=int, default=12000, help="unlabelled texts for pre-training (default 12000)")
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--labels", type=int, default=200, help="labelled sentences for fine-tuning (default 200)")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--head-warmup-epochs", type=int, default=None,
                        help="epochs of MLM-head warm-up, encoder frozen (default: the library's, 1 for a new head; "
                             "0 reproduces the first recorded run)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: --model is a tiny local model, tiny data")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="rebuild the docs section from the recorded results")
    args = parser.parse_args()
    if args.doc_only:
        write_doc(json.loads(Path(args.results).read_text()))
        return
    import pandas as pd

    import transferkit
    from transferkit.pretrain import pretrain

    results = {"machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "model": args.model, "unlabelled": args.unlabelled,
               "labels": args.labels, "epochs": args.epochs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = data_files(folder, args.tiny)
        frame = pd.read_csv(files["train"], sep="\t", dtype=str, keep_default_na=False)
        unlabelled = folder / "unlabelled.txt"
        texts = frame["sentence"].sample(frac=1.0, random_state=0).tolist()[:args.unlabelled]
        unlabelled.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
        started = time.time()
        adapted = folder / "adapted"
        record = pretrain(args.model, str(unlabelled), str(adapted), epochs=args.pretrain_epochs, lr=5e-5,
                          batch_size=32, head_warmup_epochs=args.head_warmup_epochs)
        results["pretrain"] = {k: record[k] for k in ("texts", "train", "val", "val_loss_before", "val_loss_after",
                                                      "val_perplexity_before", "val_perplexity_after", "new_mlm_head")}
        warmup = record["head_warmup"]
        results["pretrain"]["head_warmup"] = {k: warmup[k] for k in ("epochs", "lr", "val_loss_after")} if warmup else None
        results["pretrain"]["seconds"] = time.time() - started
        for seed in args.seeds:
            for name, model in (("original", args.model), ("adapted", str(adapted))):
                started = time.time()
                metrics = transferkit.finetune(model=model, train=files["train"], val=files["val"], test=files["test"],
                                               text_column="sentence", max_train_examples=args.labels, seed=seed,
                                               epochs=args.epochs, batch_size=16, lr=1e-4, patience=None, baseline=False,
                                               out=str(folder / f"{name}-{seed}"))
                results["runs"].append({"encoder": name, "seed": seed, "test_accuracy": metrics["test"]["accuracy"],
                                        "seconds": time.time() - started})
                print(f"seed {seed} {name}: test {metrics['test']['accuracy']:.4f}", flush=True)
    # A recorded run of the other variant (with or without the head warm-up) stays beside the new one.
    recorded = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    for key in ("with_warmup", "without_warmup"):
        if recorded.get(key):
            results.setdefault("other", {})[key] = recorded[key]
    if recorded.get("pretrain") and not args.tiny:
        key = "with_warmup" if recorded["pretrain"].get("head_warmup") else "without_warmup"
        results.setdefault("other", {})[key] = {k: recorded[k] for k in ("pretrain", "runs", "date", "machine")}
    variant = "with_warmup" if results["pretrain"]["head_warmup"] else "without_warmup"
    results.get("other", {}).pop(variant, None)
    save_results(args.results, results)
    print(table(results))
    if not args.no_doc:
        write_doc(results)


def table(results: dict) -> str:
    lines = section(results, results["model"], results["labels"])
    for key, title in (("with_warmup", "Recorded run with the head warm-up"),
                       ("without_warmup", "Earlier run without the head warm-up (the new head trained with the encoder from the start)")):
        if results.get("other", {}).get(key):
            lines += ["", f"#### {title}", ""] + section(results["other"][key], results["model"], results["labels"])[2:]
    return "\n".join(lines)


def section(results: dict, model: str, labels: int) -> list[str]:
    p = results["pretrain"]
    warmup = p.get("head_warmup")
    head = ("; a new MLM head (the checkpoint had none)" if p["new_mlm_head"] else "") + (
        f", first trained alone for {warmup['epochs']} epoch(s) with the encoder frozen (loss then "
        f"{warmup['val_loss_after']:.3f})" if warmup else (", trained with the encoder from the start" if p["new_mlm_head"] else ""))
    lines = [f"### {model}: masked-LM on {p['train']:,} unlabelled SST-2 texts, then {labels} labels "
             f"({results['machine']}, {results['date']})", "",
             f"Pre-training: held-out masked-token loss {p['val_loss_before']:.3f} -> {p['val_loss_after']:.3f} "
             f"(perplexity {p['val_perplexity_before']:.1f} -> {p['val_perplexity_after']:.1f}) on {p['val']} texts, "
             f"{p['seconds']:.0f} s{head}.", "",
             "| encoder | " + " | ".join(f"seed {r['seed']}" for r in results["runs"] if r["encoder"] == "original")
             + " | mean | std |",
             "|---|" + "---|" * (len([r for r in results["runs"] if r["encoder"] == "original"]) + 2)]
    means = {}
    for encoder in ("original", "adapted"):
        accuracies = [r["test_accuracy"] for r in results["runs"] if r["encoder"] == encoder]
        means[encoder] = statistics.mean(accuracies)
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        lines.append(f"| {encoder} | " + " | ".join(f"{a:.4f}" for a in accuracies) + f" | {means[encoder]:.4f} | {spread:.4f} |")
    lines += ["", f"Continued pre-training changed the few-label test accuracy by "
                  f"{100 * (means['adapted'] - means['original']):+.2f} pts on average."]
    return lines


def write_doc(results: dict) -> None:
    intro = ("## Continued pre-training (bench/pretrain.py)\n\nMasked-LM pre-training on unlabelled in-domain text "
             "(SST-2 training text without its labels, the validation sentences excluded), then fine-tuning on a few "
             "labels from the original and from the adapted encoder with the same recipe (full, LR 1e-4, batch 16); "
             "checkpoints on 872 held-out sentences, `test.tsv` predicted once.\n\n")
    replace_section("## Continued pre-training (bench/pretrain.py)", intro + table(results) + "\n")


if __name__ == "__main__":
    main()
