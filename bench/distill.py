"""Knowledge distillation: SST-2 (a fine-tuned MiniLM-L6 teaches its own bottom K layers) and Fashion-MNIST
(EfficientNet-Lite2 at 64 px teaches EfficientNet-Lite0 at 32 px).

For each student the same student is fine-tuned twice on the same labelled examples with the same
recipe: alone (labels only) and distilled (labels + the teacher's soft predictions, also on unlabelled
transfer inputs: other training sentences or images, their labels dropped). Text checkpoints are
chosen on 872 full sentences held out from train (bench/core.py's protocol) and `test.tsv` (the GLUE dev
set) is predicted once; image checkpoints on 10% of the training images, the official test set once.
Latency is one prediction call over 64 test inputs (median of 20 after a warm-up).

    python bench/distill.py                      # about 12 min on 2 CPU cores
    python bench/distill.py --tiny --model DIR   # seconds: a smoke run on a tiny local model (tests)
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
RESULTS = ROOT / "bench" / "results" / "distill.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import machine, replace_section, save_results  # noqa: E402
from ensemble import data_files  # noqa: E402


IMAGE_PAIR = {"teacher": {"model": "efficientnet-lite2", "image_size": 64},
              "student": {"model": "efficientnet-lite0", "image_size": 32}}


def text_pair(args, folder: Path) -> dict:
    """MiniLM-L6 (all layers) teaches its own bottom K layers."""
    import transferkit

    import pandas as pd

    files = data_files(folder, args.tiny)
    # The labelled sentences, and (for distillation only) unlabelled in-domain text the teacher labels: other
    # rows of the training file, labels dropped.
    rows = pd.read_csv(files["train"], sep="\t", dtype=str, keep_default_na=False).sample(frac=1.0, random_state=0)
    labelled, transfer = rows.iloc[:args.examples], rows.iloc[args.examples:args.examples + args.transfer]
    labelled.to_csv(folder / "labelled.tsv", sep="\t", index=False)
    transfer[["sentence"]].to_csv(folder / "transfer.tsv", sep="\t", index=False)
    recipe = dict(train=str(folder / "labelled.tsv"), val=files["val"], test=files["test"], text_column="sentence",
                  epochs=args.epochs, patience=None, baseline=False, lr=1e-4)
    result = {"teacher_name": f"{args.model} (all layers)", "examples": len(labelled), "epochs": args.epochs,
              "transfer": len(transfer)}
    args.transfer_file = str(folder / "transfer.tsv") if len(transfer) else None
    started = time.time()
    teacher = transferkit.finetune(model=args.model, out=str(folder / "teacher"), **recipe)
    result["teacher"] = {"test_accuracy": teacher["test"]["accuracy"], "seconds": time.time() - started,
                         "parameters": teacher["total_parameters"]}
    result["students"] = [student(args, folder, f"{keep} layers", dict(model=args.model, keep_layers=keep, **recipe),
                                  result["teacher"], transfer_file=args.transfer_file) for keep in args.keep]
    return result


def write_idx(path: Path, array) -> None:
    """An IDX file (the MNIST format): zero, zero, 0x08 (unsigned bytes), the rank, big-endian dimensions, data."""
    import struct

    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype("uint8").tobytes())


def read_idx_source(image_data: str):
    """(path, images, labels, official test file or None) of 'fashion-mnist' or an IDX images file."""
    from transferkit.data.packaged import FASHION_MNIST_FILES, fashion_mnist_dir
    from transferkit.data.readers import idx_labels_path, parse_idx

    if image_data == "fashion-mnist":
        base = fashion_mnist_dir()
        source, test_source = base / FASHION_MNIST_FILES["train"], base / FASHION_MNIST_FILES["test"]
    else:
        source, test_source = Path(image_data), None
    return source, parse_idx(source), parse_idx(idx_labels_path(source)), test_source


def image_splits(args, folder: Path) -> dict:
    """Labelled, validation and transfer IDX files cut from one seeded permutation of the training images, so
    the transfer images are none of the labelled or validation ones; their labels are written (the IDX reader
    wants the pair) but distillation never reads them. The test split is Fashion-MNIST's official one, or for
    another IDX file a further 20% of it."""
    import numpy as np

    source, images, labels, test_source = read_idx_source(args.image_data)
    order = np.random.default_rng(0).permutation(len(images))
    cuts = {"val": round(0.1 * len(images))}
    if test_source is None:
        cuts["test"] = round(0.2 * len(images))
    cuts["labelled"] = args.image_examples
    cuts["transfer"] = args.image_transfer
    files, start = {}, 0
    for name, count in cuts.items():
        chosen = order[start:start + count]
        start += count
        if name == "transfer" and not len(chosen):
            continue
        files[name] = folder / f"{name}-images-idx3-ubyte"
        write_idx(files[name], images[chosen])
        write_idx(folder / f"{name}-labels-idx1-ubyte", labels[chosen])
    if test_source is not None:
        files["test"] = test_source
    return {name: str(path) for name, path in files.items()}


def image_pair(args, folder: Path) -> dict:
    """EfficientNet-Lite2 at 64 px teaches EfficientNet-Lite0 at 32 px on Fashion-MNIST."""
    import transferkit

    files = image_splits(args, folder)
    data = dict(train=files["labelled"], val=files["val"], test=files["test"], epochs=args.image_epochs, patience=None,
                baseline=False, lr=1e-3, batch_size=64, schedule="cosine")
    teacher_spec, student_spec = IMAGE_PAIR["teacher"], IMAGE_PAIR["student"]
    if args.tiny:
        teacher_spec = student_spec = {"model": args.image_model, "image_size": 16}
    result = {"teacher_name": f"{teacher_spec['model']} at {teacher_spec['image_size']} px",
              "examples": args.image_examples, "epochs": args.image_epochs, "transfer": args.image_transfer if "transfer" in files else 0}
    args.image_transfer_file = files.get("transfer")
    started = time.time()
    teacher = transferkit.finetune(out=str(folder / "image-teacher"), **teacher_spec, **data)
    result["teacher"] = {"test_accuracy": teacher["test"]["accuracy"], "seconds": time.time() - started,
                         "parameters": teacher["total_parameters"]}
    result["students"] = [student(args, folder, f"{student_spec['model']} at {student_spec['image_size']} px",
                                  dict(**student_spec, **data), result["teacher"], teacher_dir=folder / "image-teacher",
                                  transfer_file=args.image_transfer_file)]
    return result


def student(args, folder: Path, name: str, recipe: dict, teacher: dict, teacher_dir: Path | None = None,
            transfer_file: str | None = None) -> dict:
    """The same student fine-tuned alone and distilled (with the transfer inputs, when there are any)."""
    import transferkit

    row = {"student": name}
    for mode in ("alone", "distilled"):
        extra = {"teacher": str(teacher_dir or folder / "teacher"), "distill_alpha": args.alpha,
                 "distill_temperature": args.temperature} if mode == "distilled" else {}
        if mode == "distilled" and transfer_file:
            extra["distill_data"] = transfer_file
        started = time.time()
        metrics = transferkit.finetune(out=str(folder / f"{mode}-{name.replace(' ', '-')}"), **recipe, **extra)
        row[f"{mode}_test_accuracy"] = metrics["test"]["accuracy"]
        row[f"{mode}_seconds"] = time.time() - started
        if mode == "distilled":
            d = metrics["distillation"]
            row.update(parameters=d["student_parameters"], teacher_latency_ms=d["teacher_latency_ms"],
                       student_latency_ms=d["student_latency_ms"], speedup=d["speedup"])
    row["share_of_teacher"] = row["distilled_test_accuracy"] / teacher["test_accuracy"]
    print(f"{name}: alone {row['alone_test_accuracy']:.4f}, distilled {row['distilled_test_accuracy']:.4f} "
          f"({100 * row['share_of_teacher']:.1f}% of the teacher), {row['speedup']:.2f}x faster", flush=True)
    return row


PAIRS = {"text": text_pair, "image": image_pair}


def remeasure_latency(results: dict, args) -> None:
    """Teacher and student latency again, alone on the machine: latency depends on the architecture and the
    input size, not on the trained weights, so untrained copies of the recorded models are timed on the
    same 64 test inputs. (Timings taken while other jobs share the cores are dominated by thread-pool waits.)"""
    from transferkit.backbones.registry import create_backbone
    from transferkit.data.readers import read_examples
    from transferkit.model import Classifier
    from transferkit.saved_model import FineTunedModel
    from transferkit.teacher import median_latency_ms

    def latency(model_name, inputs, **options):
        keep = options.pop("keep_layers", None)
        backbone = create_backbone(model_name, **options)
        if keep:
            backbone.keep_bottom_layers(keep)
        model = FineTunedModel(Classifier(backbone, 2 if isinstance(inputs, list) else 10), ["c"] * 10, Path("."), 128)
        return median_latency_ms(model.predict_logits, inputs, repeats=20)

    if results.get("text"):
        texts = [line.split("\t")[0] for line in (SST2 / "test.tsv").read_text(encoding="utf-8").splitlines()[1:65]]
        teacher_ms = latency(args.model, texts)
        for row in results["text"]["students"]:
            row["teacher_latency_ms"] = teacher_ms
            row["student_latency_ms"] = latency(args.model, texts, keep_layers=row.get("layers") or int(row["student"].split()[0]))
            row["speedup"] = teacher_ms / row["student_latency_ms"]
            row.setdefault("speedups", []).append(row["speedup"])
    if results.get("image"):
        images = read_examples(str(Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))).inputs.subset(range(64))
        teacher_ms = latency(IMAGE_PAIR["teacher"]["model"], images, image_size=IMAGE_PAIR["teacher"]["image_size"])
        for row in results["image"]["students"]:
            row["teacher_latency_ms"] = teacher_ms
            row["student_latency_ms"] = latency(IMAGE_PAIR["student"]["model"], images,
                                                image_size=IMAGE_PAIR["student"]["image_size"])
            row["speedup"] = teacher_ms / row["student_latency_ms"]
            row.setdefault("speedups", []).append(row["speedup"])
    results["latency_note"] = "latency re-measured alone on the machine (bench/distill.py --latency-only)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--model", default="minilm-l6", help="text teacher and student backbone")
    parser.add_argument("--examples", type=int, default=4000, help="training sentences (default 4000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--keep", nargs="+", type=int, default=[2], help="text student depths (layers kept)")
    parser.add_argument("--transfer", type=int, default=12000,
                        help="unlabelled training-file sentences the teacher labels for the distilled text student")
    parser.add_argument("--image-data", default="fashion-mnist")
    parser.add_argument("--image-model", default="efficientnet-lite0", help="tiny runs: the image model for both")
    parser.add_argument("--image-examples", type=int, default=4000, help="training images (default 4000)")
    parser.add_argument("--image-epochs", type=int, default=3)
    parser.add_argument("--image-transfer", type=int, default=30000,
                        help="unlabelled training images (none of the labelled or validation ones) the image teacher labels")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny local models, tiny data")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="rebuild the docs section from the recorded results")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-time the recorded teacher and student architectures alone on the machine")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    if "students" in results:  # the first recorded format held the text pair alone
        results = {"text": results, "machine": results.get("machine"), "date": results.get("date")}
    if args.latency_only:
        remeasure_latency(results, args)
        save_results(args.results, results)
        print(table(results))
    elif not args.doc_only:

        results.update(machine=machine(),
                       date=time.strftime("%Y-%m-%d"), alpha=args.alpha, temperature=args.temperature)
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.only:
                results[name] = PAIRS[name](args, Path(tmp))
                results[name]["date"] = results["date"]
        save_results(args.results, results)
        print(table(results))
    if not args.no_doc:
        write_doc(results)


def table(results: dict) -> str:
    lines = []
    for name in PAIRS:
        pair = results.get(name)
        if not pair:
            continue
        t = pair["teacher"]
        alpha, temperature = pair.get("alpha", results.get("alpha")), pair.get("temperature", results.get("temperature"))
        transfer = f" + {pair['transfer']} unlabelled for distillation" if pair.get("transfer") else ""
        data = (f"SST-2, {pair['examples']} labelled sentences" if name == "text"
                else f"Fashion-MNIST, {pair['examples']} labelled images") + transfer
        lines += [f"### {name}: {pair.get('teacher_name', pair.get('model'))} teaches smaller students ({data}, "
                  f"{pair['epochs']} epochs, alpha {alpha}, T {temperature}; {results['machine']}, {pair.get('date', results['date'])})", "",
                  "| model | parameters | test accuracy | share of teacher | latency (64 test inputs) | speed-up |",
                  "|---|---|---|---|---|---|"]
        if pair["students"]:
            lines.append(f"| teacher: {pair.get('teacher_name', pair.get('model'))} | {t['parameters'] / 1e6:.1f}M | "
                         f"{t['test_accuracy']:.4f} | 100% | {pair['students'][0]['teacher_latency_ms']:.0f} ms | 1.00x |")
        for s in pair["students"]:
            label = s.get("student") or f"{s['layers']} layers"
            for mode in ("alone", "distilled"):
                accuracy = s[f"{mode}_test_accuracy"]
                lines.append(f"| {label}, {'fine-tuned alone' if mode == 'alone' else 'distilled'} | "
                             f"{s['parameters'] / 1e6:.1f}M | {accuracy:.4f} | {100 * accuracy / t['test_accuracy']:.1f}% | "
                             f"{s['student_latency_ms']:.0f} ms | {s['speedup']:.2f}x{spread(s)} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def spread(row: dict) -> str:
    """The range of the speed-up over repeated timings (``--latency-only`` runs), when there are several."""
    speedups = row.get("speedups", [])
    return f" ({min(speedups):.2f}-{max(speedups):.2f}x over {len(speedups)} timings)" if len(speedups) > 1 else ""


def write_doc(results: dict) -> None:
    intro = ("## Distillation (bench/distill.py)\n\nEach student is fine-tuned twice with the same recipe: alone (labels "
             "only) and distilled (labels + the teacher's soft predictions). Text: a fully fine-tuned MiniLM-L6 teaches "
             "students made of its backbone's bottom K pretrained layers (`--keep-layers K`); the distilled student also "
             "learns from the teacher's predictions on unlabelled sentences of the training file (`--distill-data`, "
             "as DistilBERT and AutoGluon's distillation use unlabelled transfer data); checkpoints on 872 "
             "held-out training sentences, `test.tsv` predicted once. Images: EfficientNet-Lite2 at 64 px teaches "
             "EfficientNet-Lite0 at 32 px; one seeded permutation of the 60,000 training images gives 10% for "
             "validation (checkpoints), the labelled images, and the transfer images the teacher labels for the "
             "distilled student (their labels unused); the official test set predicted once. One seed. Latency: one prediction call over 64 test inputs (preprocessing included), "
             "median of 20 calls after a warm-up, each model timed alone on the machine.\n\n")
    replace_section("## Distillation (bench/distill.py)", intro + table(results) + "\n")


if __name__ == "__main__":
    main()
