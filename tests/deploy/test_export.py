"""ONNX export: adapters merged, checked against PyTorch in onnxruntime, self-describing, a model card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferkit import load_run
from transferkit.cli import main
from transferkit.deploy import OnnxPredictor, export_onnx

from ..conftest import make_sentences


def test_text_export_merges_lora_and_matches_pytorch(text_run, tmp_path, capsys):
    out = tmp_path / "exported" / "text.onnx"
    assert main(["export", str(text_run), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    record = json.loads((text_run / "export.json").read_text())
    assert record["adapters_merged"] is True and record["max_abs_diff"] <= 1e-4
    assert record["inputs"] == ["input_ids", "attention_mask"] and record["exporter"] == "dynamo"
    # Checked on shapes other than the traced one: the batch and sequence axes are dynamic.
    assert len({tuple(s) for s in record["checked_shapes"]}) == 3

    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    torch_model = load_run(text_run)
    assert json.loads(props["transferkit.classes"]) == torch_model.classes

    texts = [t for t, _ in make_sentences(30, seed=9)] + ["good " * 200]  # the last one is truncated
    onnx_model = OnnxPredictor(text_run, out)
    np.testing.assert_allclose(onnx_model.predict_proba(texts), torch_model.predict_proba(texts), atol=1e-5)
    assert onnx_model.truncated(["good film", "good " * 200]) == [False, True]

    card = (text_run / "README.md").read_text()
    assert "## Exported" in card and "adapters merged" in card and "## Limitations" in card


def test_image_export_matches_pytorch(image_run):
    result = export_onnx(image_run)
    assert result["path"] == str(image_run / "model.onnx") and result["max_abs_diff"] <= 1e-4
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8) for i in range(5)]
    np.testing.assert_allclose(OnnxPredictor(image_run).predict_proba(images), load_run(image_run).predict_proba(images),
                               atol=1e-5)


def test_every_finished_run_has_a_model_card(text_run):
    card = (text_run / "README.md").read_text()
    metrics = json.loads((text_run / "metrics.json").read_text())
    assert f"{100 * metrics['test']['accuracy']:.2f}%" in card
    assert "`neg`, `pos`" in card and "truncated" in card


@pytest.mark.parametrize("argv, message", [
    (["export", "{missing}"], "does not exist"),
    (["export", "{run}", "--out", "{tmp}/model.bin"], "must end in .onnx"),
    (["export", "{run}", "--tolerance", "0"], "--tolerance must be positive"),
])
def test_export_errors_are_one_line(argv, message, text_run, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "nope", run=text_run, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_export_above_tolerance_is_not_kept(text_run, tmp_path, capsys):
    out = tmp_path / "strict.onnx"
    assert main(["export", str(text_run), "--out", str(out), "--tolerance", "1e-30"]) == 2
    assert "above the tolerance" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.onnx"))
