import json

import numpy as np
import pytest
import torch

import transferkit
from transferkit.config import RunConfig
from transferkit.data.augmentation import BatchAugmenter, mask_tokens, small_affine
from transferkit.engine.batches import Batches, feature_collate
from transferkit.errors import UserError
from transferkit.objectives import CrossEntropyObjective, MixupObjective, balanced_class_weights, class_log_prior

from .conftest import make_sentences, write_table


def test_balanced_class_weights_are_inverse_frequencies():
    weights = balanced_class_weights(np.array([0] * 90 + [1] * 10), 2)
    assert weights.tolist() == pytest.approx([100 / 180, 100 / 20])


def test_oversampling_evens_out_the_classes_deterministically():
    labels = np.array([0] * 950 + [1] * 50)
    batches = Batches(torch.zeros(1000, 1), labels, feature_collate, 50, shuffle=True, seed=0, oversample=True)
    drawn = labels[batches.order(0)]
    assert len(drawn) == 1000 and 0.4 < drawn.mean() < 0.6
    assert np.array_equal(batches.order(3), batches.order(3))


def test_token_masking_spares_padding_and_special_tokens():
    torch.manual_seed(0)
    ids = torch.tensor([[101, 5, 6, 7, 102, 0, 0]] * 200)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]] * 200)
    masked = mask_tokens(ids, mask, 0.5, mask_id=103, keep_ids={101, 102, 0})
    assert (masked[:, [0, 4, 5, 6]] == ids[:, [0, 4, 5, 6]]).all()
    rate = (masked[:, 1:4] == 103).float().mean().item()
    assert 0.4 < rate < 0.6


def test_image_augmentations_keep_shape_and_change_pixels():
    torch.manual_seed(0)
    pixels = torch.rand(8, 3, 16, 16)
    out = BatchAugmenter(flip=True, crop=True, affine=True, noise=0.1)({"inputs": {"pixel_values": pixels}})
    assert out["inputs"]["pixel_values"].shape == pixels.shape
    assert not torch.allclose(out["inputs"]["pixel_values"], pixels)
    identity = small_affine(pixels, degrees=0.0, scale=0.0, shift=0.0)
    assert torch.allclose(identity, pixels, atol=1e-5)


def test_mixup_loss_mixes_two_label_sets():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2)
    model = type("M", (), {"head": head})()
    batch = {"inputs": {"features": torch.randn(16, 4)}, "labels": torch.randint(0, 2, (16,))}
    loss, logits = MixupObjective(alpha=0.4)(model, batch)
    assert logits.shape == (16, 2) and torch.isfinite(loss)


def test_the_logit_adjusted_loss_is_cross_entropy_on_the_logits_plus_the_scaled_log_prior():
    labels = [0, 0, 0, 1]  # class 2 never seen: counted as one example, a finite offset
    offset = class_log_prior(labels, 3, scale=2.0)
    assert torch.allclose(offset, 2.0 * torch.log(torch.tensor([3 / 4, 1 / 4, 1 / 4])))
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    batch = {"inputs": {"x": torch.randn(8, 4)}, "labels": torch.tensor([0, 0, 0, 1, 0, 0, 1, 0])}
    model = lambda x: head(x)  # noqa: E731
    loss, logits = CrossEntropyObjective(logit_offset=offset, label_smoothing=0.1)(model, batch)
    assert torch.equal(logits, head(batch["inputs"]["x"]))  # the model's own logits: metrics and predictions
    expected = torch.nn.functional.cross_entropy(logits + offset, batch["labels"], label_smoothing=0.1)
    assert torch.isclose(loss, expected) and torch.isfinite(loss)
    mixed = MixupObjective(alpha=0.4, logit_offset=offset)._loss(logits, batch["labels"])
    assert torch.isclose(mixed, torch.nn.functional.cross_entropy(logits + offset, batch["labels"]))


def test_the_logit_adjusted_loss_barely_pushes_down_a_class_the_data_lacks():
    """The point of it under label skew: plain cross-entropy on data without class 2 drives class 2's logit
    down at every step; with the prior added, that class is already explained and its gradient is tiny."""
    labels = torch.zeros(32, dtype=torch.long)
    labels[:8] = 1
    offset = class_log_prior(labels, 3)

    def absent_class_gradient(objective):
        logits = torch.zeros(32, 3, requires_grad=True)
        loss, _ = objective(lambda: logits, {"inputs": {}, "labels": labels})
        loss.backward()
        return logits.grad[:, 2].sum().item()  # > 0: descent lowers class 2's logit

    plain, adjusted = absent_class_gradient(CrossEntropyObjective()), absent_class_gradient(
        CrossEntropyObjective(logit_offset=offset))
    assert plain > 0.3 and 0 < adjusted < plain / 10


@pytest.mark.parametrize("overrides, message", [
    ({"logit_adjustment": 0.0}, "must be a positive number"),
    ({"logit_adjustment": 1.0, "class_weights": "balanced"}, "both correct for class imbalance"),
    ({"logit_adjustment": 1.0, "sampler": "oversample"}, "set sampler to 'shuffle'"),
    ({"logit_adjustment": 1.0, "target": "t.csv"}, "domain adaptation"),
    ({"image_augment": "flip,rotate"}, r"\['rotate'\]"),
    ({"token_mask": 1.5}, r"\(0, 1\)"),
    ({"mixup": 0.0}, "Beta alpha"),
    ({"sampler": "weighted"}, "shuffle, oversample"),
    ({"strategy": "linear-probe", "image_augment": "flip"}, "computed once"),
])
def test_invalid_augmentation_options(overrides, message):
    with pytest.raises(UserError, match=message):
        RunConfig(train="t.csv", model="m", **overrides)


def test_image_augmentation_on_text_data_is_refused(tiny_bert_dir, text_data, tmp_path):
    with pytest.raises(UserError, match="apply to images"):
        transferkit.finetune(train=str(text_data["train"]), model=str(tiny_bert_dir), image_augment="flip",
                             out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_imbalanced_data_gets_a_warning_and_class_weights_silence_it(tiny_bert_dir, tmp_path, capsys):
    rows = make_sentences(240, seed=9)
    skewed = [r for r in rows if r[1] == "pos"] + [r for r in rows if r[1] == "neg"][:15]
    write_table(tmp_path / "train.csv", skewed)
    common = dict(train=str(tmp_path / "train.csv"), model=str(tiny_bert_dir), epochs=1, baseline=False,
                  val_fraction=0.2, test_fraction=0.2)
    transferkit.finetune(**common, out=str(tmp_path / "a"))
    captured = capsys.readouterr()
    assert "training examples per class: neg " in captured.out and "imbalanced" in captured.err
    transferkit.finetune(**common, class_weights="balanced", sampler="oversample", token_mask=0.1, mixup=0.2,
                         out=str(tmp_path / "b"))
    assert "imbalanced" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["history"][0]["train_loss"] > 0
    transferkit.finetune(**common, logit_adjustment=1.0, out=str(tmp_path / "c"))
    assert "imbalanced" not in capsys.readouterr().err
    assert "logit_adjustment: 1.0" in (tmp_path / "c" / "config.yaml").read_text()  # replayed with the run


def test_image_run_with_augmentation_and_oversampling(tiny_vit_dir, image_folder, tmp_path):
    metrics = transferkit.finetune(train=str(image_folder), model=str(tiny_vit_dir), epochs=1, batch_size=8,
                                   image_augment="flip,crop,affine", noise=0.05, mixup=0.2, sampler="oversample",
                                   val_fraction=0.2, test_fraction=0.2, baseline=False, out=str(tmp_path / "run"))
    assert np.isfinite(metrics["history"][0]["train_loss"])
