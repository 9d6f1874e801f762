"""Domain adaptation: the transfer losses' arithmetic, gradient reversal, and `adapt` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from transferkit.cli import main
from transferkit.objectives.domain import (ADAPTATION_METHODS, CDAN, class_confusion, coral_distance,
                                           information_maximisation, multi_kernel_mmd, ramp, reverse_gradient)

from .conftest import FILLER, make_sentences, write_table


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 16, generator=generator), torch.randn(300, 16, generator=generator)
    same = multi_kernel_mmd(a, b).item()
    shifted = [multi_kernel_mmd(a, b + shift).item() for shift in (0.25, 0.5, 1.0, 2.0)]
    # The biased estimator of a sum of 5 kernels is O(5/n) for one distribution: ~0 against a shift.
    assert abs(same) < 0.05
    assert shifted == sorted(shifted) and shifted[0] > 2 * same and shifted[-1] > 50 * same


def test_gradient_reversal_flips_the_sign_with_the_scheduled_coefficient():
    x = torch.randn(5, 3, requires_grad=True)
    coefficient = ramp(0.3)
    (reverse_gradient(x, coefficient) * 2.0).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -2.0 * coefficient))
    assert ramp(0.0) == 0.0 and ramp(1.0) > 0.99 and 0 < ramp(0.1) < ramp(0.5) < ramp(0.9)
    assert torch.equal(reverse_gradient(x, 0.7), x)  # the forward pass is the identity


def test_coral_is_zero_for_matching_covariances_and_positive_otherwise():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=generator)
    assert coral_distance(x, x + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # a shift keeps the covariance
    assert coral_distance(x, x[torch.randperm(200, generator=generator)]).item() == pytest.approx(0.0, abs=1e-6)
    assert coral_distance(x, 2.0 * x).item() > 0.01


def test_class_confusion_is_zero_for_confident_distinct_classes_and_highest_for_uniform_predictions():
    confident = torch.tensor([[20.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, 20.0]]) * 5
    assert class_confusion(confident).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(6, 3)  # every class confused with every other: rows of 1/3, off-diagonal 2/3 per class
    assert class_confusion(uniform).item() == pytest.approx(2 / 3, abs=1e-6)
    # Lowering it makes target predictions more decisive: one gradient step on the logits cuts the loss.
    logits = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    before = class_confusion(logits)
    before.backward()
    assert class_confusion(logits.detach() - 1.0 * logits.grad).item() < before.item()


def test_information_maximisation_rewards_confident_diverse_predictions_and_punishes_collapse():
    import math

    confident_diverse = torch.tensor([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0], [0.0, 0.0, 30.0]])
    assert information_maximisation(confident_diverse).item() == pytest.approx(-math.log(3), abs=1e-6)  # its minimum
    assert information_maximisation(torch.zeros(6, 3)).item() == pytest.approx(0.0, abs=1e-6)  # uniform: H - H = 0
    collapsed = torch.tensor([[30.0, 0.0, 0.0]] * 3)  # confident, but every example on one class
    assert information_maximisation(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # Hand-checked two-class case: p = (0.8, 0.2) and (0.2, 0.8): mean entropy H(0.8) minus H(0.5) = log 2.
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    two = torch.log(torch.tensor([[0.8, 0.2], [0.2, 0.8]]))
    assert information_maximisation(two).item() == pytest.approx(h - math.log(2), abs=1e-6)


def test_deep_embedded_validation_estimates_the_target_risk_from_source_validation():
    """1-D Gaussian domains, where a logistic domain classifier recovers the density ratio exactly. Loss 1 for
    x > 0.5: the source risk is P(N(0,1) > 0.5) = 0.31, the target risk P(N(1,1) > 0.5) = 0.69; DEV, seeing
    only source losses, must find the target's."""
    import numpy as np

    from transferkit.adaptation import deep_embedded_validation

    rng = np.random.default_rng(0)
    train, val = rng.normal(0, 1, (4000, 1)), rng.normal(0, 1, (4000, 1))
    target = rng.normal(1, 1, (4000, 1))
    losses = (val[:, 0] > 0.5).astype(float)
    shifted = deep_embedded_validation(train, target, val, losses)
    assert shifted["source_val_loss"] == pytest.approx(0.31, abs=0.02)
    assert shifted["risk"] == pytest.approx(0.69, abs=0.05)
    assert shifted["effective_examples"] < 4000
    # No shift: every weight is about 1 and the estimate is the plain validation loss.
    same = deep_embedded_validation(train, rng.normal(0, 1, (4000, 1)), val, losses)
    assert same["mean_weight"] == pytest.approx(1.0, abs=0.05) and same["risk"] == pytest.approx(0.31, abs=0.03)


def test_target_bn_lets_batchnorm_statistics_see_the_target_and_adds_no_loss():
    from torch import nn

    from transferkit.objectives.domain import DomainAdaptationObjective, TargetStream

    class TargetBatches:
        def iterate(self, epoch):
            for _ in range(4):
                yield {"inputs": {"input": torch.randn(16, 4) + 5.0}}  # the target sits at 5, the source at 0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.BatchNorm1d(4), nn.Linear(4, 2)

    means = {}
    for method in ("source-only", "target-bn"):
        torch.manual_seed(0)
        net = Net().train()
        objective = DomainAdaptationObjective(ADAPTATION_METHODS[method](4, 2), TargetStream(TargetBatches(), "cpu"), 20)
        batch = {"inputs": {"input": torch.randn(16, 4)}, "labels": torch.zeros(16, dtype=torch.long)}
        plain = torch.nn.functional.cross_entropy(net.head(net.backbone(**batch["inputs"])), batch["labels"])
        net.backbone.reset_running_stats()
        for _ in range(20):
            loss, _ = objective(net, batch)
        means[method] = float(net.backbone.running_mean.mean())
        assert float(loss) == pytest.approx(float(plain), abs=1e-6)  # no transfer term: the source loss alone
    assert abs(means["source-only"]) < 0.5 and means["target-bn"] > 2.0


def test_cdan_uses_a_random_multilinear_map_only_for_wide_inputs():
    assert CDAN(32, 2).exact and not CDAN(1280, 10).exact
    wide = CDAN(1280, 10)
    loss = wide(torch.randn(4, 1280), torch.randn(4, 1280), torch.randn(4, 10), torch.randn(4, 10), 0.5)
    assert loss.ndim == 0 and torch.isfinite(loss)


def _domains(tmp_path):
    """Source: the usual sentences; target: the same sentiment words amid other filler words."""
    source = make_sentences(160, seed=1)
    other_filler = {w: f"zz{i}" for i, w in enumerate(FILLER)}
    target = [(" ".join(other_filler.get(w, w) for w in text.split()), label) for text, label in make_sentences(120, seed=2)]
    return (write_table(tmp_path / "source.csv", source), write_table(tmp_path / "target.csv", target[:80]),
            write_table(tmp_path / "target_test.csv", target[80:]))


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return _domains(tmp_path_factory.mktemp("domains"))


def _common(domains, tiny_bert_dir):
    source, target, target_test = domains
    return ["--source", str(source), "--target", str(target), "--target-test", str(target_test), "--model",
            str(tiny_bert_dir), "--epochs", "2", "--lr", "1e-3", "--no-baseline"]


@pytest.fixture(scope="module")
def source_only_run(domains, tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(["adapt", *_common(domains, tiny_bert_dir), "--method", "source-only", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("method", ["dan", "dann", "coral", "cdan", "mcc", "im"])
def test_adapt_runs_each_method_and_reports_the_target(method, domains, source_only_run, tiny_bert_dir, tmp_path, capsys):
    assert main(["adapt", *_common(domains, tiny_bert_dir), "--method", method, "--out", str(tmp_path / method)]) == 0
    assert "A-distance" in capsys.readouterr().out
    metrics = json.loads((tmp_path / method / "metrics.json").read_text())
    report = metrics["adaptation"]
    assert report["method"] == method and report["target_examples"] == 80
    assert 0 <= report["target_test"]["accuracy"] <= 1 and report["target_test"]["examples"] == 40
    assert -2 <= report["a_distance_before"] <= 2 and -2 <= report["a_distance_after"] <= 2
    dev = report["dev"]  # the target risk estimated from source validation losses (finite: NaN would compare unequal)
    assert dev["risk"] == dev["risk"] and dev["mean_weight"] > 0 and 0 < dev["effective_examples"] <= 40
    assert (tmp_path / method / "plots" / "domains.png").is_file()
    # The epoch kept is the one with the lowest DEV risk, recorded for every epoch (no target labels used).
    risks = [record["dev_risk"] for record in metrics["history"]]
    assert report["selection"] == "lowest DEV target risk" and len(risks) == 2
    assert metrics["best_epoch"] == 1 + risks.index(min(risks))
    assert ("dev_warning" in report) == (min(risks) < 0)  # a negative estimate warns that DEV cannot rank epochs
    # The transfer term changes training: the weights differ from a source-only run with the same seed.
    from safetensors.torch import load_file

    adapted = load_file(tmp_path / method / "model" / "model.safetensors")
    plain = load_file(source_only_run / "model" / "model.safetensors")
    assert any(not torch.equal(adapted[k], plain[k]) for k in plain)


def test_a_negative_dev_estimate_warns_that_dev_cannot_rank_the_epochs():
    from transferkit.adaptation import dev_warning

    assert dev_warning([0.41, 0.38, 0.40]) is None
    warning = dev_warning([0.3, -2.0, -243.0, 0.1])
    assert "went negative (-243 at epoch 3, 2 of 4 epochs)" in warning and "--adapt-selection source-val" in warning


def test_adapt_selection_source_val_keeps_the_best_source_accuracy(domains, tiny_bert_dir, tmp_path):
    out = tmp_path / "source-val"
    assert main(["adapt", *_common(domains, tiny_bert_dir), "--method", "mcc", "--epochs", "3",
                 "--adapt-selection", "source-val", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    accuracies = [record["val_accuracy"] for record in metrics["history"]]
    assert metrics["adaptation"]["selection"] == "source validation split"
    assert "dev_risk" not in metrics["history"][0]
    assert metrics["best_epoch"] == 1 + accuracies.index(max(accuracies))  # the first of ties, as the engine keeps


def test_adapt_errors(tiny_bert_dir, image_folder, tmp_path, capsys):
    source, target, _ = _domains(tmp_path)
    unseen = write_table(tmp_path / "unseen.csv", [("good film", "pos"), ("so so film", "meh")])
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    base = ["--source", str(source), "--model", str(tiny_bert_dir), "--out", str(tmp_path / "out")]
    cases = [
        ([], "needs --target"),
        (["--target", str(unseen)], "labels the source never has: ['meh']"),
        (["--target", str(empty)], "empty"),
        (["--target", str(target), "--method", "magic"], "unknown adaptation method 'magic'"),
        (["--target", str(target), "--adapt-selection", "target"], "'adapt_selection'"),
        (["--target", str(target), "--method", "dann", "--strategy", "linear-probe"], "cannot adapt"),
        (["--target", str(image_folder)], "holds images"),
    ]
    for flags, message in cases:
        assert main(["adapt", *base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    # fit with a target test but no target: the config names the missing field.
    assert main(["fit", "--train", str(source), "--model", str(tiny_bert_dir), "--target-test", str(target),
                 "--out", str(tmp_path / "out")]) == 2
    assert "without 'target'" in capsys.readouterr().err
    assert sorted(ADAPTATION_METHODS) == ["cdan", "coral", "dan", "dann", "im", "mcc", "source-only", "target-bn"]
