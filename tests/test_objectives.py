import pytest
import torch

from transferkit.backbones import create_backbone
from transferkit.engine.schedules import schedule_factor
from transferkit.model import Classifier
from transferkit.objectives import CrossEntropyObjective, L1Penalty, L2SPPenalty, RegularisedObjective


def test_l2_sp_is_zero_at_the_pretrained_weights_and_pulls_back_towards_them(tiny_bert_dir):
    model = Classifier(create_backbone(str(tiny_bert_dir)), 2)
    penalty = L2SPPenalty(model.backbone, alpha=0.1)
    assert penalty(model).item() == 0.0
    weight = model.backbone.encoder.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.add_(0.5)
    value = penalty(model)
    assert value.item() == pytest.approx(0.5 * 0.1 * 0.25 * weight.numel(), rel=1e-4)
    value.backward()
    assert torch.all(weight.grad > 0)  # gradient descent moves the weight back down towards w0


def test_l2_sp_ignores_frozen_parameters(tiny_bert_dir):
    model = Classifier(create_backbone(str(tiny_bert_dir)), 2)
    penalty = L2SPPenalty(model.backbone, alpha=1.0)
    for p in model.backbone.parameters():
        with torch.no_grad():
            p.add_(1.0)
        p.requires_grad_(False)
    assert penalty(model).item() == 0.0


def test_l1_counts_weight_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(-2.0)
        model[0].bias.fill_(5.0)
    assert L1Penalty(0.5)(model).item() == pytest.approx(0.5 * 4 * 2.0)


def test_regularised_objective_adds_penalties():
    model = torch.nn.Linear(3, 2)
    model.backbone = torch.nn.Identity()
    batch = {"inputs": {"input": torch.ones(4, 3)}, "labels": torch.tensor([0, 1, 0, 1])}
    forward = lambda m, b: CrossEntropyObjective()(lambda **kw: m(kw["input"]), b)  # noqa: E731
    base, _ = forward(model, batch)
    total, _ = RegularisedObjective(forward, [lambda m: torch.tensor(1.5)])(model, batch)
    assert total.item() == pytest.approx(base.item() + 1.5)


@pytest.mark.parametrize("kind, start, end", [("linear", 1.0, 0.0), ("cosine", 1.0, 0.0), ("exponential", 1.0, 0.01),
                                              ("constant", 1.0, 1.0)])
def test_schedules_after_warm_up(kind, start, end):
    assert schedule_factor(kind, 0, 100, 10) == pytest.approx(0.1)  # warm-up starts low
    assert schedule_factor(kind, 10, 100, 10) == pytest.approx(start)
    assert schedule_factor(kind, 100, 100, 10) == pytest.approx(end, abs=1e-9)


def test_one_cycle_rises_then_falls():
    factors = [schedule_factor("one-cycle", s, 100, 30) for s in range(101)]
    assert factors[0] == pytest.approx(1 / 25) and max(factors) == pytest.approx(1.0)
    assert factors.index(max(factors)) == 30 and factors[-1] < 1e-3
