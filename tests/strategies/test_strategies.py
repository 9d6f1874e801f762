import pytest
import torch

from transferkit.backbones import create_backbone
from transferkit.config import RunConfig
from transferkit.errors import UserError
from transferkit.model import Classifier
from transferkit.strategies import STRATEGIES, create_strategy


def _model(directory):
    return Classifier(create_backbone(str(directory)), num_classes=3)


def _strategy(name, **kwargs):
    return create_strategy(RunConfig(train="t.csv", model="m", strategy=name, **kwargs))


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_registry_lists_the_core_strategies():
    assert {"full", "linear-probe", "freeze-bottom"} <= set(STRATEGIES)
    assert all(cls.summary for cls in STRATEGIES.values())


def test_full_trains_everything(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    _strategy("full").apply(model)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_linear_probe_trains_only_the_head(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    strategy = _strategy("linear-probe")
    strategy.apply(model)
    assert _trainable(model) == {"head.linear.weight", "head.linear.bias"}
    assert strategy.uses_feature_cache


def test_freeze_bottom_freezes_embeddings_then_lowest_blocks(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    _strategy("freeze-bottom", freeze_layers=2).apply(model)
    trainable = _trainable(model)
    assert not any("embeddings" in n or "layer.0." in n for n in trainable)
    assert any("layer.1." in n for n in trainable) and "head.linear.weight" in trainable


def test_freeze_bottom_default_is_half_the_groups(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    strategy = _strategy("freeze-bottom")
    assert len(strategy.frozen_groups(model)) == len(model.backbone.layer_groups()) // 2


def test_freeze_bottom_more_layers_than_the_model_has(tiny_bert_dir):
    with pytest.raises(UserError, match="layer groups"):
        _strategy("freeze-bottom", freeze_layers=99).apply(_model(tiny_bert_dir))


def test_unknown_strategy_lists_registered_ones():
    with pytest.raises(UserError, match="unknown strategy .lorra.*bitfit, discriminative-lr, freeze-bottom, full, gradual-unfreeze, ia3, linear-probe, lora"):
        _strategy("lorra")


def test_frozen_batchnorm_stays_in_eval_mode_on_the_packaged_efficientnet():
    model = Classifier(create_backbone("efficientnet-lite0", image_size=32), num_classes=2)
    strategy = _strategy("freeze-bottom", freeze_layers=3)
    strategy.apply(model)
    strategy.set_train_mode(model)
    groups = model.backbone.layer_groups()
    frozen_bn = [m for g in groups[:3] for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    trained_bn = [m for g in groups[3:] for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen_bn and not any(m.training for m in frozen_bn)
    assert trained_bn and all(m.training for m in trained_bn)
    assert model.backbone.feature_dim == 1280


def test_freeze_batchnorm_keeps_every_batchnorm_statistic_while_its_scale_and_shift_train(tiny_bert_dir):
    model = Classifier(create_backbone("efficientnet-lite0", image_size=32), num_classes=2)
    strategy = _strategy("full", freeze_batchnorm=True)
    strategy.apply(model)
    strategy.set_train_mode(model)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    assert all(m.weight.requires_grad for m in batchnorms)
    before = batchnorms[0].running_mean.clone()
    model(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1).sum().backward()
    torch.testing.assert_close(batchnorms[0].running_mean, before)  # statistics untouched by the batch
    assert batchnorms[0].weight.grad is not None
    assert any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))  # dropout still on
    # On a model without BatchNorm the option would do nothing: an error says so.
    from transferkit.strategies.base import check_freeze_batchnorm

    with pytest.raises(UserError, match="has no BatchNorm layers"):
        check_freeze_batchnorm(strategy, _model(tiny_bert_dir), "tiny-bert")


def test_param_groups_exclude_biases_and_norms_from_weight_decay(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    strategy = _strategy("full")
    strategy.apply(model)
    groups = strategy.param_groups(model, lr=1e-4, head_lr=1e-3, weight_decay=0.01)
    for group in groups:
        if group["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in group["params"])
    assert {g["lr"] for g in groups} == {1e-4, 1e-3}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_registry_holds_the_catalogue():
    assert {"bitfit", "discriminative-lr", "gradual-unfreeze"} <= set(STRATEGIES)


def test_bitfit_trains_only_biases_norms_and_the_head(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    _strategy("bitfit").apply(model)
    backbone_trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert backbone_trainable and all(n.endswith(("bias", "LayerNorm.weight")) for n in backbone_trainable)
    assert {"head.linear.weight", "head.linear.bias"} <= _trainable(model)
    assert Strategy_fraction(model) < 0.05


def Strategy_fraction(model):
    return sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) / sum(
        p.numel() for p in model.backbone.parameters())


def test_discriminative_lr_decays_geometrically_from_top_to_bottom(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    strategy = _strategy("discriminative-lr", lr_decay=0.5)
    strategy.apply(model)
    groups = strategy.param_groups(model, lr=1e-3, head_lr=1e-2, weight_decay=0.01)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    bert = model.backbone.encoder
    assert lr_of[id(bert.embeddings.word_embeddings.weight)] == pytest.approx(1e-3 * 0.25)  # 3 groups: emb, L0, L1
    assert lr_of[id(bert.encoder.layer[0].attention.self.query.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(bert.encoder.layer[1].output.dense.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.head.linear.weight)] == pytest.approx(1e-2)
    assert len(lr_of) == sum(1 for _ in model.parameters())


def test_discriminative_lr_combines_with_freezing(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    strategy = _strategy("discriminative-lr", freeze_layers=1)
    strategy.apply(model)
    assert not any("embeddings" in n for n in _trainable(model))
    with pytest.raises(UserError, match="layer groups"):
        _strategy("discriminative-lr", freeze_layers=3).apply(_model(tiny_bert_dir))


def test_gradual_unfreeze_adds_one_group_from_the_top_per_stage(tiny_bert_dir):
    model = _model(tiny_bert_dir)
    strategy = _strategy("gradual-unfreeze")
    strategy.on_epoch_start(model, 0)
    assert _trainable(model) == {"head.linear.weight", "head.linear.bias"}
    strategy.on_epoch_start(model, 1)
    assert any("layer.1." in n for n in _trainable(model)) and not any("layer.0." in n for n in _trainable(model))
    strategy.on_epoch_start(model, 3)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    groups = strategy.param_groups(model, lr=1e-3, head_lr=None, weight_decay=0.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())  # optimiser holds all from the start


def test_gradual_unfreeze_respects_its_stage_length(tiny_bert_dir):
    strategy = _strategy("gradual-unfreeze", unfreeze_every=2)
    assert [strategy.unfrozen_count(e) for e in range(5)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "full", "lr_decay": 0.8}, "discriminative-lr only"),
    ({"strategy": "discriminative-lr", "lr_decay": 1.5}, "(0, 1]"),
    ({"strategy": "gradual-unfreeze", "unfreeze_every": 0}, ">= 1 epoch"),
    ({"strategy": "full", "unfreeze_every": 2}, "gradual-unfreeze only"),
    ({"strategy": "linear-probe", "l2_sp": 0.01}, "linear-probe freezes the backbone"),
    ({"strategy": "full", "l2_sp": -1.0}, "positive strength"),
])
def test_invalid_strategy_options_name_the_valid_choice(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
        RunConfig(train="t.csv", model="m", **overrides)
