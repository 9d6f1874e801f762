"""Continued masked-LM pre-training: the masking rule, the objective, the command end to end, its errors."""

from __future__ import annotations

import json

import pytest
import torch

from transferkit.cli import main
from transferkit.objectives.masked_lm import IGNORE, mask_tokens

from .conftest import make_sentences


def test_masking_keeps_the_80_10_10_rule_and_never_touches_padding_or_special_tokens():
    generator = torch.Generator().manual_seed(0)
    n, width, cls, sep, pad, mask = 4000, 40, 2, 3, 0, 4
    ids = torch.randint(10, 1000, (n, width), generator=generator)
    ids[:, 0], ids[:, 30] = cls, sep
    ids[:, 31:] = pad
    attention = (ids != pad).long()
    masked, labels = mask_tokens(ids, attention, mask_id=mask, vocab_size=1000, special_ids={cls, sep, pad},
                                 probability=0.15, generator=generator)
    chosen = labels != IGNORE
    assert not chosen[:, 31:].any() and not chosen[:, 0].any() and not chosen[:, 30].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen.float().sum() / attention[:, 1:30].sum() == pytest.approx(0.15, abs=0.005)
    share_mask = (masked[chosen] == mask).float().mean()
    share_kept = (masked[chosen] == ids[chosen]).float().mean()
    assert share_mask == pytest.approx(0.8, abs=0.01)
    # Kept: the 10% left alone plus the random replacements that drew the same token (~0.1% here).
    assert share_kept == pytest.approx(0.1, abs=0.01)
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_pretrain_lowers_the_validation_loss_and_writes_an_encoder_fit_accepts(tiny_bert_dir, tmp_path, capsys):
    texts = tmp_path / "domain.txt"
    sentences = [t for t, _ in make_sentences(400, seed=2)]
    texts.write_text("\n".join(sentences[:200]) + "\n\n" + "\n".join(sentences[200:]) + "\n")
    out = tmp_path / "adapted"
    assert main(["pretrain", "--model", str(tiny_bert_dir), "--text-data", str(texts), "--out", str(out),
                 "--epochs", "3", "--lr", "1e-3", "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "a new masked-LM head" in printed and "1 empty lines skipped" in printed
    record = json.loads((out / "pretrain.json").read_text())
    assert record["val_loss_after"] < record["val_loss_before"] and record["texts"] == 400
    assert record["train"] + record["val"] == 400
    assert (out / "model.safetensors").is_file() and not (out / "checkpoints").exists()
    table = tmp_path / "train.csv"
    table.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in make_sentences(60)) + "\n")
    assert main(["fit", "--train", str(table), "--model", str(out), "--epochs", "1", "--no-baseline",
                 "--out", str(tmp_path / "run")]) == 0


def test_pretrain_errors(tiny_bert_dir, tiny_vit_dir, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("one text\nanother text\nthird\n")
    cases = [
        (["--model", "efficientnet-lite0", "--text-data", str(texts)], "no token embeddings"),
        (["--model", str(tiny_vit_dir), "--text-data", str(texts)], "image model"),
        (["--model", str(tiny_bert_dir), "--text-data", str(tmp_path / "none.txt")], "does not exist"),
        (["--model", str(tiny_bert_dir), "--text-data", str(texts), "--mask-probability", "0"], "mask-probability"),
    ]
    for argv, message in cases:
        assert main(["pretrain", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
