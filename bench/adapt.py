"""Unsupervised domain adaptation: target accuracy of every method beside source-only.

Text: UCI sentiment, amazon (labelled source) -> imdb (target), packaged MiniLM-L6, full fine-tuning.
Images: Fashion-MNIST (labelled source) -> Fashion-M (bench/fashion_m.py, the MNIST-M recipe),
EfficientNet-Lite0 at 32 px. The unlabelled target training data and the target test data follow the
usual protocol of the field (TLlib, Ganin et al.): for text, all of imdb serves unlabelled in training
and, with its labels, as the test (transductive); for images, unlabelled Fashion-M training images
adapt and the Fashion-M test set (other garments) reports. Checkpoints and early stopping use the
source validation split only: no target label is seen before the report.

    python bench/adapt.py                         # one seed, both pairs (about 20 min on 2 CPU cores)
    python bench/adapt.py --seeds 0 1 2 --only text
    python bench/adapt.py --tiny --model DIR      # seconds: a smoke run on a tiny local model (tests)
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
DOMAINS = ROOT.parent / "shared" / "data" / "sentiment-domains"
FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = ROOT / "bench" / "results" / "adapt.json"
METHODS = ["source-only", "target-bn", "dan", "dann", "coral", "cdan", "mcc", "im"]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import machine, replace_section, save_results  # noqa: E402


def _with_header(source: Path, out: Path) -> str:
    """The UCI files have no header row; transferkit tables need one."""
    rows = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.write_text("sentence\tlabel\n" + "\n".join(line.replace('"', "'") for line in rows) + "\n", encoding="utf-8")
    return str(out)


def text_pair(args, folder: Path) -> dict:
    if args.tiny:
        from tiny_data import tiny_sentences

        files = tiny_sentences(folder)
        source, target = files["train"], files["test"]
    else:
        source = _with_header(DOMAINS / "amazon.tsv", folder / "amazon.tsv")
        target = _with_header(DOMAINS / "imdb.tsv", folder / "imdb.tsv")
    recipe = dict(model=args.model, train=source, text_column="sentence", target=target, target_test=target,
                  val_fraction=0.15, test_fraction=0.15, epochs=args.epochs, lr=5e-5, batch_size=32, patience=None,
                  baseline=False)
    return {"pair": "amazon -> imdb" if not args.tiny else "tiny", "model": args.model, "runs": run_methods(args, folder, "text", recipe)}


def image_pair(args, folder: Path) -> dict:
    if args.tiny:
        from PIL import Image

        import numpy as np

        rng = np.random.default_rng(0)
        for name, tint in (("source", 0), ("target", 80)):
            for i in range(40):
                label = "h" if i % 2 == 0 else "v"
                image = np.zeros((16, 16, 3), dtype=np.uint8) + tint
                if label == "h":
                    image[::4] = 220
                else:
                    image[:, ::4] = 220
                image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
                (folder / name / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / name / label / f"{i}.png")
        source, target, target_test, model, size = (str(folder / "source"), str(folder / "target"),
                                                    str(folder / "target"), args.image_model, 16)
    else:
        from fashion_m import make

        made = make(folder / "fashion-m", seed=0)
        source, target, target_test = (str(FASHION / "train-images-idx3-ubyte.gz"), str(made["train"]), str(made["test"]))
        model, size = args.image_model, 32
    recipe = dict(model=model, image_size=size, train=source, target=target, target_test=target_test,
                  max_train_examples=args.image_examples, val_fraction=0.05, test_fraction=0.05,
                  epochs=args.image_epochs, lr=1e-3, batch_size=64, schedule="cosine", patience=None, baseline=False)
    return {"pair": "Fashion-MNIST -> Fashion-M" if not args.tiny else "tiny", "model": model,
            "runs": run_methods(args, folder, "image", recipe)}


def run_methods(args, folder: Path, name: str, recipe: dict) -> list[dict]:
    import transferkit

    runs = []
    for seed in args.seeds:
        for method in args.methods:
            for weight in [1.0] if method == "source-only" else args.weights:
                started = time.time()
                metrics = transferkit.finetune(adapt_method=method, adapt_weight=weight, seed=seed,
                                               out=str(folder / f"{name}-{method}-{weight:g}-{seed}"), **recipe)
                a = metrics["adaptation"]
                runs.append({"method": method, "weight": weight, "seed": seed,
                             "target_accuracy": a["target_test"]["accuracy"],
                             "source_test_accuracy": metrics["test"]["accuracy"], "a_distance_before": a["a_distance_before"],
                             "a_distance_after": a["a_distance_after"], "dev_risk": a["dev"]["risk"],
                             "selection": a["selection"], "best_epoch": metrics["best_epoch"],
                             "seconds": time.time() - started})
                print(f"{name} {method:12s} weight {weight:g} seed {seed}: target {a['target_test']['accuracy']:.4f}, "
                      f"A-distance {a['a_distance_before']:.2f} -> {a['a_distance_after']:.2f}, DEV {a['dev']['risk']:.4f}",
                      flush=True)
    return runs


def _key(run: dict) -> tuple:
    return run["method"], run.get("weight", 1.0), run["seed"]


def _label(method: str, weight: float) -> str:
    return method if weight == 1.0 else f"{method} (weight {weight:g})"


def dev_choice(runs: list[dict]) -> list[dict] | None:
    """Per seed, among the runs that report a DEV risk, the one with the lowest (target labels play no part)."""
    chosen = []
    for seed in sorted({r["seed"] for r in runs}):
        candidates = [r for r in runs if r["seed"] == seed and r.get("dev_risk") is not None]
        if len(candidates) < 2:
            return None
        chosen.append(min(candidates, key=lambda r: r["dev_risk"]))
    return chosen


PAIRS = {"text": text_pair, "image": image_pair}


def table(results: dict) -> str:
    lines = []
    for name in PAIRS:
        pair = results.get(name)
        if not pair:
            continue
        seeds = sorted({r["seed"] for r in pair["runs"]})
        # Runs recorded before the epoch was chosen by DEV kept the best source validation accuracy.
        selections = sorted({r.get("selection", "source validation split") for r in pair["runs"]})
        lines += [f"### {name}: {pair['pair']}, {pair['model']} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; "
                  f"{results['machine']}, {pair.get('date', results['date'])})", "",
                  f"Epoch kept: {' / '.join(selections)}.", "",
                  "| method | target accuracy (mean +- std) | vs source-only | source test accuracy | A-distance before -> after | DEV risk | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        by = {}
        for r in pair["runs"]:
            by.setdefault(_label(r["method"], r.get("weight", 1.0)), []).append(r)
        base = statistics.mean(r["target_accuracy"] for r in by.get("source-only", [])) if "source-only" in by else None
        for method, rows in by.items():
            accuracy = [r["target_accuracy"] for r in rows]
            mean = statistics.mean(accuracy)
            spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
            delta = f"{100 * (mean - base):+.2f} pts" if base is not None else "-"
            risks = [r["dev_risk"] for r in rows if r.get("dev_risk") is not None]
            dev = f"{statistics.mean(risks):.4f}" if len(risks) == len(rows) else "-"
            lines.append(f"| {method} | {mean:.4f} +- {spread:.4f} | {delta} | "
                         f"{statistics.mean(r['source_test_accuracy'] for r in rows):.4f} | "
                         f"{statistics.mean(r['a_distance_before'] for r in rows):.2f} -> "
                         f"{statistics.mean(r['a_distance_after'] for r in rows):.2f} | {dev} | "
                         f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
        chosen = dev_choice(pair["runs"])
        if chosen is not None and base is not None:
            mean = statistics.mean(r["target_accuracy"] for r in chosen)
            lines += ["", "Chosen without target labels, per seed the run with the lowest DEV risk (among the runs with one): "
                      + ", ".join(f"seed {r['seed']}: {_label(r['method'], r.get('weight', 1.0))}" for r in chosen)
                      + f"; target accuracy {mean:.4f} ({100 * (mean - base):+.2f} pts vs source-only)."]
        lines.append("")
    return "\n".join(lines).rstrip()


def write_doc(results: dict) -> None:
    intro = ("## Domain adaptation (bench/adapt.py)\n\nEvery method with the same backbone, recipe and seed; each run "
             "keeps the epoch with the lowest DEV risk (`--adapt-selection dev`, the default; each table says which "
             "rule its runs used), and target labels are used only for the target accuracy. "
             "A-distance: proxy A-distance of a linear domain classifier on the backbone's features (2 = separable, "
             "0 = indistinguishable), pretrained -> after training. DEV risk: Deep Embedded Validation (You et al. 2019), the "
             "kept epoch's target risk estimated from source validation losses weighted by the density ratio, without "
             "target labels (lower is better; '-': recorded before DEV was reported). target-bn: no transfer loss, but the target "
             "batches go through the network as under every other method, so BatchNorm statistics see both domains "
             "(AdaBN): what a method adds beyond that is its gain over target-bn. Reference points (other data, ResNet-50): TLlib "
             "Office-31 source-only 79.5, DAN 83.7, DANN 86.1, CDAN 87.7; Ganin et al. MNIST -> MNIST-M source-only "
             "52.25, DANN 76.66. `dan` aligns the features only: with the MMD of the classifier outputs added (the "
             "paper's fc8), the text pair's target accuracy fell to 0.7630 and 0.8350 (seeds 0 and 1, weight 1) and "
             "0.5630 (seed 0, weight 3), against source-only's 0.8753 mean; that run was stopped there (2026-12-03, epochs "
             "kept by source validation accuracy). Why DEV keeps the epoch: under the shift, the source validation "
             "accuracy (150 amazon reviews) kept epoch 1 of an `im` run (target 0.856, seed 0) whose last epoch reached "
             "0.890; with the source-validation rule (2026-12-03) the text pair's best method, DAN, gained +1.70 pts "
             "and MCC +0.57 (0.847, 0.898, 0.898 over the seeds). On the image pair the same rule (2026-12-02, 3 seeds, "
             "without MCC and IM) gave source-only 0.3251, target-bn 0.4767 (+15.16 pts), dan +15.43, dann +16.18, "
             "coral +15.21 and cdan 0.4966 (+17.15): higher than with DEV, which is unreliable there (the domains "
             "separate almost perfectly, so few validation examples carry the density ratios; estimates down to "
             "-243).\n\n")
    replace_section("## Domain adaptation (bench/adapt.py)", intro + table(results) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--weights", nargs="+", type=float, default=[1.0],
                        help="adaptation weights to run each method with (--adapt-weight; default 1)")
    parser.add_argument("--model", default="minilm-l6", help="text model")
    parser.add_argument("--epochs", type=int, default=3, help="text epochs")
    parser.add_argument("--image-model", default="efficientnet-lite0")
    parser.add_argument("--image-examples", type=int, default=2000, help="labelled source images (default 2000)")
    parser.add_argument("--image-epochs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny local models, tiny data")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="rebuild the docs section from the recorded results")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    if not args.doc_only:

        results.update(machine=machine(),
                       date=time.strftime("%Y-%m-%d"))
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.only:
                previous = results.get(name) or {}
                results[name] = PAIRS[name](args, Path(tmp))
                results[name]["date"] = results["date"]
                if previous.get("model") == results[name]["model"] and not args.tiny:
                    # Runs recorded earlier with the same model stay unless this run repeats them (same method,
                    # weight and seed): --seeds 1 2 adds to a recorded seed 0, --weights 3 to the weight-1 runs.
                    fresh = {_key(r) for r in results[name]["runs"]}
                    kept = [r for r in previous["runs"] if _key(r) not in fresh]
                    results[name]["runs"] = sorted(kept + results[name]["runs"], key=lambda r: (r["seed"], METHODS.index(
                        r["method"]) if r["method"] in METHODS else 99, r.get("weight", 1.0)))
                save_results(args.results, results)
        print(table(results))
    if not args.no_doc:
        write_doc(results)


if __name__ == "__main__":
    main()
