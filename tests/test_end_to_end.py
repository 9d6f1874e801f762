"""One end-to-end run per modality on tiny random backbones loaded from disk through the real
``from_pretrained`` path, plus the packaged MiniLM and EfficientNet-Lite0 on small data."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import transferkit
from transferkit.cli import main

from .conftest import interrupt_then_resume, make_sentences, make_stripes, write_table


def _fit(argv):
    assert main(["fit", *argv]) == 0


def test_text_run_writes_the_run_directory_contract(tiny_bert_dir, text_data, tmp_path):
    run = tmp_path / "run"
    _fit(["--train", str(text_data["train"]), "--val", str(text_data["val"]), "--test", str(text_data["test"]),
          "--model", str(tiny_bert_dir), "--epochs", "2", "--lr", "1e-3", "--baseline-epochs", "3",
          "--out", str(run)])
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1 and 0 <= metrics["test"]["macro_f1"] <= 1
    assert 0 <= metrics["baseline"]["test"]["accuracy"] <= 1
    assert metrics["data"] == {"train_source": str(text_data["train"]), "train": 160, "val": 40, "test": 40,
                               "classes": ["neg", "pos"]}
    assert set(metrics["test"]["per_class"]) == {"neg", "pos"}
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 40
    for name in ("config.yaml", "report.md", "report.html", "log.jsonl", "plots/confusion_matrix.png",
                 "plots/learning_curves.png", "model/model.safetensors", "model/transferkit.json"):
        assert (run / name).is_file(), name
    assert "Before vs after" in (run / "report.md").read_text()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("phase") == "fine-tune (full)" and "val_accuracy" in r for r in log)

    # A fresh process reloads the model and reproduces the run's test accuracy exactly.
    out = subprocess.run([sys.executable, "-m", "transferkit", "evaluate", str(run), "--test", str(text_data["test"])],
                         capture_output=True, text=True, check=True).stdout
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in out
    preds = tmp_path / "preds.csv"
    subprocess.run([sys.executable, "-m", "transferkit", "predict", str(run), "--input", str(text_data["test"]),
                    "--output", str(preds)], capture_output=True, text=True, check=True)
    rows = list(csv.DictReader(open(preds)))
    assert len(rows) == 40 and {r["label"] for r in rows} <= {"neg", "pos"}
    assert all(abs(float(r["p_neg"]) + float(r["p_pos"]) - 1) < 1e-4 for r in rows)

    # The saved config replays the run.
    replay = tmp_path / "replay"
    _fit(["--config", str(run / "config.yaml"), "--out", str(replay), "--no-baseline"])
    assert json.loads((replay / "metrics.json").read_text())["test"]["accuracy"] == metrics["test"]["accuracy"]


def test_image_folder_run_with_a_transformers_vision_backbone(tiny_vit_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    _fit(["--train", str(image_folder), "--model", str(tiny_vit_dir), "--strategy", "freeze-bottom",
          "--freeze-layers", "1", "--epochs", "2", "--lr", "1e-3", "--val-fraction", "0.2", "--test-fraction", "0.2",
          "--batch-size", "8", "--out", str(run)])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["test"] == 12 and metrics["strategy"] == "freeze-bottom"
    assert metrics["trainable_parameters"] < metrics["total_parameters"]
    model = transferkit.load_run(run)
    assert set(model.predict(model.read(image_folder).inputs)) <= {"horizontal", "vertical"}


def test_interrupted_run_resumes_to_the_same_result(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    common = dict(train=str(text_data["train"]), val=str(text_data["val"]), test=str(text_data["test"]),
                  model=str(tiny_bert_dir), epochs=3, lr=1e-3, baseline_epochs=2, patience=None)
    reference = transferkit.finetune(**common, out=str(tmp_path / "reference"))

    resumed = interrupt_then_resume(monkeypatch, lambda out: transferkit.finetune(**common, out=str(out)),
                                    tmp_path / "resumed")
    assert resumed["test"] == reference["test"]
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in reference["history"]]


def test_a_run_with_a_weight_average_keeps_and_saves_the_average(tiny_bert_dir, text_data, tmp_path):
    from safetensors.torch import load_file

    common = dict(train=str(text_data["train"]), val=str(text_data["val"]), test=str(text_data["test"]),
                  model=str(tiny_bert_dir), epochs=2, lr=1e-3, baseline=False, patience=None)
    plain = transferkit.finetune(**common, out=str(tmp_path / "plain"))
    averaged = transferkit.finetune(**common, ema_decay=0.9, out=str(tmp_path / "ema"))
    assert [h["val_loss"] for h in averaged["history"]] != [h["val_loss"] for h in plain["history"]]
    # The saved model is the one validated and tested: reloaded, it scores the reported test accuracy.
    reloaded = transferkit.load_run(tmp_path / "ema")
    assert reloaded.evaluate(reloaded.read(str(text_data["test"])))["accuracy"] == averaged["test"]["accuracy"]
    a, b = load_file(tmp_path / "plain" / "model" / "model.safetensors"), load_file(tmp_path / "ema" / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_packaged_minilm_linear_probe_learns_sentiment(tmp_path):
    rows = make_sentences(200, seed=5)
    train = write_table(tmp_path / "train.tsv", rows[:120], sep="\t")
    test = write_table(tmp_path / "test.tsv", rows[120:], sep="\t")
    metrics = transferkit.finetune(model="minilm-l6", train=str(train), test=str(test), strategy="linear-probe",
                                   epochs=30, lr=1e-2, val_fraction=0.25, out=str(tmp_path / "run"))
    # Frozen all-MiniLM-L6-v2 features separate 'great/awful'-style sentences almost perfectly.
    assert metrics["test"]["accuracy"] >= 0.9
    assert metrics["trainable_parameters"] == 384 * 2 + 2


def test_packaged_efficientnet_lite0_fine_tunes_on_idx_images(tmp_path):
    import gzip
    import struct

    # 120 training images, 8 epochs run to the end: full fine-tuning of a BatchNorm network on a few dozen tiny
    # batches swings from epoch to epoch (BatchNorm statistics of 8-image batches), and with 48 images and early
    # stopping the outcome changed with the seed and the CPU's kernels. Here every seed 0-3 reached >= 0.94.
    images, labels = make_stripes(240, size=28, seed=2)
    grey = images.mean(-1).astype("uint8")
    for prefix, sl in (("train", slice(0, 160)), ("t10k", slice(160, 240))):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">BBBBIII", 0, 0, 8, 3, *grey[sl].shape) + grey[sl].tobytes())
        ids = bytes(int(label == "vertical") for label in labels[sl])
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">BBBBI", 0, 0, 8, 1, len(ids)) + ids)
    torch.manual_seed(0)
    metrics = transferkit.finetune(model="efficientnet-lite0", train=str(tmp_path / "train-images-idx3-ubyte.gz"),
                                   test=str(tmp_path / "t10k-images-idx3-ubyte.gz"), image_size=32, epochs=8,
                                   batch_size=16, patience=None, val_fraction=0.25, out=str(tmp_path / "run"))
    assert metrics["test"]["accuracy"] >= 0.9 and metrics["baseline"]["test"]["accuracy"] >= 0.75
    reloaded = transferkit.load_run(tmp_path / "run")
    test = reloaded.read(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert reloaded.evaluate(test)["accuracy"] == metrics["test"]["accuracy"]


@pytest.mark.parametrize("options", [
    ["--strategy", "gradual-unfreeze", "--l2-sp", "0.01", "--schedule", "one-cycle"],
    ["--strategy", "discriminative-lr", "--lr-decay", "0.7", "--optimizer", "sgd", "--label-smoothing", "0.1"],
    ["--strategy", "bitfit", "--l1", "1e-5", "--schedule", "exponential"],
])
def test_catalogue_strategies_run_end_to_end(options, tiny_bert_dir, text_data, tmp_path):
    run = tmp_path / "run"
    _fit(["--train", str(text_data["train"]), "--test", str(text_data["test"]), "--model", str(tiny_bert_dir),
          "--epochs", "3", "--lr", "1e-3", "--no-baseline", "--out", str(run), *options])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == options[1] and len(metrics["history"]) == 3
    assert all(np.isfinite(h["train_loss"]) for h in metrics["history"])


def test_predict_on_a_flat_folder_of_unlabelled_images(tiny_vit_dir, image_folder, tmp_path):
    import shutil

    run = tmp_path / "run"
    _fit(["--train", str(image_folder), "--model", str(tiny_vit_dir), "--epochs", "1", "--no-baseline",
          "--val-fraction", "0.2", "--test-fraction", "0.2", "--out", str(run)])
    flat = tmp_path / "incoming"
    flat.mkdir()
    for p in sorted(image_folder.rglob("*.png"))[:5]:
        shutil.copy(p, flat / f"{p.parent.name}-{p.name}")
    assert main(["predict", str(run), "--input", str(flat), "--output", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 5 and rows[0]["input"].endswith(".png")
    # One image file is one prediction, the same as in the folder.
    first = sorted(flat.iterdir())[0]
    assert main(["predict", str(run), "--input", str(first), "--output", str(tmp_path / "one.csv")]) == 0
    one = list(csv.DictReader(open(tmp_path / "one.csv")))
    assert len(one) == 1 and one[0]["label"] == rows[0]["label"] and one[0]["input"] == rows[0]["input"]


def test_evaluate_and_predict_read_the_columns_the_run_trained_on(tiny_bert_dir, tmp_path):
    """A run trained on `review`/`target` reads those columns of a later file by default, even when the file also
    has a `text` column (the first guess without the run's columns, which would be silently wrong here)."""
    import pandas as pd

    from transferkit.data.readers import table_columns

    rows = make_sentences(120, seed=4)
    frame = pd.DataFrame({"id": range(len(rows)), "review": [r[0] for r in rows], "target": [r[1] for r in rows]})
    frame[:80].to_csv(tmp_path / "train.csv", index=False)
    later = frame[80:].assign(text="good good good")  # a decoy column
    later.to_parquet(tmp_path / "later.parquet")
    later.drop(columns="target").to_json(tmp_path / "unlabelled.jsonl", orient="records", lines=True)
    assert table_columns(tmp_path / "later.parquet") == ["id", "review", "target", "text"]
    assert table_columns(tmp_path / "unlabelled.jsonl") == ["id", "review", "text"]
    run = tmp_path / "run"
    _fit(["--train", str(tmp_path / "train.csv"), "--text-column", "review", "--label-column", "target",
          "--model", str(tiny_bert_dir), "--epochs", "1", "--no-baseline", "--out", str(run)])

    model = transferkit.load_run(run)
    examples = model.read(tmp_path / "later.parquet")
    assert examples.inputs == list(later["review"]) and examples.labels == list(later["target"])
    assert main(["evaluate", str(run), "--test", str(tmp_path / "later.parquet")]) == 0
    assert main(["predict", str(run), "--input", str(tmp_path / "unlabelled.jsonl"), "--output", str(tmp_path / "p.csv")]) == 0
    assert [r["input"] for r in csv.DictReader(open(tmp_path / "p.csv"))] == list(later["review"])
    # An explicit column still wins.
    assert model.read(tmp_path / "later.parquet", text_column="text").inputs == ["good good good"] * len(later)
