"""transferkit rank: scores, cost, table, plot, validation, and the bad inputs it must refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import transferkit
from transferkit.cli import main
from transferkit.ranking.rank import pareto_front

from ..conftest import make_sentences, write_table


@pytest.fixture()
def sentiment_csv(tmp_path):
    return write_table(tmp_path / "sentiment.csv", make_sentences(120, seed=5))


@pytest.fixture()
def digits_folder(tmp_path):
    """scikit-learn's handwritten digits (real data, bundled offline) as an image folder."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "digits"
    for i, (image, label) in enumerate(zip(digits.images[:300], digits.target[:300])):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i}.png")
    return root


def test_random_weight_control_ranks_last_on_real_digits(digits_folder, tmp_path):
    result = transferkit.rank(["random:efficientnet-lite0", "efficientnet-lite0"], train=str(digits_folder), sample=200,
                              image_size=32, by="nleep", out=str(tmp_path / "rank"))
    assert [row["model"] for row in result["candidates"]] == ["efficientnet-lite0", "random:efficientnet-lite0"]
    pretrained, control = result["candidates"]
    # The pretrained model has its ImageNet classifier, so LEEP and NCE apply; the control has none.
    assert pretrained["scores"]["leep"] is not None and control["scores"]["leep"] is None
    assert "source head" in control["not_applicable"]["nce"]
    # The control has its twin's architecture: its cost is the profile measured once, for the first of the two.
    assert pretrained["cost"] == control["cost"] and pretrained["cost_measured_as"] == "random:efficientnet-lite0"
    assert "cost_measured_as" not in control and control["cost"]["total_parameters"] > 3_000_000
    saved = json.loads((tmp_path / "rank" / "rank.json").read_text())
    assert saved["candidates"][0]["model"] == "efficientnet-lite0" and (tmp_path / "rank" / "rank.png").is_file()


def test_cost_profile_counts_parameters_exactly(tiny_bert_dir, text_data, tmp_path):
    from transformers import BertConfig

    config = BertConfig.from_pretrained(tiny_bert_dir)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    head = h * 2 + 2
    result = transferkit.rank([str(tiny_bert_dir)], train=str(text_data["train"]), sample=40, strategy="lora",
                              lora_rank=4, out=str(tmp_path / "rank"))
    cost = result["candidates"][0]["cost"]
    lora = layers * 2 * 4 * (h + h)  # query and value: A (r x h) and B (h x r) each
    assert cost["total_parameters"] == embeddings + layers * layer + head + lora
    assert cost["trainable_parameters"] == lora + head
    assert cost["flops_per_example"] > 0 and cost["latency_ms_batch_1"] > 0


def test_validation_fine_tunes_top_and_bottom_and_reports_rank_correlations(tiny_bert_dir, text_data, tmp_path):
    from transformers import BertModel

    second = tmp_path / "second-bert"
    torch.manual_seed(1)
    BertModel.from_pretrained(tiny_bert_dir).save_pretrained(second)  # same weights, other folder
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(second)
    result = transferkit.rank([str(tiny_bert_dir), f"random:{tiny_bert_dir}", str(second), "random:efficientnet-lite0"],
                              train=str(text_data["train"]), val=str(text_data["val"]), test=str(text_data["test"]),
                              sample=60, validate=2, epochs=1, out=str(tmp_path / "rank"))
    validation = result["validation"]
    assert len(validation["fine_tuned"]) == 3  # the top two and the bottom one
    assert all(-1 <= c["kendall_tau"] <= 1 for e, c in validation["correlations"].items() if c["kendall_tau"] is not None)
    assert validation["correlations"]["logme"]["candidates"] == 3
    failed = [row for row in result["candidates"] if "error" in row]
    assert [row["model"] for row in failed] == ["random:efficientnet-lite0"] and "images" in failed[0]["error"]


def test_a_learning_rate_grid_keeps_per_candidate_the_rate_validation_chooses(tiny_bert_dir, text_data, tmp_path):
    lrs = [1e-9, 3e-3]  # the first barely moves the random head: validation must tell them apart
    result = transferkit.rank([str(tiny_bert_dir), f"random:{tiny_bert_dir}"], train=str(text_data["train"]),
                              val=str(text_data["val"]), test=str(text_data["test"]), sample=40, validate=2,
                              validate_lrs=lrs, epochs=1, out=str(tmp_path / "rank"))
    assert result["validation"]["lrs"] == lrs
    for row in result["candidates"]:
        runs = row["fine_tune_runs"]
        assert [run["lr"] for run in runs] == lrs
        best = max(runs, key=lambda run: run["val_accuracy"])
        assert row["fine_tune_lr"] == best["lr"] and row["fine_tuned_accuracy"] == best["test_accuracy"]
        assert row["fine_tune_seconds"] == pytest.approx(sum(run["seconds"] for run in runs)) == row["fine_tune_grid_seconds"]
    assert len(list((tmp_path / "rank" / "validate").iterdir())) == 4  # two candidates x two rates
    assert "chosen lr" in transferkit.ranking.rank_table(result)


def test_validation_seeds_average_the_chosen_rate_over_seeds(tiny_bert_dir, text_data, tmp_path):
    result = transferkit.rank([str(tiny_bert_dir), f"random:{tiny_bert_dir}"], train=str(text_data["train"]),
                              val=str(text_data["val"]), test=str(text_data["test"]), sample=40, validate=2,
                              validate_lrs=[1e-9, 3e-3], validate_seeds=3, epochs=1, seed=5, out=str(tmp_path / "rank"))
    assert result["validation"]["seeds"] == 3
    for row in result["candidates"]:
        grid, repeats = row["fine_tune_runs"][:2], row["fine_tune_runs"][2:]
        best = max(grid, key=lambda run: run["val_accuracy"])
        assert [(run["lr"], run["seed"]) for run in repeats] == [(best["lr"], 6), (best["lr"], 7)]
        accuracies = [best["test_accuracy"]] + [run["test_accuracy"] for run in repeats]
        assert row["fine_tuned_accuracies"] == accuracies
        assert row["fine_tuned_accuracy"] == pytest.approx(np.mean(accuracies))
        assert row["fine_tuned_accuracy_std"] == pytest.approx(np.std(accuracies))
        assert row["fine_tune_grid_seconds"] == pytest.approx(sum(run["seconds"] for run in grid))
    assert "mean over 3 seeds" in transferkit.ranking.rank_table(result)


def test_a_candidate_cut_to_its_lowest_layers_is_scored_priced_and_fine_tuned_that_deep(tiny_bert_dir, text_data, tmp_path):
    from transformers import BertConfig

    config = BertConfig.from_pretrained(tiny_bert_dir)
    h, i = config.hidden_size, config.intermediate_size
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    candidates = [str(tiny_bert_dir), f"{tiny_bert_dir}@layers=1", f"{tiny_bert_dir}@layers=9"]
    result = transferkit.rank(candidates, train=str(text_data["train"]), val=str(text_data["val"]),
                              test=str(text_data["test"]), sample=40, validate=2, epochs=1, out=str(tmp_path / "rank"))
    rows = {row["model"]: row for row in result["candidates"]}
    full, cut = rows[candidates[0]], rows[candidates[1]]
    assert full["cost"]["total_parameters"] - cut["cost"]["total_parameters"] == layer
    assert cut["cost"]["flops_per_example"] < full["cost"]["flops_per_example"]
    assert "choose 1 to 2" in rows[candidates[2]]["error"]
    assert set(result["validation"]["fine_tuned"]) == set(candidates[:2])
    folder = next(p for p in (tmp_path / "rank" / "validate").iterdir() if p.name.endswith("layers_1"))
    assert json.loads((folder / "model" / "backbone" / "config.json").read_text())["num_hidden_layers"] == 1


def test_a_depth_family_is_scored_from_one_pass_of_its_deepest_candidate(tiny_bert_dir, text_data, tmp_path):
    from transferkit.ranking.rank import processing_order

    full, cut = str(tiny_bert_dir), f"{tiny_bert_dir}@layers=1"
    assert processing_order([cut, "random:minilm-l6", full]) == [full, cut, "random:minilm-l6"]
    assert processing_order(["random:minilm-l6@layers=1", "random:minilm-l6"]) == ["random:minilm-l6@layers=1",
                                                                                   "random:minilm-l6"]
    fields = {"train": str(text_data["train"]), "sample": 40}
    together = transferkit.rank([cut, full], out=str(tmp_path / "together"), **fields)
    alone = transferkit.rank([cut], out=str(tmp_path / "alone"), **fields)
    shared = next(r for r in together["candidates"] if r["model"] == cut)
    assert shared["features_from"].startswith("one pass")
    for estimator, score in alone["candidates"][0]["scores"].items():
        assert score is None or shared["scores"][estimator] == pytest.approx(score, rel=1e-3, abs=1e-4)


def test_features_of_a_deeper_pass_that_disagree_with_the_cut_model_are_not_used(tiny_bert_dir, text_data, tmp_path,
                                                                                 monkeypatch):
    from transferkit.backbones.hf_text import HFTextBackbone

    honest = HFTextBackbone.features_by_depth

    def with_a_final_norm(self, input_ids, attention_mask, depths):  # as an encoder with a norm after its layers
        features = honest(self, input_ids, attention_mask, depths)
        own = self.feature_dim  # the features at each depth lie side by side, its own first
        return torch.cat([features[:, :own], 2 * features[:, own:] + 1], dim=1)

    monkeypatch.setattr(HFTextBackbone, "features_by_depth", with_a_final_norm)
    cut = f"{tiny_bert_dir}@layers=1"
    fields = {"train": str(text_data["train"]), "sample": 40}
    together = transferkit.rank([str(tiny_bert_dir), cut], out=str(tmp_path / "together"), **fields)
    alone = transferkit.rank([cut], out=str(tmp_path / "alone"), **fields)
    row = next(r for r in together["candidates"] if r["model"] == cut)
    assert "features_from" not in row
    assert row["scores"]["logme"] == pytest.approx(alone["candidates"][0]["scores"]["logme"], rel=1e-6)


def test_pareto_front_keeps_what_nothing_cheaper_beats():
    assert sorted(pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.7), (1.0, 0.4)])) == [0, 1]


@pytest.mark.parametrize("argv, message", [
    (["--models", "minilm-l6", "--sample", "1"], "--sample is 1"),
    (["--models", "minilm-l6", "--estimators", "logm"], "unknown estimator 'logm'"),
    (["--models", "minilm-l6", "--model", "minilm-l6"], "--models a,b,c"),
    (["--models", "minilm-l6,minilm-l6@3"], "write NAME@layers=K"),
    (["--models", "minilm-l6", "--validate", "1", "--validate-lr", "1e-4,fast"], "--validate-lr is '1e-4,fast'"),
    (["--models", "minilm-l6", "--validate", "1", "--validate-lr", "0,1e-4"], "give positive learning rates"),
    (["--models", "minilm-l6", "--validate-lr", "1e-4,1e-3"], "add --validate K"),
    (["--models", "minilm-l6", "--validate", "1", "--validate-seeds", "0"], "--validate-seeds is 0"),
    (["--models", "minilm-l6", "--validate-seeds", "3"], "add --validate K"),
])
def test_bad_rank_requests_get_one_line_and_exit_2(argv, message, sentiment_csv, tmp_path, capsys):
    assert main(["rank", "--data", str(sentiment_csv), "--out", str(tmp_path / "r"), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_sample_smaller_than_the_classes_is_refused(tmp_path, capsys):
    rows = [(f"text {i}", f"class{i % 5}") for i in range(50)]
    data = write_table(tmp_path / "five.csv", rows)
    assert main(["rank", "--data", str(data), "--models", "minilm-l6", "--sample", "3", "--out", str(tmp_path / "r")]) == 2
    assert "5 classes" in capsys.readouterr().err


def test_one_class_is_refused(tmp_path, capsys):
    data = write_table(tmp_path / "one.csv", [(f"text {i}", "same") for i in range(20)])
    assert main(["rank", "--data", str(data), "--models", "minilm-l6", "--out", str(tmp_path / "r")]) == 2
    assert "at least two classes" in capsys.readouterr().err


def test_an_estimator_that_scores_every_candidate_alike_is_called_out_as_tied():
    from transferkit.ranking.rank import rank_table, tied_estimators

    cost = {"total_parameters": 1e6, "trainable_parameters": 1e6, "flops_per_example": 1e9, "latency_ms_batch_1": 1.0,
            "latency_ms_batch_32": 2.0, "peak_memory_mib": 10}
    result = {"estimators": ["nleep", "knn"], "candidates": [
        {"model": "a", "scores": {"nleep": 1.4e-17, "knn": 0.91}, "cost": cost},
        {"model": "b", "scores": {"nleep": -1.4e-18, "knn": 0.55}, "cost": cost},
        {"model": "c", "error": "could not load"}]}
    assert tied_estimators(result) == ["nleep"]
    assert "tied: nleep gives every candidate the same score" in rank_table(result)
    result["candidates"][1]["scores"]["nleep"] = -0.2
    assert tied_estimators(result) == [] and "tied:" not in rank_table(result)


def test_a_random_efficientnet_control_needs_no_weights_package_and_is_the_same_network(monkeypatch):
    """random:efficientnet-liteN is built from the architecture alone (its weights package may be absent) and
    equals what loading the weights and re-initialising them gave."""
    from transferkit.backbones import efficientnet_lite, registry
    from transferkit.errors import UserError

    loaded = efficientnet_lite.EfficientNetLiteBackbone.from_pretrained(0, image_size=32, name="efficientnet-lite0")
    registry.randomise(loaded)

    def absent(variant):
        raise UserError(f"model 'efficientnet-lite{variant}' needs its weights package")

    monkeypatch.setattr(efficientnet_lite, "_weights_file", absent)
    with pytest.raises(UserError, match="weights package"):
        registry.create_backbone("efficientnet-lite0", image_size=32)
    control = registry.create_backbone("random:efficientnet-lite0", image_size=32)
    assert control.spec["name"] == "random:efficientnet-lite0" and control.imagenet_head is None
    ours, theirs = control.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
