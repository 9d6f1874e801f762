"""Data held in memory from Python: DataFrames, dicts of columns and `datasets`-like objects to fine-tune, rank
and evaluate on (stored in the run directory so the run replays and resumes), and texts, paths, PIL images and
arrays to predict on."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import transferkit
from transferkit.cli import main
from transferkit.data.dataset import ImagePaths
from transferkit.errors import UserError

from ..conftest import interrupt_then_resume, make_sentences, make_stripes


def _sentences(n: int = 200) -> pd.DataFrame:
    return pd.DataFrame(make_sentences(n, seed=1), columns=["text", "label"])


class _DatasetLike:
    """What a Hugging Face `datasets.Dataset` offers transferkit: ``to_pandas()``, and ``features`` where a
    ClassLabel column keeps the class names of its integers."""

    def __init__(self, frame: pd.DataFrame, class_names: dict[str, list[str]] | None = None):
        self.frame = frame
        self.features = {column: type("ClassLabel", (), {"names": names})() for column, names in (class_names or {}).items()}

    def to_pandas(self) -> pd.DataFrame:
        return self.frame


def test_a_run_from_dataframes_keeps_its_data_and_replays_from_its_directory(tiny_bert_dir, tmp_path):
    frame = _sentences()
    run = tmp_path / "run"
    test = {"text": list(frame.text[170:]), "label": list(frame.label[170:])}
    metrics = transferkit.finetune(model=str(tiny_bert_dir), train=frame[:140], val=_DatasetLike(frame[140:170]),
                                   test=test, epochs=2, lr=1e-3, baseline=False, out=str(run))
    assert metrics["data"]["train"] == 140 and metrics["data"]["test"] == 30
    assert metrics["data"]["train_source"] == str(run / "data" / "train.parquet")
    for split in ("train", "val", "test"):
        assert (run / "data" / f"{split}.parquet").is_file()
    # The stored tables are the data: the same test accuracy from the file as from the dict.
    model = transferkit.load_run(run)
    from_file = model.evaluate(run / "data" / "test.parquet")["accuracy"]
    assert from_file == model.evaluate(test)["accuracy"] == metrics["test"]["accuracy"]
    # config.yaml names the stored files, so the run replays without the caller's objects.
    replay = tmp_path / "replay"
    assert main(["fit", "--config", str(run / "config.yaml"), "--out", str(replay)]) == 0
    assert json.loads((replay / "metrics.json").read_text())["test"]["accuracy"] == metrics["test"]["accuracy"]


def test_an_interrupted_run_from_a_dataframe_resumes_from_its_directory(tiny_bert_dir, tmp_path, monkeypatch):
    frame = _sentences(160)

    def run_fit(out):
        transferkit.finetune(model=str(tiny_bert_dir), train=frame, val_fraction=0.2, test_fraction=0.2, epochs=2,
                             lr=1e-3, baseline=False, out=str(out))

    metrics = interrupt_then_resume(monkeypatch, run_fit, tmp_path / "run")
    assert metrics["data"]["train"] + metrics["data"]["val"] + metrics["data"]["test"] == 160


def test_images_held_in_a_table_are_stored_as_files_and_every_input_kind_predicts_alike(tiny_vit_dir, tmp_path):
    images, labels = make_stripes(40)
    encoded = []
    for image in images[20:]:  # half as PIL images, half as `datasets`' {"bytes": ...} cells
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    frame = pd.DataFrame({"picture": [Image.fromarray(i) for i in images[:20]] + encoded, "label": labels})
    run = tmp_path / "run"
    transferkit.finetune(model=str(tiny_vit_dir), train=frame, val_fraction=0.25, test_fraction=0.25, epochs=1,
                         batch_size=8, baseline=False, out=str(run))
    stored = pd.read_parquet(run / "data" / "train.parquet")
    assert list(stored.picture[:2]) == ["train_images/000000.png", "train_images/000001.png"]
    assert np.array_equal(np.array(Image.open(run / "data" / "train_images" / "000003.png")), images[3])

    model = transferkit.load_run(run)
    paths = [run / "data" / "train_images" / f"{i:06d}.png" for i in range(6)]
    expected = model.predict(ImagePaths(paths))
    assert model.predict([str(p) for p in paths]) == expected
    assert model.predict([Image.open(p) for p in paths]) == expected
    assert model.predict(images[:6]) == expected
    assert model.predict(str(paths[0])) == expected[:1]
    assert model.predict(run / "data" / "train_images")[:6] == expected  # a folder: its images in name order
    # A column of image file names is read as images, relative to where the caller runs.
    table = pd.DataFrame({"file": [str(p) for p in paths], "label": labels[:6]})
    assert model.evaluate(table)["accuracy"] == model.evaluate(_DatasetLike(table))["accuracy"]


def test_a_datasets_class_label_column_keeps_its_class_names(tiny_bert_dir, tmp_path):
    frame = _sentences(120)
    coded = frame.assign(label=(frame.label == "pos").astype(int))
    metrics = transferkit.finetune(model=str(tiny_bert_dir), train=_DatasetLike(coded, {"label": ["negative", "positive"]}),
                                   strategy="linear-probe", epochs=1, baseline=False, out=str(tmp_path / "run"))
    assert metrics["data"]["classes"] == ["negative", "positive"]
    with pytest.raises(UserError, match="holds several splits \\(train, test\\): pass one, e.g. dataset\\['train'\\]"):
        transferkit.finetune(model=str(tiny_bert_dir), train={"train": _DatasetLike(frame), "test": _DatasetLike(frame)},
                             out=str(tmp_path / "splits"))


def test_predict_takes_one_text_as_one_example(tiny_bert_dir, text_data, tmp_path):
    run = tmp_path / "run"
    transferkit.finetune(model=str(tiny_bert_dir), train=str(text_data["train"]), val=str(text_data["val"]),
                         test=str(text_data["test"]), strategy="linear-probe", epochs=1, baseline=False, out=str(run))
    model = transferkit.load_run(run)
    text = "the movie was really great"
    assert model.predict(text) == model.predict([text]) and len(model.predict(text)) == 1
    assert model.predict(pd.Series([text, "awful film"])) == model.predict([text, "awful film"])
    assert model.predict_proba(text).shape == (1, 2)
    # A DataFrame predicts on its text column, not on its column names.
    frame = pd.DataFrame({"text": [text, "awful film"], "label": ["pos", "neg"]})
    assert model.predict(frame) == model.predict([text, "awful film"])
    assert model.evaluate(text_data["test"])["accuracy"] == model.evaluate(pd.read_csv(text_data["test"]))["accuracy"]


@pytest.mark.parametrize("table, message", [
    ({"text": ["good film", "bad film"], "label": ["pos"]}, "all of one length"),
    ({"text": ["good film", "bad film"], "label": [1, "pos"]}, "mixes numbers"),
    ({"text": ["good film", "bad film"], "label": ["pos", None]}, "missing labels at row 1"),
    ({"review": ["good film", "bad film"], "stars": ["pos", "neg"]}, "no label column 'label'"),
    ({"text": [], "label": []}, "is empty"),
    ({"text": ["good film", "bad film"], "label": [1, pd.NA]}, "missing labels at row 1"),
])
def test_bad_tables_are_refused_naming_the_object_not_a_temporary_file(table, message, tiny_bert_dir, tmp_path):
    with pytest.raises(UserError, match=message) as error:
        transferkit.finetune(model=str(tiny_bert_dir), train=table, out=str(tmp_path / "run"))
    assert "the dict passed" in str(error.value) and "transferkit-data-" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_bad_inputs_to_predict_and_evaluate_are_refused(tiny_vit_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    transferkit.finetune(model=str(tiny_vit_dir), train=str(image_folder), strategy="linear-probe", epochs=1,
                         val_fraction=0.2, test_fraction=0.2, baseline=False, out=str(run))
    model = transferkit.load_run(run)
    with pytest.raises(UserError, match="not uint8"):
        model.predict(np.zeros((2, 16, 16), dtype=np.float32))
    with pytest.raises(UserError, match="does not exist"):
        model.predict([str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match="input 1 is a int"):
        model.predict([Image.new("RGB", (16, 16)), 3])
    with pytest.raises(UserError, match="DataFrame passed to evaluate\\(\\) holds texts but the model"):
        model.evaluate(pd.DataFrame({"text": ["a", "b"], "label": ["horizontal", "vertical"]}))


def test_rank_takes_a_dataframe(tiny_bert_dir, tmp_path):
    result = transferkit.rank([str(tiny_bert_dir), f"random:{tiny_bert_dir}"], train=_sentences(80), sample=40,
                              out=str(tmp_path / "rank"))
    assert len(result["candidates"]) == 2 and all("error" not in row for row in result["candidates"])

