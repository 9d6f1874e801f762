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


def test_a_batch_with_no_masked_token_has_zero_loss_not_nan():
    from transformers import BertConfig, BertForMaskedLM

    from transferkit.objectives.masked_lm import MaskedLMObjective

    model = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    batch = {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "labels": torch.full_like(ids, IGNORE)}
    loss, _ = MaskedLMObjective()(model, batch)
    assert loss.item() == 0.0
    loss.backward()  # still a graph
    labels = torch.full_like(ids, IGNORE)
    labels[0, 1] = 5
    loss, logits = MaskedLMObjective()(model, {**batch, "labels": labels})
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits[0, 1:2], torch.tensor([5])))


def test_pretrain_lowers_the_validation_loss_and_writes_an_encoder_fit_accepts(tiny_bert_dir, tmp_path, capsys):
    texts = tmp_path / "domain.txt"
    sentences = [t for t, _ in make_sentences(400, seed=2)]
    texts.write_text("\n".join(sentences[:200]) + "\n\n" + "\n".join(sentences[200:]) + "\n")
    out = tmp_path / "adapted"
    assert main(["pretrain", "--model", str(tiny_bert_dir), "--text-data", str(texts), "--out", str(out),
                 "--epochs", "3", "--lr", "1e-3", "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "a new masked-LM head" in printed and "warmed up alone" in printed and "1 empty lines skipped" in printed
    record = json.loads((out / "pretrain.json").read_text())
    assert record["val_loss_after"] < record["val_loss_before"] and record["texts"] == 400
    assert record["val_loss_after"] < record["head_warmup"]["val_loss_after"] < record["val_loss_before"]
    assert record["train"] + record["val"] == 400
    assert (out / "model.safetensors").is_file() and not (out / "checkpoints").exists()
    table = tmp_path / "train.csv"
    table.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in make_sentences(60)) + "\n")
    assert main(["fit", "--train", str(table), "--model", str(out), "--epochs", "1", "--no-baseline",
                 "--out", str(tmp_path / "run")]) == 0


def test_head_warmup_trains_the_new_head_alone_then_everything(tiny_bert_dir, tmp_path, monkeypatch):
    from transferkit.engine.loop import Engine
    from transferkit.pretrain import pretrain

    texts = tmp_path / "domain.txt"
    texts.write_text("\n".join(t for t, _ in make_sentences(120, seed=3)) + "\n")
    changed = {}
    original_fit = Engine.fit

    def fit_and_record(self, resume=False):
        encoder = self.model.base_model
        before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
        head_before = {n: p.detach().clone() for n, p in self.model.named_parameters() if not n.startswith("bert.")}
        history = original_fit(self, resume)
        changed[self.description] = (
            any(not torch.equal(before[n], p) for n, p in encoder.named_parameters()),
            any(not torch.equal(head_before[n], p) for n, p in self.model.named_parameters() if n in head_before))
        return history

    monkeypatch.setattr(Engine, "fit", fit_and_record)
    result = pretrain(str(tiny_bert_dir), str(texts), str(tmp_path / "out"), epochs=1, lr=1e-3, batch_size=16)
    assert result["new_mlm_head"] and result["head_warmup"]["epochs"] == 1
    assert changed["masked-LM head warm-up (encoder frozen)"] == (False, True)  # the encoder did not move
    assert changed["masked-LM pre-training"] == (True, True)

    changed.clear()
    pretrain(str(tiny_bert_dir), str(texts), str(tmp_path / "none"), epochs=1, lr=1e-3, batch_size=16, head_warmup_epochs=0)
    assert list(changed) == ["masked-LM pre-training"]


def test_pretrain_errors(tiny_bert_dir, tiny_vit_dir, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("one text\nanother text\nthird\n")
    cases = [
        (["--model", "efficientnet-lite0", "--text-data", str(texts)], "is not a transformers text model"),
        (["--model", str(tiny_vit_dir), "--text-data", str(texts)], "image model"),
        (["--model", str(tiny_bert_dir), "--text-data", str(tmp_path / "none.txt")], "does not exist"),
        (["--model", str(tiny_bert_dir), "--text-data", str(texts), "--mask-probability", "0"], "mask-probability"),
        (["--model", str(tiny_bert_dir), "--text-data", str(texts), "--head-warmup-epochs", "-1"], "head-warmup-epochs"),
    ]
    for argv, message in cases:
        assert main(["pretrain", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
