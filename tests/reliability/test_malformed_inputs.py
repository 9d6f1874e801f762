"""The malformed-input corpus: every case must give one line naming the problem, exit code 2, no
traceback (the CLI runs in-process, so any unhandled exception fails the test), and no run directory."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from transferkit.cli import main

GOOD_ROWS = "".join(f"{'good' if i % 2 else 'bad'} film number {i},{i % 2}\n" for i in range(40))


def _csv(tmp: Path, content: bytes | str, name: str = "data.csv") -> Path:
    path = tmp / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _text_args(path: Path, *extra: str) -> list[str]:
    return ["--train", str(path), "--model", "minilm-l6", *extra]


def _image_folder(tmp: Path, classes=("a", "b"), n=4) -> Path:
    root = tmp / "images"
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _image_args(root: Path, *extra: str) -> list[str]:
    return ["--train", str(root), "--model", "efficientnet-lite0", *extra]


def _idx(tmp: Path, images: np.ndarray, labels: np.ndarray | None, truncate: int = 0) -> Path:
    def write(path, array):
        raw = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
        with gzip.open(path, "wb") as handle:
            handle.write(raw[: len(raw) - truncate])
    write(tmp / "x-images-idx3-ubyte.gz", images.astype(np.uint8))
    if labels is not None:
        write(tmp / "x-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return tmp / "x-images-idx3-ubyte.gz"


def _config(tmp: Path, text: str) -> list[str]:
    (tmp / "run.yaml").write_text(text)
    return ["--config", str(tmp / "run.yaml")]


def _broken_image(tmp: Path, name: str, content: bytes) -> list[str]:
    root = _image_folder(tmp)
    (root / "a" / name).write_bytes(content)
    return _image_args(root)


def _truncated_png(tmp: Path) -> list[str]:
    root = _image_folder(tmp)
    big = tmp / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    (root / "a" / "cut.png").write_bytes(big.read_bytes()[:300])
    return _image_args(root)


def _symlink_loop(tmp: Path) -> list[str]:
    root = _image_folder(tmp)
    os.symlink(root, root / "a" / "loop")
    return _image_args(root)


def _dangling_symlink(tmp: Path) -> list[str]:
    root = _image_folder(tmp)
    os.symlink(tmp / "gone.png", root / "a" / "gone.png")
    return _image_args(root)


def _image_table_missing_file(tmp: Path) -> list[str]:
    _image_folder(tmp)
    rows = "".join(f"images/{c}/{i}.png,{c}\n" for c in "ab" for i in range(4))
    return ["--train", str(_csv(tmp, "path,label\n" + rows + "images/a/missing.png,a\n")), "--image-column", "path",
            "--model", "efficientnet-lite0"]


CORPUS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "empty file": (lambda t: _text_args(_csv(t, "")), "is empty"),
    "header only": (lambda t: _text_args(_csv(t, "text,label\n")), "no rows"),
    "missing label column": (lambda t: _text_args(_csv(t, "text,target\n" + GOOD_ROWS)), "no label column 'label'"),
    "missing text column": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS), "--text-column", "body"), "no column 'body'"),
    "ambiguous text column": (lambda t: _text_args(_csv(t, "a,b,label\nx,y,1\n")), "cannot tell which column"),
    "extra field in a row": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS + "one,two,1\n")), "could not be parsed"),
    "missing field in a row": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS + "lonely\n")), "missing labels at line 42"),
    "mixed label types": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS + "fine film,pos\n")), "mixes numbers"),
    "continuous target as label": (lambda t: _text_args(_csv(t, "text,label\n" + "".join(f"film {i},{i * 0.37:.2f}\n" for i in range(40)))), "continuous target"),
    "multi-label lists in JSONL": (lambda t: _text_args(_csv(t, '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": ["x"]}\n', "d.jsonl")), "holds a list at line 1"),
    "nested record as text in JSONL": (lambda t: _text_args(_csv(t, '{"text": {"title": "a"}, "label": 1}\n{"text": {"title": "b"}, "label": 0}\n', "d.jsonl")), "holds a dict at line 1"),
    "NaN label spelled out": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS + "odd film,NaN\n")), "missing labels at line 42"),
    "null label in JSONL": (lambda t: _text_args(_csv(t, '{"text": "a", "label": null}\n{"text": "b", "label": 1}\n', "d.jsonl")), "missing labels at line 1"),
    "empty text cell": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS + ",1\n")), "empty values at line 42"),
    "duplicated header": (lambda t: _text_args(_csv(t, "text,label,label\nx,1,1\n")), "duplicated column names ['label']"),
    "non-UTF-8 text": (lambda t: _text_args(_csv(t, "text,label\n".encode() + "crème brûlée,1\n".encode("latin-1"))), "not UTF-8"),
    "binary junk": (lambda t: _text_args(_csv(t, bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))), "data.csv"),
    "corrupt parquet": (lambda t: _text_args(_csv(t, b"PAR1 not really parquet", "d.parquet")), "d.parquet"),
    "JSONL that is not JSON": (lambda t: _text_args(_csv(t, "text: hello\n", "d.jsonl")), "d.jsonl"),
    "unsupported extension": (lambda t: _text_args(_csv(t, "x", "data.xlsx")), "unsupported type '.xlsx'"),
    "single class": (lambda t: _text_args(_csv(t, "text,label\n" + "".join(f"film {i},1\n" for i in range(30)))), "at least two classes"),
    "unseen label in test": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS), "--test", str(_csv(t, "text,label\nmeh,2\n", "test.csv"))), "never occur"),
    "image folder as test for text": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS), "--test", str(_image_folder(t))), "holds images"),
    "zero-byte image": (lambda t: _broken_image(t, "empty.png", b""), "empty.png"),
    "corrupt JPEG": (lambda t: _broken_image(t, "noise.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), "noise.jpg"),
    "truncated PNG": (_truncated_png, "cut.png"),
    "non-image file in a class folder": (lambda t: _broken_image(t, "notes.txt", b"hello"), "notes.txt"),
    "symlink loop in an image folder": (_symlink_loop, "link to a folder"),
    "dangling symlink to an image": (_dangling_symlink, "gone.png"),
    "image folder with one class": (lambda t: _image_args(_image_folder(t, classes=("only",))), "at least two classes"),
    "image folder without class folders": (lambda t: _image_args((t / "flat").mkdir() or t / "flat"), "no class sub-folders"),
    "image table with a missing file": (_image_table_missing_file, "missing.png"),
    "truncated IDX": (lambda t: _image_args(_idx(t, np.zeros((6, 8, 8)), np.arange(6) % 2, truncate=7)), "truncated"),
    "IDX without labels file": (lambda t: _image_args(_idx(t, np.zeros((6, 8, 8)), None)), "labels file"),
    "IDX count mismatch": (lambda t: _image_args(_idx(t, np.zeros((6, 8, 8)), np.arange(5) % 2)), "does not match"),
    "config with unknown key": (lambda t: _config(t, "train: x.csv\nmodel: minilm-l6\nlearning_rate: 0.1\n"), "unknown field(s) learning_rate"),
    "config with wrong type": (lambda t: _config(t, "train: x.csv\nmodel: minilm-l6\nepochs: many\n"), "'epochs' is 'many'"),
    "config that is a list": (lambda t: _config(t, "- train\n- model\n"), "must hold a mapping"),
    "config with bad YAML": (lambda t: _config(t, "train: [x.csv\n"), "not valid YAML"),
    "negative learning rate": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS), "--lr", "-0.1"), "'lr' is -0.1"),
    "zero epochs": (lambda t: _text_args(_csv(t, "text,label\n" + GOOD_ROWS), "--epochs", "0"), "'epochs' is 0"),
}


def test_the_corpus_has_at_least_30_cases():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("case", list(CORPUS))
def test_malformed_input_gives_one_clear_line_and_exit_2(case, tmp_path, capsys):
    build, expected = CORPUS[case]
    argv = build(tmp_path)
    out = tmp_path / "run"
    code = main(["fit", *argv, "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("transferkit: error:"), lines
    assert expected in lines[0], lines[0]
    assert not out.exists()


# ---- inputs that look odd but are valid: read correctly, nothing dropped -------------------------------

def test_bom_crlf_long_lines_and_extra_columns_are_read_correctly(tmp_path):
    from transferkit.data.readers import read_examples

    long_text = "word " * 200_000
    content = "\ufefftext,label,notes\r\n" + f"{long_text},1,x\r\n" + "short,0,y\r\n"
    examples = read_examples(_csv(tmp_path, content))
    assert examples.labels == ["1", "0"] and len(examples.inputs[0]) == len(long_text.strip())


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_unusual_image_modes_are_converted_to_rgb(tmp_path, mode):
    from transferkit.data.readers import read_examples

    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new(mode, (10, 7)).save(root / c / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png"))
    examples = read_examples(root)
    assert examples.inputs[0].shape == (7, 10, 3) and examples.inputs[0].dtype == np.uint8


def test_labels_written_as_floats_and_ints_are_one_class(tmp_path):
    from transferkit.data.readers import read_examples

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": v}) for i, v in enumerate([1, 1.0, 0, "0"])))
    assert read_examples(path).labels == ["1", "1", "0", "0"]


def test_pickle_weights_are_refused_unless_the_user_opts_in(tmp_path, tiny_bert_dir, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    unsafe = tmp_path / "pickled-model"
    shutil.copytree(tiny_bert_dir, unsafe)
    state = load_file(unsafe / "model.safetensors")
    (unsafe / "model.safetensors").unlink()
    torch.save(state, unsafe / "pytorch_model.bin")
    data = _csv(tmp_path, "text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} film,{i % 2}\n" for i in range(40)))
    argv = ["fit", "--train", str(data), "--model", str(unsafe), "--epochs", "1", "--no-baseline"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*argv, "--allow-pickle", "--out", str(tmp_path / "allowed")]) == 0
