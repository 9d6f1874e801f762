"""freeze-bottom's frozen layers, computed once and replayed: the same outputs and training as running them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transferkit
from transferkit.backbones.registry import create_backbone
from transferkit.data.dataset import ImageArray
from transferkit.engine.prefix_cache import PREFIX_INPUT, FrozenPrefix
from transferkit.model import Classifier
from transferkit.strategies.freeze_bottom import FreezeBottom

from ..conftest import interrupt_then_resume, make_sentences


def _frozen_classifier(backbone, frozen: int) -> tuple[Classifier, FreezeBottom]:
    torch.manual_seed(0)
    model = Classifier(backbone, 2)
    strategy = FreezeBottom(frozen)
    strategy.apply(model)
    return model, strategy


def _replayed_and_plain(model, prefix, backbone, prepared, indices):
    inputs = backbone.collate(prepared, indices)
    model.eval()
    with torch.no_grad():
        plain = model(**inputs)
        replayed = model(**{**inputs, PREFIX_INPUT: prefix.batch(indices, inputs)})
    return plain, replayed


def test_replayed_text_prefix_gives_the_forward_pass_outputs_and_is_really_used(tiny_bert_dir):
    backbone = create_backbone(str(tiny_bert_dir), image_size=None, max_length=None, pooling="mean")
    model, strategy = _frozen_classifier(backbone, 2)  # embeddings and the first of two blocks
    prepared = backbone.prepare([text for text, _ in make_sentences(12)] + ["good", "the movie was really quite a bad film"])
    prefix = FrozenPrefix(backbone, len(strategy.frozen_groups(model)))
    assert prefix.usable and len(prefix.skipped) == 1
    assert prefix.compute(prepared, backbone.collate, 4, backbone.lengths(prepared), torch.device("cpu"), progress=None) is None
    # Rows of different lengths share a batch, so the replay must pad them like the batch.
    indices = [12, 13, 0, 5]
    plain, replayed = _replayed_and_plain(model, prefix, backbone, prepared, indices)
    torch.testing.assert_close(replayed, plain, rtol=1e-5, atol=1e-5)
    assert prefix.replay_matches(model, prepared, backbone.collate)
    # The cache, not the frozen block, feeds the top: spoil it and the outputs change.
    prefix.rows = [row * 0 for row in prefix.rows]
    _, spoiled = _replayed_and_plain(model, prefix, backbone, prepared, indices)
    assert not torch.allclose(spoiled, plain, atol=1e-3)
    # Gradients reach the trainable block and the head through the replay, never the frozen ones.
    model.train()
    inputs = backbone.collate(prepared, indices)
    model(**{**inputs, PREFIX_INPUT: prefix.batch(indices, inputs)}).sum().backward()
    frozen = [p for g in strategy.frozen_groups(model) for p in g.parameters()]
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.head.parameters())
    prefix.remove()
    again = model(**backbone.collate(prepared, indices))  # no hooks left: the ordinary forward pass
    assert again.shape == (4, 2)


def test_replayed_image_prefix_gives_the_forward_pass_outputs():
    backbone = create_backbone("efficientnet-lite0", image_size=32, max_length=None, pooling="mean")
    model, strategy = _frozen_classifier(backbone, 9)  # stem and eight of sixteen blocks
    rng = np.random.default_rng(0)
    prepared = ImageArray(rng.integers(0, 255, size=(10, 32, 32, 3), dtype=np.uint8))
    prefix = FrozenPrefix(backbone, len(strategy.frozen_groups(model)))
    assert len(prefix.skipped) == 8
    assert prefix.compute(prepared, backbone.collate, 4, None, torch.device("cpu"), progress=None) is None
    assert isinstance(prefix.rows, torch.Tensor) and len(prefix.rows) == 10
    plain, replayed = _replayed_and_plain(model, prefix, backbone, prepared, [3, 1, 7])
    torch.testing.assert_close(replayed, plain, rtol=1e-4, atol=1e-4)


def test_freeze_bottom_run_with_the_cache_trains_like_one_without(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    common = dict(model=str(tiny_bert_dir), train=str(text_data["train"]), val=str(text_data["val"]),
                  test=str(text_data["test"]), strategy="freeze-bottom", freeze_layers=2, epochs=2, batch_size=16,
                  lr=1e-3, patience=None, baseline=False)
    cached = transferkit.finetune(**common, out=str(tmp_path / "cached"))
    plain = transferkit.finetune(**common, cache_frozen=False, out=str(tmp_path / "plain"))
    assert cached["frozen_prefix_cache"]["used"] and cached["frozen_prefix_cache"]["skipped_blocks"] == 1
    assert plain["frozen_prefix_cache"] == {"used": False, "reason": "turned off (cache_frozen: false)"}
    for a, b in zip(cached["history"], plain["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert cached["test"]["accuracy"] == plain["test"]["accuracy"]
    # Interrupted after its first epoch and resumed, the cached run computes its cache again and ends the same.
    resumed = interrupt_then_resume(monkeypatch, lambda out: transferkit.finetune(**common, out=str(out)),
                                    tmp_path / "resumed")
    assert resumed["frozen_prefix_cache"]["used"]
    assert resumed["history"][-1]["val_loss"] == pytest.approx(cached["history"][-1]["val_loss"], rel=1e-4)
    assert resumed["test"]["accuracy"] == cached["test"]["accuracy"]


def test_augmented_or_embeddings_only_runs_train_uncached_and_say_why(tiny_bert_dir, text_data, tmp_path):
    common = dict(model=str(tiny_bert_dir), train=str(text_data["train"]), val=str(text_data["val"]),
                  strategy="freeze-bottom", epochs=1, batch_size=16, baseline=False)
    masked = transferkit.finetune(**common, freeze_layers=2, token_mask=0.1, out=str(tmp_path / "masked"))
    assert not masked["frozen_prefix_cache"]["used"]
    assert "augmented" in masked["frozen_prefix_cache"]["reason"]
    embeddings = transferkit.finetune(**common, freeze_layers=1, out=str(tmp_path / "embeddings"))
    assert "no frozen block" in embeddings["frozen_prefix_cache"]["reason"]
    full = transferkit.finetune(**{**common, "strategy": "full"}, out=str(tmp_path / "full"))
    assert "frozen_prefix_cache" not in full


def test_replayed_prefix_of_a_transformers_vision_model(tiny_vit_dir):
    backbone = create_backbone(str(tiny_vit_dir), image_size=None, max_length=None, pooling="mean")
    model, strategy = _frozen_classifier(backbone, 2)  # patch embeddings and the first of two blocks
    prepared = ImageArray(np.random.default_rng(1).integers(0, 255, size=(6, 16, 16, 3), dtype=np.uint8))
    prefix = FrozenPrefix(backbone, len(strategy.frozen_groups(model)))
    assert prefix.compute(prepared, backbone.collate, 4, None, torch.device("cpu"), progress=None) is None
    plain, replayed = _replayed_and_plain(model, prefix, backbone, prepared, [5, 0])
    torch.testing.assert_close(replayed, plain, rtol=1e-5, atol=1e-5)
