"""EfficientNet-Lite cut to its K lowest blocks (keep_layers, NAME@layers=K): what it computes, saves and costs."""

from __future__ import annotations

import pytest
import torch

import transferkit
from transferkit.backbones.registry import create_backbone
from transferkit.errors import UserError


def _images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)


def test_a_cut_network_gives_the_pooled_output_of_its_last_kept_block():
    whole = create_backbone("efficientnet-lite0", image_size=32).eval()
    outputs = {}
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
             for i, block in enumerate(whole.network._blocks)]
    x = _images()
    with torch.no_grad():
        whole_features = whole(pixel_values=x)
    for hook in hooks:
        hook.remove()
    cut = create_backbone("efficientnet-lite0", image_size=32)
    cut.keep_bottom_layers(5)
    cut.eval()
    with torch.no_grad():
        features = cut(pixel_values=x)
    assert cut.feature_dim == 40 == features.shape[1]  # Lite0's fifth block ends its third stage: 40 channels
    assert torch.allclose(features, outputs[4].mean(dim=(2, 3)), atol=1e-6)
    assert len(cut.layer_groups()) == 1 + 5  # the stem and five blocks; the head convolution went with the cut
    assert cut.imagenet_head is None and cut.spec["keep_layers"] == 5
    # One pass of the whole network gives the features of every cut side by side, its own first.
    with torch.no_grad():
        side_by_side = whole.features_by_depth(pixel_values=x, depths=[16, 5, 3])
    own, five, three = torch.split(side_by_side, whole.depth_widths([16, 5, 3]), dim=1)
    assert torch.equal(own, whole_features) and torch.allclose(five, features, atol=1e-6)
    assert torch.allclose(three, outputs[2].mean(dim=(2, 3)), atol=1e-6) and three.shape[1] == 24
    # Keeping every block changes nothing.
    every = create_backbone("efficientnet-lite0", image_size=32)
    every.keep_bottom_layers(len(whole.network._blocks))
    with torch.no_grad():
        assert torch.equal(every.eval()(pixel_values=x), whole_features)
    with pytest.raises(UserError, match="has 16 blocks: choose 1 to 16"):
        create_backbone("efficientnet-lite0", image_size=32).keep_bottom_layers(17)


def test_a_cut_efficientnet_fine_tunes_saves_and_reloads_that_deep(tmp_path):
    from PIL import Image

    from .conftest import make_stripes

    images, labels = make_stripes(96, size=28, seed=3)
    for split, part in (("train", slice(0, 64)), ("test", slice(64, 96))):
        for i in range(part.start, part.stop):
            folder = tmp_path / split / labels[i]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    torch.manual_seed(0)
    # freeze-bottom over the cut network: the frozen stem and first block are computed once (prefix cache).
    metrics = transferkit.finetune(model="efficientnet-lite0", keep_layers=3, strategy="freeze-bottom", freeze_layers=2,
                                   train=str(tmp_path / "train"), test=str(tmp_path / "test"), image_size=32, epochs=2,
                                   batch_size=16, val_fraction=0.25, patience=None, baseline=False,
                                   out=str(tmp_path / "run"))
    reloaded = transferkit.load_run(tmp_path / "run")
    assert reloaded.model.backbone.feature_dim == 24 and len(reloaded.model.backbone.network._blocks) == 3
    assert reloaded.evaluate(reloaded.read(tmp_path / "test"))["accuracy"] == metrics["test"]["accuracy"]


def test_rank_prices_and_scores_a_cut_efficientnet_beside_the_whole_one(tmp_path):
    from .conftest import make_stripes
    from PIL import Image

    images, labels = make_stripes(40, size=28, seed=4)
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "data" / label / f"{i}.png")
    result = transferkit.rank(["efficientnet-lite0", "efficientnet-lite0@layers=8"], train=str(tmp_path / "data"),
                              sample=40, image_size=32, out=str(tmp_path / "rank"))
    rows = {row["model"]: row for row in result["candidates"]}
    whole, cut = rows["efficientnet-lite0"], rows["efficientnet-lite0@layers=8"]
    assert cut["feature_dim"] == 80 and whole["feature_dim"] == 1280
    assert cut["cost"]["total_parameters"] < whole["cost"]["total_parameters"] / 10
    assert cut["cost"]["flops_per_example"] < whole["cost"]["flops_per_example"]
    # The ImageNet classifier reads the whole network's features: LEEP applies to it, not to the cut one.
    assert whole["scores"]["leep"] is not None and cut["scores"]["leep"] is None
    # The cut candidate's features came from the whole network's pass, and score as its own pass does.
    assert cut["features_from"].startswith("one pass")
    alone = transferkit.rank(["efficientnet-lite0@layers=8"], train=str(tmp_path / "data"), sample=40, image_size=32,
                             out=str(tmp_path / "alone"))["candidates"][0]
    assert "features_from" not in alone
    for estimator, score in alone["scores"].items():
        assert score is None or cut["scores"][estimator] == pytest.approx(score, rel=1e-3, abs=1e-4)
