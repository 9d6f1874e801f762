"""Data-parallel fine-tuning: two processes under torchrun give the one-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import transferkit
from transferkit.engine.batches import Batches


def test_shards_of_each_batch_cover_the_one_process_batch():
    batches = Batches(list(range(37)), np.arange(37) % 2, lambda prepared, idx: {"x": torch.as_tensor(idx)}, 8,
                      shuffle=True, seed=3, lengths=list(range(37)))
    whole = [b["indices"].tolist() for b in batches.iterate(1)]
    parts = [[b["indices"].tolist() for b in batches.iterate(1, shard=(rank, 2))] for rank in range(2)]
    assert [a + b for a, b in zip(*parts)] == whole
    assert all(abs(len(a) - len(b)) <= 1 for a, b in zip(*parts))


@pytest.fixture()
def dropout_free_bert(tmp_path, tiny_bert_dir):
    """The tiny BERT without dropout, so one process and two see exactly the same computation."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path / "bert-no-dropout"
    config = BertConfig.from_pretrained(tiny_bert_dir)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    BertTokenizerFast.from_pretrained(tiny_bert_dir).save_pretrained(directory)
    return directory


def test_two_processes_match_one(dropout_free_bert, text_data, tmp_path):
    common = ["--model", str(dropout_free_bert), "--train", str(text_data["train"]), "--val", str(text_data["val"]),
              "--test", str(text_data["test"]), "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
              "--dropout", "0", "--no-baseline", "--patience", "none"]
    single = tmp_path / "single"
    transferkit.finetune(model=str(dropout_free_bert), train=str(text_data["train"]), val=str(text_data["val"]),
                         test=str(text_data["test"]), epochs=2, batch_size=16, lr=1e-3, dropout=0.0, baseline=False,
                         patience=None, out=str(single))
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", "29517", "-m", "transferkit", "fit", *common, "--out", str(double)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((double / "metrics.json").read_text())
    # Same batches, gradients averaged over the halves: equal up to float summation order.
    assert [h["val_loss"] for h in two["history"]] == pytest.approx([h["val_loss"] for h in one["history"]], abs=1e-4)
    assert two["test"]["accuracy"] == one["test"]["accuracy"]
    # Only process 0 writes: one log line per epoch record, one model.
    epochs = [r for r in map(json.loads, (double / "log.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert len(epochs) == 2
