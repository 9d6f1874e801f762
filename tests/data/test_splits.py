from collections import Counter

import pytest

from transferkit.config import RunConfig
from transferkit.data.dataset import Examples
from transferkit.data.splits import load_splits, stratified_split, subsample
from transferkit.errors import UserError

from ..conftest import make_sentences, write_table


def _examples(labels):
    return Examples([f"text {i}" for i in range(len(labels))], list(labels), "mem.csv", "text")


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    examples = _examples(["a"] * 80 + ["b"] * 20)
    rest, held = stratified_split(examples, 0.2, seed=3, what="test")
    assert Counter(held.labels) == {"a": 16, "b": 4}
    assert len(rest) + len(held) == 100 and not set(rest.inputs) & set(held.inputs)
    assert stratified_split(examples, 0.2, seed=3, what="test")[1].inputs == held.inputs
    assert stratified_split(examples, 0.2, seed=4, what="test")[1].inputs != held.inputs


def test_subsample_is_stratified_and_bounded():
    kept = subsample(_examples(["a"] * 60 + ["b"] * 40), 50, seed=0)
    assert Counter(kept.labels) == {"a": 30, "b": 20}


def test_class_with_a_single_example_cannot_be_stratified():
    with pytest.raises(UserError, match="single example"):
        stratified_split(_examples(["a"] * 30 + ["b"]), 0.2, seed=0, what="validation")


def test_too_few_examples_for_the_fraction():
    with pytest.raises(UserError, match="too few"):
        stratified_split(_examples(["a", "b", "a", "b"]), 0.1, seed=0, what="test")


def test_splits_from_fractions_when_no_files(tmp_path):
    write_table(tmp_path / "all.csv", make_sentences(100))
    splits = load_splits(RunConfig(train=str(tmp_path / "all.csv"), model="m", val_fraction=0.2, test_fraction=0.1))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (72, 18, 10)
    assert splits.classes == ["neg", "pos"]


def test_label_in_test_that_train_never_had(tmp_path):
    write_table(tmp_path / "train.csv", make_sentences(40))
    write_table(tmp_path / "test.csv", [("some text", "neutral"), ("other", "pos")])
    with pytest.raises(UserError, match=r"test labels \['neutral'\] never occur"):
        load_splits(RunConfig(train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv"), model="m"))


def test_single_class_training_data(tmp_path):
    write_table(tmp_path / "train.csv", [(f"text {i}", "pos") for i in range(40)])
    with pytest.raises(UserError, match="at least two classes"):
        load_splits(RunConfig(train=str(tmp_path / "train.csv"), model="m"))
