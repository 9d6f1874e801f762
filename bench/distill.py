"""Knowledge distillation on SST-2: a fine-tuned MiniLM-L6 teaches a shallower MiniLM (its bottom K layers).

For each student size the same student is fine-tuned twice on the same sentences with the same
recipe: alone (labels only) and distilled (labels + the teacher's soft predictions). Checkpoints are
chosen on 872 full sentences held out from train (bench/core.py's protocol); `test.tsv` (the GLUE dev
set) is predicted once. Latency is one forward pass over 64 test sentences (median of 3, same process).

    python bench/distill.py                      # about 12 min on 2 CPU cores
    python bench/distill.py --tiny --model DIR   # seconds: a smoke run on a tiny local model (tests)
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

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "bench" / "results" / "distill.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import replace_section  # noqa: E402
from ensemble import data_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", help="teacher and student backbone")
    parser.add_argument("--examples", type=int, default=4000, help="training sentences (default 4000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--keep", nargs="+", type=int, default=[2, 1], help="student depths (layers kept)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--tiny", action="store_true", help="smoke run: --model is a tiny local model, tiny data")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="rebuild the docs section from the recorded results")
    args = parser.parse_args()
    if args.doc_only:
        write_doc(json.loads(Path(args.results).read_text()))
        return
    import torch

    import transferkit

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d"), "model": args.model, "examples": args.examples, "epochs": args.epochs,
               "alpha": args.alpha, "temperature": args.temperature, "students": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = data_files(folder, args.tiny)
        recipe = dict(train=files["train"], val=files["val"], test=files["test"], text_column="sentence",
                      max_train_examples=args.examples, epochs=args.epochs, patience=None, baseline=False, lr=1e-4)
        started = time.time()
        teacher = transferkit.finetune(model=args.model, out=str(folder / "teacher"), **recipe)
        results["teacher"] = {"test_accuracy": teacher["test"]["accuracy"], "seconds": time.time() - started,
                              "parameters": teacher["total_parameters"]}
        for keep in args.keep:
            row = {"layers": keep}
            for mode in ("alone", "distilled"):
                extra = {"teacher": str(folder / "teacher"), "distill_alpha": args.alpha,
                         "distill_temperature": args.temperature} if mode == "distilled" else {}
                started = time.time()
                metrics = transferkit.finetune(model=args.model, keep_layers=keep, out=str(folder / f"{mode}-{keep}"),
                                               **recipe, **extra)
                row[f"{mode}_test_accuracy"] = metrics["test"]["accuracy"]
                row[f"{mode}_seconds"] = time.time() - started
                if mode == "distilled":
                    d = metrics["distillation"]
                    row.update(parameters=d["student_parameters"], teacher_latency_ms=d["teacher_latency_ms"],
                               student_latency_ms=d["student_latency_ms"], speedup=d["speedup"],
                               teacher_test_accuracy=d["teacher_test"]["accuracy"])
            row["share_of_teacher"] = row["distilled_test_accuracy"] / results["teacher"]["test_accuracy"]
            results["students"].append(row)
            print(f"{keep} layers: alone {row['alone_test_accuracy']:.4f}, distilled {row['distilled_test_accuracy']:.4f} "
                  f"({100 * row['share_of_teacher']:.1f}% of the teacher), {row['speedup']:.2f}x faster", flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=1))
    print(table(results))
    if not args.no_doc:
        write_doc(results)


def table(results: dict) -> str:
    t = results["teacher"]
    lines = [f"### {results['model']} teacher (full fine-tune) -> its bottom K layers, SST-2, {results['examples']} sentences, "
             f"{results['epochs']} epochs, alpha {results['alpha']}, T {results['temperature']} ({results['machine']}, "
             f"{results['date']})", "",
             "| model | parameters | test accuracy | share of teacher | latency (64 sentences) | speed-up |",
             "|---|---|---|---|---|---|",
             f"| teacher ({results['model']}, all layers) | {t['parameters'] / 1e6:.1f}M | {t['test_accuracy']:.4f} | 100% | "
             f"{results['students'][0]['teacher_latency_ms']:.0f} ms | 1.00x |" if results["students"] else ""]
    for s in results["students"]:
        lines.append(f"| {s['layers']} layers, fine-tuned alone | {s['parameters'] / 1e6:.1f}M | {s['alone_test_accuracy']:.4f} | "
                     f"{100 * s['alone_test_accuracy'] / t['test_accuracy']:.1f}% | {s['student_latency_ms']:.0f} ms | "
                     f"{s['speedup']:.2f}x |")
        lines.append(f"| {s['layers']} layers, distilled | {s['parameters'] / 1e6:.1f}M | {s['distilled_test_accuracy']:.4f} | "
                     f"{100 * s['share_of_teacher']:.1f}% | {s['student_latency_ms']:.0f} ms | {s['speedup']:.2f}x |")
    return "\n".join(lines)


def write_doc(results: dict) -> None:
    intro = ("## Distillation (bench/distill.py)\n\nA fully fine-tuned teacher teaches a student made of its backbone's "
             "bottom K pretrained layers (`--keep-layers K`); each student is also fine-tuned alone with the same "
             "recipe. One seed; checkpoints chosen on 872 held-out training sentences, `test.tsv` predicted once. "
             "Latency: one forward pass over 64 test sentences, median of 3.\n\n")
    replace_section("## Distillation (bench/distill.py)", intro + table(results) + "\n")


if __name__ == "__main__":
    main()
