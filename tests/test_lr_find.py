import json

import numpy as np

from transferkit.cli import main
from transferkit.engine.lr_finder import suggest


def test_suggestion_is_the_steepest_descent():
    lrs = list(np.logspace(-6, 0, 60))
    losses = [1.0 if lr < 1e-4 else (0.2 if lr > 1e-2 else 1.0 - 0.4 * (np.log10(lr) + 4)) for lr in lrs]
    assert 1e-4 <= suggest(lrs, losses) <= 1e-2


def test_lr_find_cli_writes_plot_and_suggestion(tiny_bert_dir, text_data, tmp_path, capsys):
    out = tmp_path / "finder"
    assert main(["lr-find", "--train", str(text_data["train"]), "--model", str(tiny_bert_dir), "--steps", "30",
                 "--batch-size", "16", "--out", str(out)]) == 0
    summary = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 0
    assert 1e-7 <= summary["suggested_lr"] <= 1 and len(summary["lrs"]) == len(summary["losses"]) > 10
    assert "suggested learning rate" in capsys.readouterr().out
