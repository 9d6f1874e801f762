import numpy as np
import pytest
import torch

from transferkit.engine.batches import Batches, feature_collate
from transferkit.engine.checkpoint import CheckpointDir, load_weights
from transferkit.engine.loop import Engine, EngineSettings
from transferkit.errors import UserError
from transferkit.finetune import HeadOnFeatures
from transferkit.model import ClassificationHead
from transferkit.objectives import CrossEntropyObjective


def _data(seed=0, n=96):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, generator=generator)
    labels = (features[:, 0] + 0.3 * features[:, 1] > 0).long().numpy()
    return features, labels


def _engine(checkpoint_root, objective=None, seed=0, epochs=3, patience=None, **settings_overrides):
    torch.manual_seed(seed)
    model = HeadOnFeatures(ClassificationHead(8, 2, dropout=0.3))  # dropout: resume must restore the RNG too
    features, labels = _data()
    train = Batches(features, labels, feature_collate, batch_size=16, shuffle=True, seed=7)
    val = Batches(*_data(seed=1, n=32), feature_collate, batch_size=32)
    groups = [{"params": list(model.parameters()), "lr": 0.05, "weight_decay": 0.01}]
    settings = EngineSettings(epochs=epochs, warmup_ratio=0.1, patience=patience, monitor="val_loss", **settings_overrides)
    return Engine(model, groups, objective or CrossEntropyObjective(), train, val, settings,
                  checkpoints=CheckpointDir(checkpoint_root), device=torch.device("cpu"))


class KilledAfter:
    """An objective that dies after ``n`` calls, as a pre-empted job would."""

    def __init__(self, n):
        self.n, self.calls = n, 0
        self.inner = CrossEntropyObjective()

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return self.inner(model, batch)


def _final_state(engine):
    return {k: v.clone() for k, v in engine.model.state_dict().items()}


@pytest.mark.parametrize("killed_at_step", [8, 9, 15])  # end of epoch 1 + 2 steps, and later inside epoch 2
def test_resume_after_a_kill_gives_bitwise_the_same_weights(tmp_path, killed_at_step):
    uninterrupted = _engine(tmp_path / "a")
    uninterrupted.fit()
    expected = _final_state(uninterrupted)

    with pytest.raises(KeyboardInterrupt):
        _engine(tmp_path / "b", objective=KilledAfter(killed_at_step)).fit()
    resumed = _engine(tmp_path / "b", seed=123)  # a fresh process would start from other random weights
    resumed.fit(resume=True)
    for name, value in _final_state(resumed).items():
        assert torch.equal(value, expected[name]), name
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in uninterrupted.history]


def test_restore_best_loads_the_best_validation_epoch(tmp_path):
    engine = _engine(tmp_path, epochs=4)
    history = engine.fit()
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    assert engine.best_epoch == best + 1
    assert engine.evaluate(engine.val_batches)["loss"] == pytest.approx(history[best]["val_loss"], abs=1e-6)


def test_early_stopping_stops_after_patience(tmp_path):
    engine = _engine(tmp_path, epochs=30, patience=1)
    engine.fit()
    assert len(engine.history) < 30
    assert engine.best_epoch == len(engine.history) - 1


def test_interrupted_write_leaves_previous_checkpoint_usable(tmp_path):
    engine = _engine(tmp_path, epochs=1)
    engine.fit()
    checkpoints = CheckpointDir(tmp_path)
    good = checkpoints.find("latest")
    (tmp_path / "epoch-0002.tmp").mkdir()  # a crash mid-write leaves only a temporary folder
    (tmp_path / "epoch-0002.tmp" / "model.safetensors").write_bytes(b"partial")
    assert checkpoints.find("latest") == good
    folder, state, resumable = checkpoints.load_state()
    assert state["epoch"] == 0 and "optimizer" in resumable


def test_corrupt_weights_are_reported_not_loaded(tmp_path):
    engine = _engine(tmp_path, epochs=1)
    engine.fit()
    weights = CheckpointDir(tmp_path).find("latest") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(UserError, match="corrupt or incomplete"):
        load_weights(engine.model, weights)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    def nan_objective(model, batch):
        logits = model(**batch["inputs"])
        return logits.sum() * float("nan"), logits

    with pytest.raises(UserError, match="loss became nan at epoch 1, batch 1"):
        _engine(tmp_path, objective=nan_objective).fit()


def test_batches_order_depends_only_on_seed_and_epoch():
    batches = Batches(torch.zeros(50, 2), np.zeros(50), feature_collate, 8, shuffle=True, seed=3)
    assert np.array_equal(batches.order(2), batches.order(2))
    assert not np.array_equal(batches.order(1), batches.order(2))
    assert sorted(batches.order(1)) == list(range(50))


def test_length_grouped_batches_pad_little_and_still_cover_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=1000)
    batches = Batches(torch.zeros(1000, 2), np.zeros(1000), feature_collate, 10, shuffle=True, seed=1, lengths=lengths)
    order = batches.order(0)
    assert sorted(order) == list(range(1000))
    assert np.array_equal(order, batches.order(0)) and not np.array_equal(order, batches.order(1))
    spread = [np.ptp(lengths[order[i : i + 10]]) for i in range(0, 1000, 10)]
    assert np.mean(spread) < 5  # random batches of 10 would span about 48 tokens
    evaluation = Batches(torch.zeros(1000, 2), np.zeros(1000), feature_collate, 10, lengths=lengths).order(0)
    assert list(lengths[evaluation]) == sorted(lengths, reverse=True)


@pytest.mark.parametrize("killed_at_step", [3, 10, 17])
def test_mid_epoch_checkpoints_resume_at_the_step_they_saved(tmp_path, killed_at_step):
    uninterrupted = _engine(tmp_path / "a", checkpoint_every=2)
    uninterrupted.fit()
    with pytest.raises(KeyboardInterrupt):
        _engine(tmp_path / "b", objective=KilledAfter(killed_at_step), checkpoint_every=2).fit()
    _, state, _ = CheckpointDir(tmp_path / "b").load_state()
    assert (state["epoch"] * 6 + state["steps_done"]) == (killed_at_step // 2) * 2  # 6 steps per epoch
    resumed = _engine(tmp_path / "b", seed=99, checkpoint_every=2)
    resumed.fit(resume=True)
    for name, value in _final_state(resumed).items():
        assert torch.equal(value, _final_state(uninterrupted)[name]), name


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    engine = _engine(tmp_path, epochs=2)
    engine.fit()
    checkpoints = CheckpointDir(tmp_path)
    latest = checkpoints.find("latest")
    (latest / "optimizer.pt").write_bytes(b"garbage of the wrong size")
    fresh = CheckpointDir(tmp_path)
    folder, state, _ = fresh.load_state()
    assert folder != latest and state["epoch"] == 0
    assert "optimizer.pt has" in fresh.warnings[0]
    _engine(tmp_path, epochs=2, seed=5).fit(resume=True)  # replays epoch 2 from the intact checkpoint
    assert "damaged" in capsys.readouterr().err


def test_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    import errno

    from transferkit.engine import checkpoint

    engine = _engine(tmp_path, epochs=3)
    real_save = checkpoint.save_weights
    calls = {"n": 0}

    def disk_full_on_second_write(model, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(model, path)

    monkeypatch.setattr(checkpoint, "save_weights", disk_full_on_second_write)
    with pytest.raises(UserError, match="No space left on device.*--resume"):
        engine.fit()
    folder, state, _ = CheckpointDir(tmp_path).load_state()
    assert state["epoch"] == 0 and not list(tmp_path.glob("*.tmp"))


def test_skip_on_divergence_skips_the_batch_and_halves_the_lr(tmp_path):
    calls = {"n": 0}
    inner = CrossEntropyObjective()

    def one_bad_batch(model, batch):
        calls["n"] += 1
        loss, logits = inner(model, batch)
        return (loss * float("inf"), logits) if calls["n"] == 4 else (loss, logits)

    engine = _engine(tmp_path, objective=one_bad_batch, on_divergence="skip")
    engine.fit()
    assert engine.lr_scale == 0.5 and len(engine.history) == 3
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())


class NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: a fault only the gradient check sees."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradient_is_caught_within_one_step(tmp_path):
    def nan_gradient(model, batch):
        logits = model(**batch["inputs"])
        return torch.nn.functional.cross_entropy(NanGradient.apply(logits), batch["labels"]), logits

    with pytest.raises(UserError, match="gradient norm became nan at epoch 1, batch 1"):
        _engine(tmp_path, objective=nan_gradient).fit()


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    def engine(batch_size, accumulate):
        torch.manual_seed(0)
        model = HeadOnFeatures(ClassificationHead(8, 2, dropout=0.0))
        features, labels = _data()
        train = Batches(features, labels, feature_collate, batch_size=batch_size, shuffle=True, seed=7)
        groups = [{"params": list(model.parameters()), "lr": 0.05, "weight_decay": 0.01}]
        settings = EngineSettings(epochs=2, warmup_ratio=0.0, patience=None, accumulate=accumulate)
        return Engine(model, groups, CrossEntropyObjective(), train, None, settings, device=torch.device("cpu"))

    large, accumulated = engine(32, 1), engine(16, 2)
    large.fit()
    accumulated.fit()
    for (name, a), b in zip(large.model.state_dict().items(), accumulated.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_compiled_training_matches_eager_and_saves_the_trained_weights(tmp_path):
    """--compile: the compiled module shares the parameters that are checkpointed, and trains the same."""
    eager = _engine(tmp_path / "eager")
    eager.model.head.dropout.p = 0.0
    compiled = _engine(tmp_path / "compiled", compile=True)
    compiled.model.head.dropout.p = 0.0
    eager_history, compiled_history = eager.fit(), compiled.fit()
    assert compiled.forward_model is not compiled.model
    assert [h["val_loss"] for h in compiled_history] == pytest.approx([h["val_loss"] for h in eager_history], abs=1e-5)
    saved = HeadOnFeatures(ClassificationHead(8, 2))
    load_weights(saved, CheckpointDir(tmp_path / "compiled").find("best") / "model.safetensors")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, compiled.model.state_dict()[name]), name
