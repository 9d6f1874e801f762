"""Multi-task vs single-task fine-tuning, for every loss weighting, on a text pair and an image pair.

Text: SST-2 (sentences from the treebank; 400 held-out full sentences choose the checkpoint, the GLUE
dev set reports) + UCI amazon reviews (a 70/15/15 stratified split), packaged MiniLM-L6, full
fine-tuning, hard sharing. Images: Fashion-MNIST garments (10 classes) + a second labelling of other
Fashion-MNIST images grouped into tops / bottoms-and-dresses / footwear / bags, EfficientNet-Lite0 at
32 px. Each task alone is fine-tuned once with the same recipe and epochs; a multi-task epoch holds as
many batches as one epoch of each task (same budget). Checkpoints on the mean validation accuracy.

    python bench/multitask.py                      # both pairs, every weighting (about 25 min on 2 CPU cores)
    python bench/multitask.py --only text --weightings equal pcgrad
    python bench/multitask.py --tiny --model DIR   # seconds: a smoke run on a tiny local model (tests)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
DOMAINS = ROOT.parent / "shared" / "data" / "sentiment-domains"
FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = ROOT / "bench" / "results" / "multitask.json"
WEIGHTINGS = ["equal", "uncertainty", "dwa", "gradnorm", "pcgrad"]
GROUPS = {0: "top", 2: "top", 4: "top", 6: "top", 1: "bottom-or-dress", 3: "bottom-or-dress", 5: "footwear",
          7: "footwear", 9: "footwear", 8: "bag"}

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import machine, replace_section, save_results  # noqa: E402


def text_tasks(args, folder: Path) -> tuple[list[dict], dict]:
    if args.tiny:
        from tiny_data import tiny_sentences

        (folder / "a").mkdir()
        (folder / "b").mkdir()
        first, second = tiny_sentences(folder / "a"), tiny_sentences(folder / "b")
        return ([{"name": "sst2", "train": first["train"], "val": first["val"], "test": first["test"]},
                 {"name": "amazon", "train": second["train"], "val": second["val"], "test": second["test"]}],
                dict(model=args.model, text_column="sentence", epochs=1, lr=1e-3, batch_size=16))
    from adapt import _with_header
    from core import _sentence_validation

    train, val = _sentence_validation(str(SST2 / "train.tsv"), 400, folder)
    amazon = _with_header(DOMAINS / "amazon.tsv", folder / "amazon.tsv")
    tasks = [{"name": "sst2", "train": train, "val": val, "test": str(SST2 / "test.tsv"),
              "max_train_examples": args.text_examples},
             {"name": "amazon", "train": amazon, "val_fraction": 0.15, "test_fraction": 0.15}]
    return tasks, dict(model=args.model, text_column="sentence", epochs=args.epochs, lr=5e-5, batch_size=32)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _image_folder(folder: Path, images: np.ndarray, labels: list[str]) -> str:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / label / f"{i}.png")
    return str(folder)


def image_tasks(args, folder: Path) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    if args.tiny:
        images = rng.integers(0, 255, size=(240, 16, 16), dtype=np.uint8)
        labels = rng.integers(0, 10, size=240)
        images[np.arange(240), labels, :] = 255  # a learnable bright row per class
        test_images, test_labels = images[200:], labels[200:]
        images, labels, n = images[:200], labels[:200], 100
        recipe = dict(model=args.image_model, image_size=16, epochs=1, lr=1e-3, batch_size=16)
    else:
        images, labels = _read_idx(FASHION / "train-images-idx3-ubyte.gz"), _read_idx(FASHION / "train-labels-idx1-ubyte.gz")
        test_images, test_labels = _read_idx(FASHION / "t10k-images-idx3-ubyte.gz"), _read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
        n = args.image_examples
        recipe = dict(model=args.image_model, image_size=32, epochs=args.image_epochs, lr=1e-3, batch_size=64,
                      schedule="cosine")
    order, test_order = rng.permutation(len(images)), rng.permutation(len(test_images))
    garment, group = order[:n], order[n: 2 * n]  # different images for the two tasks
    half = len(test_order) // 2
    names = {0: "t-shirt", 1: "trouser", 2: "pullover", 3: "dress", 4: "coat", 5: "sandal", 6: "shirt",
             7: "sneaker", 8: "bag", 9: "ankle-boot"}
    tasks = [{"name": "garment", "train": _image_folder(folder / "garment-train", images[garment], [names[int(c)] for c in labels[garment]]),
              "test": _image_folder(folder / "garment-test", test_images[test_order[:half]],
                                    [names[int(c)] for c in test_labels[test_order[:half]]]), "val_fraction": 0.1},
             {"name": "group", "train": _image_folder(folder / "group-train", images[group], [GROUPS[int(c)] for c in labels[group]]),
              "test": _image_folder(folder / "group-test", test_images[test_order[half:]],
                                    [GROUPS[int(c)] for c in test_labels[test_order[half:]]]), "val_fraction": 0.1}]
    return tasks, recipe


def run_pair(args, folder: Path, name: str, make) -> dict:
    import transferkit
    from transferkit.multitask import MultiTaskConfig
    from transferkit.multitask.config import TASK_FIELDS

    folder.mkdir(parents=True, exist_ok=True)
    tasks, recipe = make(args, folder)
    recipe = {**recipe, "patience": None, "seed": args.seed}
    single = {}
    for task in tasks:
        data = {k: v for k, v in task.items() if k in TASK_FIELDS}
        started = time.time()
        metrics = transferkit.finetune(**recipe, **data, baseline=False, out=str(folder / f"single-{task['name']}"))
        single[task["name"]] = {"accuracy": metrics["test"]["accuracy"], "seconds": time.time() - started}
        print(f"{name} single-task {task['name']}: {metrics['test']['accuracy']:.4f}", flush=True)
    runs = []
    for sharing, weighting in [("hard", w) for w in args.weightings] + [("soft", "equal")] * args.soft:
        started = time.time()
        config = MultiTaskConfig.from_dict({**recipe, "tasks": tasks, "sharing": sharing, "weighting": weighting,
                                            "single_task_baseline": False,
                                            "out": str(folder / f"multi-{sharing}-{weighting}")}, source="bench")
        metrics = transferkit.fit_multitask(config)
        accuracy = {t: v["test"]["accuracy"] for t, v in metrics["tasks"].items()}
        from transferkit.multitask.run import delta_m

        final_weights = {k[len("weight_"):]: v for k, v in metrics["history"][-1].items() if k.startswith("weight_")}
        runs.append({"sharing": sharing, "weighting": weighting, "accuracy": accuracy,
                     "delta_m": delta_m(accuracy, {t: single[t]["accuracy"] for t in accuracy}),
                     "final_weights": final_weights, "seconds": time.time() - started})
        print(f"{name} {sharing} {weighting}: {accuracy}, delta_m {runs[-1]['delta_m']:+.2f}%", flush=True)
    return {"model": recipe["model"], "epochs": recipe["epochs"], "tasks": [t["name"] for t in tasks],
            "single": single, "runs": runs}


PAIRS = {"text": text_tasks, "image": image_tasks}


def table(results: dict) -> str:
    lines = []
    for name in PAIRS:
        pair = results.get(name)
        if not pair:
            continue
        tasks = pair["tasks"]
        lines += [f"### {name}: {' + '.join(tasks)}, {pair['model']}, {pair['epochs']} epochs ({results['machine']}, "
                  f"{pair.get('date', results['date'])})", "",
                  "| model | " + " | ".join(f"{t} test acc" for t in tasks) + " | delta_m | final loss weights | time (s) |",
                  "|---" * (len(tasks) + 4) + "|"]
        single_seconds = sum(v["seconds"] for v in pair["single"].values())
        lines.append("| single-task (one model per task) | " + " | ".join(f"{pair['single'][t]['accuracy']:.4f}" for t in tasks)
                     + f" | 0 (reference) | - | {single_seconds:.0f} (both) |")
        for run in pair["runs"]:
            weights = ", ".join(f"{t} {run['final_weights'].get(t, float('nan')):.2f}" for t in tasks)
            cells = " | ".join(f"{run['accuracy'][t]:.4f} ({100 * (run['accuracy'][t] - pair['single'][t]['accuracy']):+.2f})"
                               for t in tasks)
            lines.append(f"| multi-task, {run['sharing']} sharing, {run['weighting']} | {cells} | "
                         f"{run['delta_m']:+.2f}% | {weights} | {run['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def write_doc(results: dict) -> None:
    intro = ("## Multi-task fine-tuning (bench/multitask.py)\n\nOne model for two tasks (a head per task) against one "
             "fine-tuned model per task, same recipe and budget. In brackets: points vs the task's single-task model. "
             "delta_m: mean relative change of test accuracy over the tasks (Maninis et al. 2019); negative means "
             "negative transfer. One seed: differences under about 1 pt are within seed noise on these test sets.\n\n")
    replace_section("## Multi-task fine-tuning (bench/multitask.py)", intro + table(results) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--weightings", nargs="+", default=WEIGHTINGS)
    parser.add_argument("--soft", type=int, choices=[0, 1], default=1, help="also run soft sharing (equal weighting)")
    parser.add_argument("--model", default="minilm-l6", help="text model")
    parser.add_argument("--epochs", type=int, default=2, help="text epochs")
    parser.add_argument("--text-examples", type=int, default=2000, help="SST-2 training phrases (default 2000)")
    parser.add_argument("--image-model", default="efficientnet-lite0")
    parser.add_argument("--image-examples", type=int, default=2000, help="training images per task (default 2000)")
    parser.add_argument("--image-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny local models, tiny data")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="rebuild the docs section from the recorded results")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    if not args.doc_only:
        results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.only:
                results[name] = run_pair(args, Path(tmp) / name, name, PAIRS[name])
                results[name]["date"] = results["date"]
                save_results(args.results, results)  # after each pair: a later failure keeps this one
        print(table(results))
    if not args.no_doc:
        write_doc(results)


if __name__ == "__main__":
    main()
