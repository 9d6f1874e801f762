"""Ensembles: each combiner's arithmetic, learning only from validation, soups, the run-directory contract
and errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from transferkit import load_run
from transferkit.cli import main
from transferkit.ensemble import Average, EnsembleModel, Stack, Vote, Weighted

from .conftest import make_sentences, write_table


def test_vote_takes_the_majority_and_breaks_ties_by_confidence():
    p = np.array([[[0.6, 0.4], [0.45, 0.55]],
                  [[0.7, 0.3], [0.9, 0.1]],
                  [[0.2, 0.8], [0.4, 0.6]]])  # 3 members, 2 examples
    assert Vote().combine(p).argmax(1).tolist() == [0, 1]  # 2 of 3 votes each
    tie = np.array([[[0.9, 0.1]], [[0.4, 0.6]]])  # one vote each: member 0 is surer
    assert Vote().combine(tie).argmax(1).tolist() == [0]
    assert np.allclose(Vote().combine(p).sum(1), 1)
    assert np.allclose(Average().combine(p), p.mean(0))


def test_weighted_puts_its_weight_on_the_member_that_is_right():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    good = np.full((200, 3), 0.05)
    good[np.arange(200), labels] = 0.9
    noise = rng.dirichlet(np.ones(3), 200)
    combiner = Weighted()
    combiner.fit(np.stack([noise, good]), labels)
    assert combiner.weights[1] > 0.9 and combiner.weights.sum() == pytest.approx(1)


def test_stack_reloads_from_its_json_state():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 100)
    p = rng.dirichlet(np.ones(2), (3, 100))
    p[0, np.arange(100), labels] += 1
    p /= p.sum(2, keepdims=True)
    stack = Stack()
    stack.fit(p, labels)
    again = Stack.from_state(json.loads(json.dumps(stack.state())))
    assert np.allclose(again.combine(p), stack.combine(p)) and (stack.combine(p).argmax(1) == labels).mean() > 0.9


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    rows = make_sentences(260, seed=6)
    write_table(root / "train.csv", rows[:140])
    write_table(root / "val.csv", rows[140:200])
    write_table(root / "test.csv", rows[200:])
    for seed in (0, 1, 2):
        assert main(["fit", "--train", str(root / "train.csv"), "--val", str(root / "val.csv"), "--test", str(root / "test.csv"),
                     "--model", str(tiny_bert_dir), "--epochs", "1", "--lr", "1e-3", "--seed", str(seed), "--no-baseline",
                     "--out", str(root / f"run{seed}")]) == 0
    return root


def test_an_ensemble_is_a_run_directory_that_evaluates_and_predicts(runs, tmp_path, capsys):
    members = [str(runs / f"run{s}") for s in (0, 1, 2)]
    out = tmp_path / "ens"
    assert main(["ensemble", *members, "--method", "weighted", "--val", str(runs / "val.csv"),
                 "--test", str(runs / "test.csv"), "--out", str(out)]) == 0
    assert "over the best member" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["accuracy"] for m in metrics["members"]] == [
        json.loads((runs / f"run{s}" / "metrics.json").read_text())["test"]["accuracy"] for s in (0, 1, 2)]
    assert len(metrics["ensemble"]["weights"]) == 3
    # Self-contained: the members' models were copied, so the ensemble outlives its member runs.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    model = load_run(moved)
    assert isinstance(model, EnsembleModel) and model.classes == ["neg", "pos"]
    assert main(["evaluate", str(moved), "--test", str(runs / "test.csv")]) == 0
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in capsys.readouterr().out
    # From Python too, on the file or on the same rows held in a DataFrame.
    import pandas as pd

    assert model.evaluate(runs / "test.csv")["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert model.evaluate(pd.read_csv(runs / "test.csv"))["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert main(["predict", str(moved), "--input", str(runs / "test.csv"), "--output", str(tmp_path / "p.csv")]) == 0
    assert (out / "README.md").is_file()
    assert main(["export", str(moved)]) == 2 and "ensemble" in capsys.readouterr().err


def test_stacking_never_sees_test_labels(runs, tmp_path):
    members = [str(runs / f"run{s}") for s in (0, 1, 2)]
    flipped = tmp_path / "flipped.csv"
    rows = [line.split(",") for line in (runs / "test.csv").read_text().splitlines()[1:]]
    write_table(flipped, [(t, "pos" if lab == "neg" else "neg") for t, lab in rows])
    states = []
    for test in (runs / "test.csv", flipped):
        out = tmp_path / f"stack-{test.stem}"
        assert main(["ensemble", *members, "--method", "stack", "--val", str(runs / "val.csv"), "--test", str(test),
                     "--out", str(out)]) == 0
        states.append(json.loads((out / "model" / "transferkit.json").read_text())["combiner"])
    assert states[0] == states[1]


def test_a_soup_of_identical_models_is_that_model(runs, tmp_path):
    copies = [tmp_path / "a", tmp_path / "b"]
    for copy in copies:
        shutil.copytree(runs / "run0", copy)
    out = tmp_path / "soup"
    assert main(["ensemble", *map(str, copies), "--method", "soup", "--val", str(runs / "val.csv"),
                 "--test", str(runs / "test.csv"), "--out", str(out)]) == 0
    texts = [t for t, _ in make_sentences(20, seed=11)]
    np.testing.assert_allclose(load_run(out).predict_proba(texts), load_run(runs / "run0").predict_proba(texts), atol=1e-6)
    assert len(json.loads((out / "metrics.json").read_text())["ensemble"]["ingredients"]) == 2


def test_ensemble_errors(runs, tiny_bert_dir, tmp_path, capsys):
    other = tmp_path / "other"
    three = write_table(tmp_path / "three.csv", make_sentences(40) + [("so so film", "meh")] * 10)
    assert main(["fit", "--train", str(three), "--model", str(tiny_bert_dir), "--epochs", "1", "--no-baseline",
                 "--out", str(other)]) == 0
    capsys.readouterr()
    run0, run1 = str(runs / "run0"), str(runs / "run1")
    cases = [
        ([run0], ["--method", "average"], "at least two runs"),
        ([run0, str(other)], ["--method", "average"], "other classes"),
        ([run0, run1], ["--method", "weighted"], "pass --val FILE"),
        ([run0, run1], ["--method", "stack", "--val", str(runs / "test.csv")], "the same file"),
        ([run0, run0], ["--method", "average"], "listed twice"),
    ]
    for members, flags, message in cases:
        assert main(["ensemble", *members, *flags, "--test", str(runs / "test.csv"), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_without_a_method_the_ensemble_averages_the_members_probabilities(runs, tmp_path):
    members = [str(runs / f"run{s}") for s in (0, 1, 2)]
    out = tmp_path / "average"
    assert main(["ensemble", *members, "--test", str(runs / "test.csv"), "--out", str(out)]) == 0
    texts = [t for t, _ in make_sentences(20, seed=11)]
    mean = np.mean([load_run(m).predict_proba(texts) for m in members], axis=0)
    np.testing.assert_allclose(load_run(out).predict_proba(texts), mean, atol=1e-6)
