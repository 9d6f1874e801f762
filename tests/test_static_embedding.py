"""The packaged static-embedding model: the package's own vectors, fine-tuned, saved, served."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferkit.backbones.registry import create_backbone
from transferkit.cli import main

from .conftest import make_sentences, write_table

pytest.importorskip("static_model")


def test_features_are_the_packages_own_embeddings():
    from static_model import get_embeddings

    backbone = create_backbone("static-64")
    texts = ["A gripping, well-acted film.", "Déjà vu", "", "unlikely-word-zzq the"]
    features = backbone(**backbone.collate(backbone.prepare(texts), range(len(texts)))).detach().numpy()
    assert np.abs(features - np.array(get_embeddings(texts))).max() < 1e-5
    assert features.shape == (4, 64) and not features[2].any()  # an empty text is the zero vector
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == 10_000 * 64  # the vectors train; the token-to-vector mapping and weights do not


def test_fine_tuned_static_model_beats_its_probe_reloads_and_exports(tmp_path, capsys):
    from transferkit.deploy import OnnxPredictor, TorchPredictor, export_onnx

    rows = make_sentences(300, seed=4)
    train, test = write_table(tmp_path / "train.csv", rows[:240]), write_table(tmp_path / "test.csv", rows[240:])
    run = tmp_path / "run"
    assert main(["fit", "--train", str(train), "--test", str(test), "--model", "static-64", "--epochs", "4",
                 "--lr", "5e-2", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9
    texts = [t for t, _ in rows[240:260]] + [""]
    loaded = TorchPredictor.load(run)
    export_onnx(run, tmp_path / "m.onnx")
    onnx = OnnxPredictor(run, tmp_path / "m.onnx")
    assert np.abs(loaded.predict_proba(texts) - onnx.predict_proba(texts)).max() < 1e-5
    long = ["good " * 600]  # more than the 512 tokens a text keeps
    assert loaded.truncated(texts[:2] + long) == onnx.truncated(texts[:2] + long) == [False, False, True]
    assert main(["models"]) == 0 and "static-64" in capsys.readouterr().out


def test_token_masking_drops_words_for_a_model_without_a_mask_token():
    import torch

    from transferkit.config import RunConfig
    from transferkit.finetune import batch_augmenter

    backbone = create_backbone("static-64")
    augment = batch_augmenter(RunConfig.from_dict({"model": "static-64", "train": "x.csv", "token_mask": 0.3}), backbone)
    batch = backbone.collate(backbone.prepare(["a long sentence about a film that was good " * 20] * 8), range(8))
    torch.manual_seed(0)
    masked = augment({"inputs": {k: v.clone() for k, v in batch.items()}})["inputs"]
    assert torch.equal(masked["input_ids"], batch["input_ids"])  # the words stay; some leave the average
    dropped = 1 - masked["attention_mask"].sum().item() / batch["attention_mask"].sum().item()
    assert 0.25 < dropped < 0.35
