"""The exponential moving average of the weights: its arithmetic, the swap, and an engine that validates,
keeps and resumes it."""

import pytest
import torch
from torch import nn

from transferkit.engine.weight_average import WeightAverage

from .test_checkpoint_and_resume import KilledAfter, _engine, _final_state


def test_the_average_follows_the_weights_with_a_warmed_up_decay():
    model = nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)  # first update: decay min(0.99, 1/10) = 0.1, so the average moves 90% of the way
    assert torch.allclose(average.average["weight"], start["weight"] + 0.9)
    assert average.current_decay() == pytest.approx(2 / 11)
    for _ in range(5000):
        average.update(model)
    assert average.current_decay() == 0.99 and torch.allclose(average.average["weight"], model.weight, atol=1e-5)


def test_without_warm_up_the_decay_applies_from_the_first_update():
    model = nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.999, warmup=False)
    assert average.current_decay() == 0.999
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)  # the average moves 0.1% of the way, not the warmed-up 90%
    assert torch.allclose(average.average["weight"], start["weight"] + 0.001)


def test_swapped_in_holds_the_average_inside_and_the_trained_weights_after():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    average = WeightAverage(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    model[1].num_batches_tracked += 4  # integer buffers are copied, not averaged
    average.update(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with average.swapped_in(model):
        with average.swapped_in(model):  # nested: no second swap
            assert torch.allclose(model[0].weight, 0.1 * start + 0.9 * 3.0 * start)  # first update's decay: 0.1
            assert torch.equal(average.trained_weights()["0.weight"], trained["0.weight"])
        assert int(model[1].num_batches_tracked) == 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_tied_weights_are_swapped_once():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight  # one tensor under two names
    average = WeightAverage(model, decay=0.5)
    assert average.names == ["0.weight"]
    with torch.no_grad():
        model[0].weight.add_(2.0)
    trained = model[0].weight.detach().clone()
    average.update(model)
    with average.swapped_in(model):
        assert torch.allclose(model[1].weight, trained - 0.2)  # decay 0.1 on the first update: 90% of +2
    assert torch.equal(model[0].weight, trained) and torch.equal(model[1].weight, trained)


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(2, 2), decay=1.0)


def test_the_engine_validates_and_keeps_the_average_not_the_last_step(tmp_path):
    plain = _engine(tmp_path / "plain", epochs=3)
    plain.fit()
    averaged = _engine(tmp_path / "ema", epochs=3, ema_decay=0.9)
    history = averaged.fit()
    # Same seed and batches: the trained weights follow the same path; what is validated and kept differs.
    assert [r["val_loss"] for r in history] != [r["val_loss"] for r in plain.history]
    best = min(range(3), key=lambda i: history[i]["val_loss"])
    assert averaged.best_epoch == best + 1
    assert averaged.evaluate(averaged.val_batches)["loss"] == pytest.approx(history[best]["val_loss"], abs=1e-6)


@pytest.mark.parametrize("killed_at_step", [8, 15])
def test_an_interrupted_run_with_an_average_resumes_to_the_same_weights(tmp_path, killed_at_step):
    uninterrupted = _engine(tmp_path / "a", ema_decay=0.9)
    uninterrupted.fit()
    with pytest.raises(KeyboardInterrupt):
        _engine(tmp_path / "b", objective=KilledAfter(killed_at_step), ema_decay=0.9).fit()
    resumed = _engine(tmp_path / "b", seed=123, ema_decay=0.9)
    resumed.fit(resume=True)
    for name, value in _final_state(resumed).items():
        assert torch.equal(value, _final_state(uninterrupted)[name]), name
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in uninterrupted.history]
