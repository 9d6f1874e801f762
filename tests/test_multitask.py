"""Multi-task fine-tuning: weightings' arithmetic, batch routing, sampling, soft sharing, runs and errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.engine.batches import Batches
from transferkit.errors import UserError
from transferkit.multitask import MultiTaskConfig, create_weighting, fit_multitask
from transferkit.multitask.model import MultiTaskModel, soft_sharing_penalty
from transferkit.multitask.run import delta_m
from transferkit.multitask.sampling import TaskBatches
from transferkit.multitask.weighting.pcgrad import project_conflicting
from tests.conftest import FILLER, NEGATIVE, POSITIVE, make_sentences, write_table

STRONG = {"excellent", "superb", "wonderful", "awful", "terrible", "horrible"}


def strength_sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """A second labelling of the same vocabulary: is the sentiment word strong or mild?"""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(POSITIVE + NEGATIVE)
        words = rng.sample(FILLER, 4) + [word]
        rng.shuffle(words)
        rows.append((" ".join(words), "strong" if word in STRONG else "mild"))
    return rows


@pytest.fixture()
def two_tasks(tmp_path):
    sentiment = make_sentences(160, seed=3)
    strength = strength_sentences(160, seed=4)
    write_table(tmp_path / "sentiment-test.csv", make_sentences(40, seed=5))
    write_table(tmp_path / "strength-test.csv", strength_sentences(40, seed=6))
    return {"sentiment": write_table(tmp_path / "sentiment.csv", sentiment),
            "strength": write_table(tmp_path / "strength.csv", strength)}


def _config(tiny_bert_dir, two_tasks, tmp_path, **options):
    values = {"model": str(tiny_bert_dir), "epochs": 2, "batch_size": 16, "lr": 1e-3, "patience": None,
              "out": str(tmp_path / "run"), "seed": 1,
              "tasks": [{"name": name, "train": str(path), "text_column": "text"} for name, path in two_tasks.items()],
              **options}
    return MultiTaskConfig.from_dict(values, source="test")


# -- weightings: arithmetic on hand-made losses and gradients --------------------------------------------------
def test_equal_weighting_sums_losses_times_priors():
    weighting = create_weighting("equal", ["a", "b"], {"b": 0.5})
    total = weighting.combine({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}, [])
    assert float(total) == pytest.approx(2.0 + 0.5 * 4.0)


def test_uncertainty_weighting_learns_to_downweight_the_noisy_task():
    weighting = create_weighting("uncertainty", ["a", "b"])
    total = weighting.combine({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}, [])
    assert float(total.detach()) == pytest.approx(2.0)  # s = 0: exp(0) * L + 0
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        weighting.combine({"a": torch.tensor(0.2), "b": torch.tensor(3.0)}, []).backward()
        optimizer.step()
    weights = weighting.current_weights()
    # The optimum of exp(-s) L + s/2 is exp(-s) = 1 / (2L).
    assert weights["a"] == pytest.approx(1 / 0.4, rel=0.05) and weights["b"] == pytest.approx(1 / 6.0, rel=0.05)


def test_dwa_weights_follow_the_loss_ratios_of_the_last_two_epochs():
    weighting = create_weighting("dwa", ["a", "b"])
    for epoch, (loss_a, loss_b) in enumerate([(1.0, 1.0), (0.5, 0.9)]):
        weighting.start_epoch(epoch)
        assert weighting.current_weights() == {"a": 1.0, "b": 1.0}
        weighting.combine({"a": torch.tensor(loss_a), "b": torch.tensor(loss_b)}, [])
    weighting.start_epoch(2)
    ratios = torch.tensor([0.5, 0.9])
    expected = 2 * torch.softmax(ratios / 2.0, 0)
    weights = weighting.current_weights()
    assert weights["a"] == pytest.approx(float(expected[0]), rel=1e-5)
    assert weights["b"] > weights["a"]  # the task whose loss falls slower gets more weight


def test_gradnorm_raises_the_weight_of_the_task_with_the_smaller_gradient():
    weighting = create_weighting("gradnorm", ["a", "b"])
    shared = nn.Parameter(torch.ones(2, 2))
    for _ in range(20):
        losses = {"a": (shared * 10.0).sum(), "b": (shared * 0.1).sum()}  # a's gradient is 100x b's
        weighting.combine(losses, [shared])
    weights = weighting.current_weights()
    assert weights["b"] > 1.0 > weights["a"]
    assert weights["a"] + weights["b"] == pytest.approx(2.0)


def test_pcgrad_removes_the_conflicting_component_of_opposed_gradients():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    p1, p2 = project_conflicting([g1, g2])
    assert torch.dot(p1, g2) == pytest.approx(0.0, abs=1e-6) and torch.dot(p2, g1) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(p1, torch.tensor([0.5, 0.5]))
    agreeing = project_conflicting([g1, torch.tensor([1.0, 1.0])])
    assert torch.allclose(agreeing[0], g1)  # no conflict, no change
    counts = [0, 0]
    project_conflicting([g1, g2, torch.tensor([1.0, 1.0])], counts=counts)
    assert counts == [6, 2]  # of 3 x 2 ordered pairs, only (g1, g2) and (g2, g1) conflict


def test_pcgrad_loss_backpropagates_the_projected_sum_to_shared_and_plain_gradients_to_heads():
    shared = nn.Parameter(torch.zeros(2))
    head = nn.Parameter(torch.tensor(3.0))
    weighting = create_weighting("pcgrad", ["a", "b"])
    losses = {"a": (shared * torch.tensor([1.0, 0.0])).sum() + head, "b": (shared * torch.tensor([-1.0, 1.0])).sum()}
    total = weighting.combine(losses, [shared])
    assert float(total.detach()) == pytest.approx(3.0)  # the surrogate adds nothing to the loss value
    total.backward()
    # a: [1, 0] -> [0.5, 0.5] (minus its part along b); b: [-1, 1] -> [0, 1] (minus its part along a).
    assert torch.allclose(shared.grad, torch.tensor([0.5, 0.5]) + torch.tensor([0.0, 1.0]))
    assert float(head.grad) == pytest.approx(1.0)


def test_unknown_weighting_is_a_clear_error():
    with pytest.raises(UserError, match="unknown loss weighting 'magic'"):
        create_weighting("magic", ["a", "b"])


# -- model, routing, sharing, sampling --------------------------------------------------------------------------
class ToyBackbone(nn.Module):
    feature_dim = 3
    spec = {"name": "toy"}

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(x)


def test_batches_are_routed_to_their_task_head():
    model = MultiTaskModel(ToyBackbone(), {"a": ["x", "y"], "b": ["p", "q", "r", "s"]})
    x = torch.randn(5, 2)
    assert model(task="a", x=x).shape == (5, 2) and model(task="b", x=x).shape == (5, 4)
    assert model.view("a").backbone is model.view("b").backbone  # hard sharing: one backbone
    with pytest.raises(UserError, match="unknown task 'c'"):
        model(task="c", x=x)


def test_soft_sharing_penalty_is_zero_for_identical_copies_and_grows_apart():
    model = MultiTaskModel(ToyBackbone(), {"a": ["x", "y"], "b": ["p", "q"]}, sharing="soft")
    assert model.backbones["a"] is not model.backbones["b"]
    assert float(soft_sharing_penalty(model, 1.0)) == 0.0
    with torch.no_grad():
        model.backbones["b"].linear.bias.add_(1.0)
    # Each of the 3 biases differs by 1: two copies each 0.5 from the mean -> 3 * 2 * 0.25.
    assert float(soft_sharing_penalty(model, 1.0)) == pytest.approx(1.5)


def _toy_batches(n: int, seed: int) -> Batches:
    collate = lambda prepared, indices: {"x": torch.as_tensor(np.asarray(prepared)[indices])}
    return Batches(list(range(n)), np.zeros(n, dtype=np.int64), collate, 4, shuffle=True, seed=seed)


@pytest.mark.parametrize("sampling", ["round-robin", "proportional", "temperature"])
def test_task_sampling_budget_and_resume(sampling):
    batches = TaskBatches({"big": _toy_batches(40, 0), "small": _toy_batches(8, 1)}, sampling, seed=3)
    assert len(batches) == (10 + 2) // 2  # one epoch = as many batches as one epoch of each task alone
    full = [[(t, tuple(b["inputs"]["x"].tolist())) for t, b in step["parts"]] for step in batches.iterate(1)]
    resumed = [[(t, tuple(b["inputs"]["x"].tolist())) for t, b in step["parts"]] for step in batches.iterate(1, start=4)]
    assert resumed == full[4:]  # a resumed epoch draws the same batches
    tasks = [t for step in full for t, _ in step]
    if sampling == "round-robin":
        assert tasks.count("big") == tasks.count("small") == len(batches)
    if sampling == "proportional":
        assert tasks.count("big") > tasks.count("small")


def test_delta_m_is_the_mean_relative_change():
    assert delta_m({"a": 0.9, "b": 0.5}, {"a": 0.8, "b": 0.5}) == pytest.approx(100 * (0.125 + 0.0) / 2)


# -- runs -------------------------------------------------------------------------------------------------------
def test_hard_sharing_run_reports_each_task_beside_single_task_and_reloads(tiny_bert_dir, two_tasks, tmp_path):
    import transferkit

    values = {"model": str(tiny_bert_dir), "epochs": 3, "batch_size": 16, "lr": 1e-3, "patience": None,
              "out": str(tmp_path / "run"), "weighting": "uncertainty",
              "tasks": [{"name": name, "train": str(path), "text_column": "text",
                         "test": str(path).replace(".csv", "-test.csv")} for name, path in two_tasks.items()]}
    metrics = fit_multitask(MultiTaskConfig.from_dict(values, source="test"))
    run = tmp_path / "run"
    assert set(metrics["tasks"]) == {"sentiment", "strength"}
    for name, task in metrics["tasks"].items():
        assert 0 <= task["test"]["accuracy"] <= 1
        assert "single_task" in task and (run / "single" / name / "metrics.json").is_file()
    assert metrics["delta_m"] == pytest.approx(delta_m({t: v["test"]["accuracy"] for t, v in metrics["tasks"].items()},
                                                       {t: v["single_task"]["test"]["accuracy"]
                                                        for t, v in metrics["tasks"].items()}))
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert all("weight_sentiment" in record for record in metrics["history"])
    assert (run / "plots" / "tasks.png").is_file() and (run / "report.md").is_file()
    # A saved multi-task model predicts for a chosen task, the same as in training.
    model = transferkit.load_run(run, task="sentiment")
    assert model.classes == ["neg", "pos"]
    report = model.evaluate(model.read(tmp_path / "sentiment-test.csv", text_column="text"))
    assert report["accuracy"] == pytest.approx(metrics["tasks"]["sentiment"]["test"]["accuracy"])
    with pytest.raises(UserError, match="choose its task with --task"):
        transferkit.load_run(run)
    with pytest.raises(UserError, match="no task 'topic'"):
        transferkit.load_run(run, task="topic")


def test_soft_sharing_run_from_the_cli_with_task_options(tiny_bert_dir, two_tasks, tmp_path):
    out = tmp_path / "soft"
    command = [sys.executable, "-m", "transferkit", "fit", "--model", str(tiny_bert_dir), "--epochs", "1",
               "--batch-size", "16", "--lr", "1e-3", "--out", str(out), "--sharing", "soft", "--weighting", "dwa",
               "--task-sampling", "proportional", "--no-single-task"]
    for name, path in two_tasks.items():
        command += ["--task", f"name={name},train={path},text_column=text"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sharing"] == "soft" and "delta_m" not in metrics
    meta = json.loads((out / "model" / "transferkit.json").read_text())
    assert meta["kind"] == "multitask" and set(meta["tasks"]) == {"sentiment", "strength"}
    predictions = tmp_path / "p.csv"
    result = subprocess.run([sys.executable, "-m", "transferkit", "predict", str(out), "--input",
                             str(two_tasks["strength"]), "--text-column", "text", "--task", "strength",
                             "--output", str(predictions)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "p_strong" in predictions.read_text().splitlines()[0]


def test_interrupted_multitask_run_resumes(tiny_bert_dir, two_tasks, tmp_path, monkeypatch):
    from transferkit.engine import loop

    config = _config(tiny_bert_dir, two_tasks, tmp_path, single_task_baseline=False)
    calls = {"n": 0}
    original = loop.Engine._train_step

    def interrupted(self, batch, epoch, step):
        calls["n"] += 1
        if epoch == 1 and step == 2:
            raise KeyboardInterrupt
        return original(self, batch, epoch, step)

    monkeypatch.setattr(loop.Engine, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_multitask(config)
    monkeypatch.setattr(loop.Engine, "_train_step", original)
    metrics = fit_multitask(config, resume=True)
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda v: v["tasks"].append(dict(v["tasks"][0])), "appear more than once"),
    (lambda v: v["tasks"].pop(), "at least two tasks"),
    (lambda v: v.update(weighting="magic"), "'weighting' is 'magic'"),
    (lambda v: v.update(sharing="soft", weighting="pcgrad"), "soft sharing gives each task its own backbone"),
    (lambda v: v["tasks"][1].update(label_column="topic"), "task 'strength'"),
    (lambda v: v["tasks"][0].update(epochs=3), "which a task cannot set"),
    (lambda v: v.update(strategy="linear-probe"), "linear-probe freezes the shared backbone"),
    (lambda v: v.update(teacher="runs/x"), "'teacher' is not supported"),
    (lambda v: v.update(l2_sp=0.01), "'l2_sp' is not supported"),
    (lambda v: v.update(head_init="probe"), "'head_init' is 'probe'"),
])
def test_bad_multitask_configs_are_clear_errors(tiny_bert_dir, two_tasks, tmp_path, change, message):
    values = {"model": str(tiny_bert_dir), "out": str(tmp_path / "bad"),
              "tasks": [{"name": n, "train": str(p), "text_column": "text"} for n, p in two_tasks.items()]}
    change(values)
    with pytest.raises(UserError, match=message):
        fit_multitask(MultiTaskConfig.from_dict(values, source="multi.yaml"))
    assert not (tmp_path / "bad").exists()


def test_task_test_labels_unseen_in_training_name_the_task(tiny_bert_dir, two_tasks, tmp_path):
    odd = write_table(tmp_path / "odd.csv", [("good movie", "neutral")] * 4)
    values = {"model": str(tiny_bert_dir), "out": str(tmp_path / "bad"),
              "tasks": [{"name": "sentiment", "train": str(two_tasks["sentiment"]), "test": str(odd), "text_column": "text"},
                        {"name": "strength", "train": str(two_tasks["strength"]), "text_column": "text"}]}
    with pytest.raises(UserError, match=r"task 'sentiment'.*neutral"):
        fit_multitask(MultiTaskConfig.from_dict(values, source="multi.yaml"))


def test_cli_task_option_syntax_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "transferkit", "fit", "--model", "x", "--task", "sst2.tsv",
                             "--task", "name=b,train=y"], capture_output=True, text=True)
    assert result.returncode == 2 and "key=value" in result.stderr and "Traceback" not in result.stderr


def test_one_task_of_a_multitask_run_is_served(tiny_bert_dir, two_tasks, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from transferkit.deploy.predictors import TorchPredictor, load_predictor
    from transferkit.deploy.server import create_app
    from tests.deploy.conftest import LiveServer

    run = tmp_path / "run"
    fit_multitask(_config(tiny_bert_dir, two_tasks, tmp_path, epochs=1, single_task_baseline=False))
    predictor = TorchPredictor.load(run, task="strength")
    expected = predictor.predict_proba(["the film was superb"])[0]
    with LiveServer(create_app(predictor, run=run)) as server:
        answer = httpx.post(f"{server.url}/predict", json={"texts": ["the film was superb"]}, timeout=30).json()
        metadata = httpx.get(f"{server.url}/metadata").json()
    assert metadata["task"] == "strength" and metadata["classes"] == ["mild", "strong"]
    assert metadata["metrics"]["test_accuracy"] == json.loads((run / "metrics.json").read_text())["tasks"]["strength"]["test"]["accuracy"]
    assert answer["predictions"][0]["probabilities"]["strong"] == pytest.approx(float(expected[1]), abs=1e-5)
    with pytest.raises(UserError, match="--runtime torch"):
        load_predictor(run, "onnx", task="strength")
    pytest.importorskip("onnxruntime")
    from transferkit.deploy.export import export_onnx

    exported = export_onnx(run, task="strength")
    assert exported["path"].endswith("model-strength.onnx") and exported["max_abs_diff"] < 1e-4
