"""Knowledge distillation: the loss's arithmetic, the teacher's logits routed by example index, the
`distill` command end to end, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transferkit.cli import main
from transferkit.objectives import CrossEntropyObjective
from transferkit.objectives.distillation import DistillationObjective, distillation_loss

from .conftest import make_sentences, write_table


def test_kd_loss_is_cross_entropy_at_alpha_one_and_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(distillation_loss(student, teacher, labels, 1.0, 3.0), F.cross_entropy(student, labels))

    alpha, T = 0.3, 2.5
    s, t = student.numpy().astype(np.float64), teacher.numpy().astype(np.float64)

    def log_softmax(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    ce = -log_softmax(s)[np.arange(6), labels.numpy()].mean()
    p_t = np.exp(log_softmax(t / T))
    kl = (p_t * (np.log(p_t) - log_softmax(s / T))).sum(1).mean()
    expected = alpha * ce + (1 - alpha) * T * T * kl
    assert distillation_loss(student, teacher, labels, alpha, T).item() == pytest.approx(expected, rel=1e-5)


def test_the_soft_term_uses_each_examples_own_teacher_row():
    teacher_rows = torch.randn(10, 3)

    class EchoTeacher(torch.nn.Module):  # predicts exactly the teacher's logits for the examples it is given
        def forward(self, index):
            return teacher_rows[index]

    objective = DistillationObjective(CrossEntropyObjective(), teacher_rows, alpha=0.0, temperature=2.0)
    indices = np.array([7, 2, 5])
    batch = {"inputs": {"index": torch.as_tensor(indices)}, "labels": torch.tensor([0, 1, 2]), "indices": indices}
    loss, _ = objective(EchoTeacher(), batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    shuffled = {**batch, "indices": np.array([2, 5, 7])}  # the wrong rows: the student no longer matches
    assert objective(EchoTeacher(), shuffled)[0].item() > 0.01


@pytest.fixture(scope="module")
def teacher_run(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    rows = make_sentences(200, seed=4)
    write_table(root / "train.csv", rows[:140])
    write_table(root / "test.csv", rows[140:])
    assert main(["fit", "--train", str(root / "train.csv"), "--test", str(root / "test.csv"), "--model", str(tiny_bert_dir),
                 "--epochs", "3", "--lr", "1e-3", "--no-baseline", "--out", str(root / "run")]) == 0
    return root


def test_distill_writes_a_run_that_compares_student_and_teacher(teacher_run, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_run / "run"), "--student", str(tiny_bert_dir),
                 "--data", str(teacher_run / "train.csv"), "--test", str(teacher_run / "test.csv"),
                 "--strategy", "linear-probe", "--epochs", "2", "--distill-alpha", "0.2", "--distill-temperature", "3",
                 "--no-baseline", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["distillation"]
    teacher_metrics = json.loads((teacher_run / "run" / "metrics.json").read_text())
    # The teacher is scored on the student's test split: here the same file as its own test split.
    assert record["teacher_test"]["accuracy"] == teacher_metrics["test"]["accuracy"]
    assert record["alpha"] == 0.2 and record["temperature"] == 3.0
    assert record["teacher_latency_ms"] > 0 and record["student_latency_ms"] > 0
    assert record["student_parameters"] == record["teacher_parameters"]  # same architecture here
    assert (out / "model" / "model.safetensors").is_file()


def test_distill_errors(teacher_run, tiny_bert_dir, image_folder, tmp_path, capsys):
    three = write_table(tmp_path / "three.csv", [(t, lab) for t, lab in make_sentences(30)] + [("so so film", "meh")] * 10)
    cases = [
        (["distill", "--student", str(tiny_bert_dir), "--data", str(three)], "needs --teacher"),
        (["distill", "--teacher", str(tmp_path / "none"), "--student", str(tiny_bert_dir), "--data", str(three)],
         "does not exist"),
        (["distill", "--teacher", str(teacher_run / "run"), "--student", str(tiny_bert_dir), "--data", str(three)],
         "only in the data ['meh']"),
        (["distill", "--teacher", str(teacher_run / "run"), "--student", str(tiny_bert_dir),
          "--data", str(teacher_run / "train.csv"), "--mixup", "0.2"], "'teacher' and 'mixup'"),
        (["distill", "--teacher", str(teacher_run / "run"), "--student", str(tiny_bert_dir),
          "--data", str(teacher_run / "train.csv"), "--distill-alpha", "1.5"], "distill_alpha"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def test_a_student_with_fewer_layers_reloads_with_fewer_layers(teacher_run, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["distill", "--teacher", str(teacher_run / "run"), "--student", str(tiny_bert_dir), "--keep-layers", "1",
                 "--data", str(teacher_run / "train.csv"), "--test", str(teacher_run / "test.csv"), "--epochs", "2",
                 "--lr", "1e-3", "--no-baseline", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["student_parameters"] < metrics["distillation"]["teacher_parameters"]
    from transferkit import load_run

    student = load_run(out)
    assert student.model.backbone.encoder.config.num_hidden_layers == 1
    assert len(student.model.backbone.encoder.encoder.layer) == 1
    # The reloaded one-layer model reproduces the run's own test accuracy.
    assert main(["evaluate", str(out), "--test", str(teacher_run / "test.csv")]) == 0
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in capsys.readouterr().out

    assert main(["fit", "--train", str(teacher_run / "train.csv"), "--model", str(tiny_bert_dir), "--keep-layers", "3",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "has 2 layers: choose 1 to 2" in capsys.readouterr().err


def test_unlabelled_transfer_examples_get_only_the_soft_term():
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)
    labels = torch.tensor([0, -1, 2, -1, 1, 1])

    class Fixed(torch.nn.Module):
        def forward(self):
            return student

    objective = DistillationObjective(CrossEntropyObjective(), teacher, alpha=0.4, temperature=2.0)
    loss, _ = objective(Fixed(), {"inputs": {}, "labels": labels, "indices": np.arange(6)})
    known = labels >= 0
    expected = 0.4 * F.cross_entropy(student[known], labels[known]) + 0.6 * 4.0 * F.kl_div(
        F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="batchmean")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distill_with_unlabelled_transfer_data(teacher_run, tiny_bert_dir, tmp_path, capsys):
    transfer = tmp_path / "transfer.csv"
    transfer.write_text("text\n" + "\n".join(t for t, _ in make_sentences(80, seed=12)) + "\n")
    out = tmp_path / "with-transfer"
    assert main(["distill", "--teacher", str(teacher_run / "run"), "--student", str(tiny_bert_dir),
                 "--data", str(teacher_run / "train.csv"), "--distill-data", str(transfer), "--epochs", "1",
                 "--no-baseline", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["distillation"]["transfer_examples"] == 80
    assert main(["fit", "--train", str(teacher_run / "train.csv"), "--model", str(tiny_bert_dir),
                 "--distill-data", str(transfer), "--out", str(tmp_path / "bad")]) == 2
    assert "needs a 'teacher'" in capsys.readouterr().err
