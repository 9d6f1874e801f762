"""The note a run prints when small images would be upsampled a lot to the model's own input size."""

import numpy as np
from PIL import Image

from transferkit.data.dataset import ImagePaths


def test_small_images_upsampled_a_lot_get_a_note_naming_a_cheaper_image_size(tmp_path):
    from types import SimpleNamespace

    from transferkit.config import RunConfig
    from transferkit.data.dataset import ImageArray
    from transferkit.finetune import image_size_note

    lite0 = SimpleNamespace(modality="image", image_size=224)
    config = RunConfig(train="digits", model="efficientnet-lite0")
    note = image_size_note(ImageArray(np.zeros((5, 28, 28), np.uint8)), lite0, config)
    assert "about 28 px" in note and "--image-size 32 needs ~1/49" in note and "(64: ~1/12)" in note
    paths = []
    for i, side in enumerate((150, 180, 200)):
        Image.new("RGB", (side, side // 2)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    assert image_size_note(ImagePaths(paths), lite0, config) is None  # near the model's size: nothing to gain
    assert image_size_note(ImageArray(np.zeros((5, 28, 28), np.uint8)), lite0, config.replace(image_size=224)) is None
