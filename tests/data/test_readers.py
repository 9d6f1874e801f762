import gzip
import json
import struct

import numpy as np
import pandas as pd
import pytest

from transferkit.data.dataset import ImageArray, ImagePaths, sort_classes
from transferkit.data.readers import read_examples
from transferkit.errors import UserError


def test_csv_tsv_jsonl_parquet_read_the_same_rows(tmp_path):
    frame = pd.DataFrame({"review": ["nice one", "not good", "fine"], "stars": [1, 0, 1]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.tsv", "d.jsonl", "d.parquet"):
        examples = read_examples(tmp_path / name, text_column="review", label_column="stars")
        assert examples.inputs == ["nice one", "not good", "fine"], name
        assert examples.labels == ["1", "0", "1"], name
        assert examples.modality == "text"


def test_text_column_is_guessed_when_obvious(tmp_path):
    (tmp_path / "d.csv").write_text("sentence,label\nhello there,a\nbye now,b\n")
    assert read_examples(tmp_path / "d.csv").inputs == ["hello there", "bye now"]


def test_many_classes_are_read_but_many_fractional_numbers_are_a_continuous_target(tmp_path):
    (tmp_path / "classes.csv").write_text("text,label\n" + "".join(f"film {i},{i % 30}\n" for i in range(60)))
    assert len(set(read_examples(tmp_path / "classes.csv").labels)) == 30
    (tmp_path / "few.csv").write_text("text,label\n" + "".join(f"film {i},{i % 3 + 0.5}\n" for i in range(60)))
    assert set(read_examples(tmp_path / "few.csv").labels) == {"0.5", "1.5", "2.5"}  # a few grades are classes
    (tmp_path / "scores.csv").write_text("text,label\n" + "".join(f"film {i},{i / 7:.3f}\n" for i in range(60)))
    with pytest.raises(UserError, match="column 'label' holds 60 distinct numbers .* continuous target"):
        read_examples(tmp_path / "scores.csv")


def test_16_bit_grey_images_keep_their_contrast(tmp_path):
    from PIL import Image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65,520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = ImagePaths([tmp_path / "deep.png"])[0]
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    # Full range kept (PIL's own conversion makes 99.6% of these pixels 255).
    assert pixels.min() == 0 and pixels.max() == 255 and (pixels == 255).mean() < 0.01
    assert np.array_equal(pixels[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))


def test_a_folder_of_splits_is_not_read_as_classes(image_folder):
    import shutil

    root = image_folder.parent / "dataset"
    for split in ("train", "test"):
        shutil.copytree(image_folder, root / split)
    with pytest.raises(UserError, match=f"holds splits \\(test, train\\).*--test {root / 'test'} --train {root / 'train'}"):
        read_examples(root)
    assert set(read_examples(root / "train").labels) == {"horizontal", "vertical"}


def test_a_missing_label_column_suggests_the_one_named_like_labels(tmp_path):
    (tmp_path / "d.csv").write_text("text,sentiment\nnice,pos\nbad,neg\n")
    with pytest.raises(UserError, match="no label column 'label'.*: pass --label-column sentiment$"):
        read_examples(tmp_path / "d.csv")
    (tmp_path / "two.csv").write_text("text,sentiment,topic\nnice,pos,a\nbad,neg,b\n")
    with pytest.raises(UserError, match="pass --label-column NAME$"):
        read_examples(tmp_path / "two.csv")


@pytest.mark.parametrize("labels", [pd.array([1, 0, None], dtype="Int64"), pd.array(["pos", "neg", None], dtype="string")])
def test_pandas_missing_values_in_a_parquet_file_are_missing_labels_not_a_class(tmp_path, labels):
    pd.DataFrame({"text": ["nice", "bad", "meh"], "label": labels}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(UserError, match="missing labels at row 2"):
        read_examples(tmp_path / "d.parquet")


def test_integer_labels_sort_numerically_and_strings_alphabetically():
    assert sort_classes(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_classes(["pos", "neg", "mixed"]) == ["mixed", "neg", "pos"]


def test_bom_and_crlf_are_handled(tmp_path):
    (tmp_path / "d.csv").write_bytes("\ufefftext,label\r\nhello,a\r\nworld,b\r\n".encode("utf-8"))
    examples = read_examples(tmp_path / "d.csv")
    assert examples.inputs == ["hello", "world"] and examples.labels == ["a", "b"]


def test_image_folder_reads_one_class_per_subfolder(image_folder):
    examples = read_examples(image_folder)
    assert isinstance(examples.inputs, ImagePaths) and examples.modality == "image"
    assert sorted(set(examples.labels)) == ["horizontal", "vertical"]
    assert examples.inputs[0].shape == (20, 20, 3)


def test_csv_of_image_paths_resolves_relative_paths(image_folder, tmp_path):
    paths = sorted(image_folder.rglob("*.png"))[:4]
    table = tmp_path / "images.csv"
    table.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in paths))
    examples = read_examples(table, image_column="path")
    assert len(examples) == 4 and examples.inputs[0].shape == (20, 20, 3)


def _write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_idx_pair_is_read_with_labels(tmp_path):
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 1]))
    examples = read_examples(tmp_path / "train-images-idx3-ubyte.gz")
    assert isinstance(examples.inputs, ImageArray)
    assert examples.labels == ["0", "1", "1"] and np.array_equal(examples.inputs.pixels, images)


# ---- bad input: one clear error each, naming the file and the fix ------------------------------------

def _error(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        read_examples(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.csv")


def test_unknown_column_lists_available_columns(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhi,a\n")
    message = _error(tmp_path / "d.csv", text_column="body")
    assert "'body'" in message and "['text', 'label']" in message and "--text-column" in message


def test_missing_label_column_lists_available_columns(tmp_path):
    (tmp_path / "d.csv").write_text("text,target\nhi,a\n")
    assert "no label column 'label'" in _error(tmp_path / "d.csv") and "'target'" in _error(tmp_path / "d.csv")


@pytest.mark.parametrize("name, content", [
    ("d.tsv", "So there is no way for me to plug it in here in the US.\t0\nGood case, excellent value.\t1\n"),
    ("d.csv", "the battery died after a week of light use,negative\ngreat phone,positive\n"),
])
def test_a_file_without_a_header_row_is_named_as_such(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    message = _error(tmp_path / name)
    assert "first line looks like an example, not a header" in message
    assert ("'text<TAB>label'" if name.endswith(".tsv") else "'text,label'") in message


@pytest.mark.parametrize("name, content", [
    ("texts.txt", "A very, very slow-moving, aimless movie about a distressed drifting young man.\nNot sure who was more lost.\n"),
    ("paths.csv", "images/cat_001.png\nimages/dog_002.png\n"),
])
def test_unlabelled_inputs_without_a_header_are_refused_rather_than_losing_the_first(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    message = _error(tmp_path / name, require_labels=False)  # as predict reads its input
    assert "first line looks like an example" in message and "so no example is lost" in message


def test_unlabelled_inputs_with_a_header_or_a_named_column_are_read_whole(tmp_path):
    (tmp_path / "texts.txt").write_text("text\nA very, very slow-moving, aimless movie about a drifting young man.\nok.\n")
    assert len(read_examples(tmp_path / "texts.txt", require_labels=False).inputs) == 2
    (tmp_path / "review.csv").write_text("review\nfine\n")
    assert read_examples(tmp_path / "review.csv", require_labels=False).inputs == ["fine"]


def test_a_header_with_unexpected_names_is_not_called_missing(tmp_path):
    (tmp_path / "d.csv").write_text("review,stars\nhi,a\n")
    message = _error(tmp_path / "d.csv")
    assert "looks like an example" not in message and "['review', 'stars']" in message


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"text,label\n", "no rows"),
    (b"text,label\nhello,\nworld,b\n", "missing labels at line 2"),
    (b"text,label\n,a\nworld,b\n", "empty values at line 2"),
    (b"text,text,label\nx,y,a\n", "duplicated column names"),
    (b"text,label\ncaf\xe9 noir,a\n", "not UTF-8"),
    (b'text,label\n"unclosed,a\n', "could not be parsed"),
])
def test_malformed_tables(tmp_path, content, expected):
    (tmp_path / "d.csv").write_bytes(content)
    assert expected in _error(tmp_path / "d.csv")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    assert "unsupported type" in _error(tmp_path / "d.xlsx")


def test_jsonl_that_is_not_records(tmp_path):
    (tmp_path / "d.jsonl").write_text("not json at all\n")
    assert "d.jsonl" in _error(tmp_path / "d.jsonl")


def test_unreadable_image_is_named(image_folder):
    bad = image_folder / "vertical" / "broken.png"
    bad.write_bytes(b"this is not a png")
    assert "broken.png" in _error(image_folder)


def test_non_image_file_in_image_folder_is_an_error(image_folder):
    (image_folder / "vertical" / "notes.txt").write_text("hello")
    assert "notes.txt" in _error(image_folder)


def test_truncated_idx_is_reported(tmp_path):
    _write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((3, 4, 4)), compress=False)
    raw = (tmp_path / "x-images-idx3-ubyte").read_bytes()
    (tmp_path / "x-images-idx3-ubyte").write_bytes(raw[:-5])
    assert "truncated" in _error(tmp_path / "x-images-idx3-ubyte")


def test_json_config_is_not_confused_with_data(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a", "label": None}) + "\n" + json.dumps({"text": "b", "label": 1}) + "\n")
    assert "missing labels at line 1" in _error(tmp_path / "d.jsonl")
