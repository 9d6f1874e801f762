"""LP-FT (--head-init probe): fine-tuning starts from the linear probe's head instead of a random one."""

import pytest

import transferkit
from transferkit.cli import main
from transferkit.config import RunConfig
from transferkit.errors import UserError

from ..conftest import interrupt_then_resume


def _common(tiny_bert_dir, text_data, **extra):
    return dict(train=str(text_data["train"]), val=str(text_data["val"]), test=str(text_data["test"]),
                model=str(tiny_bert_dir), baseline_epochs=5, baseline_lr=1e-2, patience=None, **extra)


def test_fine_tuning_starts_from_the_probe_head(tiny_bert_dir, text_data, tmp_path):
    # A learning rate too small to move anything: the fine-tuned model is then the probe, prediction for prediction.
    metrics = transferkit.finetune(**_common(tiny_bert_dir, text_data, epochs=1, lr=1e-12, head_init="probe"),
                                   out=str(tmp_path / "lpft"))
    assert metrics["test"]["confusion_matrix"] == metrics["baseline"]["test"]["confusion_matrix"]
    assert metrics["history"][0]["val_accuracy"] == max(h["val_accuracy"] for h in metrics["baseline"]["history"])
    assert not (tmp_path / "lpft" / "cache").exists()  # the kept probe head left with the cache

    random_head = transferkit.finetune(**_common(tiny_bert_dir, text_data, epochs=1, lr=1e-12),
                                       out=str(tmp_path / "random"))
    assert random_head["history"][0]["val_loss"] != metrics["history"][0]["val_loss"]


def test_probe_head_without_the_baseline_report(tiny_bert_dir, text_data, tmp_path):
    metrics = transferkit.finetune(**_common(tiny_bert_dir, text_data, epochs=1, lr=1e-3, head_init="probe",
                                             baseline=False), out=str(tmp_path / "run"))
    assert "baseline" not in metrics and 0 <= metrics["test"]["accuracy"] <= 1


def test_lp_ft_run_resumes_to_the_same_result(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    common = _common(tiny_bert_dir, text_data, epochs=2, lr=1e-3, head_init="probe")
    reference = transferkit.finetune(**common, out=str(tmp_path / "reference"))
    resumed = interrupt_then_resume(monkeypatch, lambda out: transferkit.finetune(**common, out=str(out)),
                                    tmp_path / "resumed")
    assert resumed["test"] == reference["test"]


@pytest.mark.parametrize("overrides, message", [
    (dict(head_init="probe", strategy="linear-probe"), "linear-probe"),
    (dict(head_init="pretrained"), "head_init"),
])
def test_head_init_errors_name_the_field(overrides, message):
    with pytest.raises(UserError, match=message):
        RunConfig(train="t.csv", model="m", **overrides)


def test_cli_flag(tiny_bert_dir, text_data, tmp_path, capsys):
    assert main(["fit", "--train", str(text_data["train"]), "--model", str(tiny_bert_dir), "--head-init", "probe",
                 "--strategy", "linear-probe", "--out", str(tmp_path / "x")]) == 2
    assert "head_init" in capsys.readouterr().err
