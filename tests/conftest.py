"""Shared fixtures: tiny random transformers saved to disk (loaded back through the real
``from_pretrained`` path), and small learnable text and image datasets written as users would."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

POSITIVE = ["good", "great", "excellent", "lovely", "superb", "wonderful", "fine", "happy"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "horrible", "sad", "boring", "worse"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "film", "plot", "acting", "and"]


def make_sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences whose label is decided by a sentiment word, padded with neutral filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_table(path: Path, rows: list[tuple[str, str]], sep: str = ",") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=sep)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and a word-level vocabulary covering the test sentences."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    # transformers 5 takes the vocabulary itself (a vocab_file argument is silently ignored, which would
    # leave every word [UNK] and the texts unlearnable).
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A 2-layer ViT for 16x16 images with random weights and its image-processor config."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    directory = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(directory)
    return directory


@pytest.fixture()
def text_data(tmp_path) -> dict[str, Path]:
    rows = make_sentences(240, seed=1)
    return {"train": write_table(tmp_path / "train.csv", rows[:160]),
            "val": write_table(tmp_path / "val.csv", rows[160:200]),
            "test": write_table(tmp_path / "test.csv", rows[200:])}


def make_stripes(n: int, size: int = 20, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Colour images of horizontal or vertical stripes with noise: an easy, learnable image task."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        base = np.zeros((size, size), dtype=np.float32)
        if i % 2 == 0:
            base[::4] = 1.0
            labels.append("horizontal")
        else:
            base[:, ::4] = 1.0
            labels.append("vertical")
        noisy = np.clip(base[..., None] * 200 + rng.normal(30, 20, (size, size, 3)), 0, 255)
        images.append(noisy.astype(np.uint8))
    return np.stack(images), labels


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "images"
    images, labels = make_stripes(60)
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / label / f"{i:03d}.png")
    return root


def interrupt_then_resume(monkeypatch, run_fit, out: Path) -> dict:
    """Run ``run_fit(out)`` until the first fine-tuning epoch's checkpoint, stop it there as Ctrl-C would,
    then continue it with ``transferkit fit --out OUT --resume``; returns the resumed run's metrics."""
    import json

    from transferkit.cli import main
    from transferkit.engine.loop import Engine

    original_save = Engine._save

    def save_then_die(self, epoch, steps_done, running, seen, improved):
        original_save(self, epoch, steps_done, running, seen, improved)
        if self.description.startswith("fine-tune") and epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_fit(out)
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(Engine, "_save", original_save)
    assert main(["fit", "--out", str(out), "--resume"]) == 0
    return json.loads((out / "metrics.json").read_text())
