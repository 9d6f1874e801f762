"""The benchmark scripts start and produce their tables on a tiny configuration (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import make_stripes

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from distill import write_idx  # noqa: E402


def test_throughput_benchmark_runs_on_a_tiny_model(tiny_bert_dir, tmp_path):
    results = tmp_path / "throughput.json"
    process = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--tiny", "--model", str(tiny_bert_dir), "--only", "trainer", "ddp",
         "agreement", "--agreement-strategies", "lora", "--seeds", "3",
         "--strategies", "full", "freeze-bottom", "--freeze-layers", "2", "--precisions", "fp32",
         "--results", str(results), "--no-doc"],
        capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
    assert "transferkit vs HF Trainer" in process.stdout and "| full | fp32 |" in process.stdout
    assert "Data-parallel" in process.stdout
    saved = json.loads(results.read_text())
    full = next(r for r in saved["trainer"] if r["strategy"] == "full")
    assert full["ours_per_s"] > 0 and full["trainer_per_s"] > 0 and full["mfu"] > 0
    frozen = next(r for r in saved["trainer"] if r["strategy"] == "freeze-bottom (k=2)")
    assert "ratio_later_epochs" in frozen and frozen["cache_speedup_later_epochs"] > 0
    assert [r["processes"] for r in saved["ddp"]] == [1, 2]
    assert saved["machine"]["peak_gflops"]["fp32"] > 0
    assert [r["seed"] for r in saved["agreement"][0]["runs"]] == [3]
    assert "| lora | " in process.stdout and "Accuracy and speed over seeds" in process.stdout


def test_serve_benchmark_runs_on_a_tiny_model(tiny_bert_dir, tmp_path):
    results = tmp_path / "serve.json"
    process = subprocess.run(
        [sys.executable, str(BENCH / "serve.py"), "--tiny", "--model", str(tiny_bert_dir), "--concurrency", "1", "4",
         "--requests", "12", "--seconds", "5", "--repeats", "2", "--results", str(results), "--no-doc"],
        capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
    assert "| batching on (torch) | 4 |" in process.stdout and "ONNX Runtime vs PyTorch" in process.stdout
    saved = json.loads(results.read_text())
    assert len(saved["serving"]) == 6 and all(r["failures"] == 0 and r["rps"] > 0 for r in saved["serving"])
    assert [r["batch"] for r in saved["latency"]] == [1, 32]


def test_ensemble_and_distill_benchmarks_run_on_a_tiny_model(tiny_bert_dir, tiny_vit_dir, tmp_path):
    images, labels = make_stripes(120, size=16)
    idx = tmp_path / "stripes-images-idx3-ubyte"
    write_idx(idx, images)
    write_idx(tmp_path / "stripes-labels-idx1-ubyte", np.array([label == "vertical" for label in labels], dtype=np.uint8))
    image_flags = ["--image-data", str(idx), "--image-model", str(tiny_vit_dir), "--image-examples", "40",
                   "--image-transfer", "24", "--image-epochs", "1", "--keep", "1", "--examples", "40", "--transfer", "16"]
    for script, extra, expected in (("ensemble.py", [], "| ensemble: stack |"),
                                    ("distill.py", image_flags, "| 1 layers, distilled |")):
        results = tmp_path / f"{script}.json"
        process = subprocess.run(
            [sys.executable, str(BENCH / script), "--tiny", "--model", str(tiny_bert_dir), "--examples", "64",
             "--epochs", "1", *extra, "--results", str(results), "--no-doc"],
            capture_output=True, text=True, timeout=600)
        assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
        assert expected in process.stdout
        saved = json.loads(results.read_text())
        if script == "ensemble.py":
            assert [e["method"] for e in saved["ensembles"]] == ["vote", "average", "weighted", "stack", "soup"]
            assert len(saved["members"]) == 4
        else:
            assert saved["text"]["transfer"] == 16 and saved["image"]["transfer"] == 24
            for pair in ("text", "image"):
                row = saved[pair]["students"][0]
                assert row["speedup"] > 0 and 0 <= row["alone_test_accuracy"] <= 1 and 0 <= row["distilled_test_accuracy"] <= 1


def test_imbalance_benchmark_runs_on_a_tiny_model(tiny_vit_dir, tmp_path):
    images, labels = make_stripes(120, size=16)
    idx = tmp_path / "stripes-images-idx3-ubyte"
    write_idx(idx, images)
    write_idx(tmp_path / "stripes-labels-idx1-ubyte", np.array([label == "vertical" for label in labels], dtype=np.uint8))
    results = tmp_path / "imbalance.json"
    process = subprocess.run(
        [sys.executable, str(BENCH / "imbalance.py"), "--image-data", str(idx), "--model", str(tiny_vit_dir),
         "--image-size", "16", "--n-max", "30", "--ratio", "5", "--epochs", "1", "--methods", "none", "logit-adjusted",
         "--seeds", "0", "1", "--results", str(results), "--no-doc"], capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
    saved = json.loads(results.read_text())["ratio5-n30-1ep"]
    assert saved["counts"] == [30, 6] and saved["val_counts"] == [4, 1]
    assert [(r["method"], r["seed"]) for r in saved["rows"]] == [("none", 0), ("logit-adjusted", 0), ("none", 1),
                                                                  ("logit-adjusted", 1)]
    assert all(0 <= r["tail_recall"] <= 1 and 0 <= r["worst_recall"] <= r["accuracy"] for r in saved["rows"])
    assert "| `--logit-adjustment 1` |" in process.stdout and "imbalance ratio 5:" in process.stdout


def test_pretrain_benchmark_runs_on_a_tiny_model(tiny_bert_dir, tmp_path):
    results = tmp_path / "pretrain.json"
    process = subprocess.run(
        [sys.executable, str(BENCH / "pretrain.py"), "--tiny", "--model", str(tiny_bert_dir), "--unlabelled", "64",
         "--labels", "16", "--epochs", "1", "--seeds", "0", "1", "--results", str(results), "--no-doc"],
        capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
    assert "| adapted |" in process.stdout and "held-out masked-token loss" in process.stdout
    saved = json.loads(results.read_text())
    assert [(r["encoder"], r["seed"]) for r in saved["runs"]] == [("original", 0), ("adapted", 0), ("original", 1), ("adapted", 1)]


def test_adapt_benchmark_runs_on_a_tiny_model(tiny_bert_dir, tiny_vit_dir, tmp_path):
    results = tmp_path / "adapt.json"
    process = subprocess.run(
        [sys.executable, str(BENCH / "adapt.py"), "--tiny", "--model", str(tiny_bert_dir), "--image-model", str(tiny_vit_dir),
         "--methods", "source-only", "dann", "--epochs", "1", "--image-epochs", "1", "--image-examples", "40",
         "--results", str(results), "--no-doc"],
        capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
    assert "| dann |" in process.stdout and "vs source-only" in process.stdout
    saved = json.loads(results.read_text())
    for pair in ("text", "image"):
        assert [r["method"] for r in saved[pair]["runs"]] == ["source-only", "dann"]
        assert all(0 <= r["target_accuracy"] <= 1 for r in saved[pair]["runs"])


def test_multitask_benchmark_runs_on_tiny_models(tiny_bert_dir, tiny_vit_dir, tmp_path):
    results = tmp_path / "multitask.json"
    process = subprocess.run(
        [sys.executable, str(BENCH / "multitask.py"), "--tiny", "--model", str(tiny_bert_dir), "--image-model",
         str(tiny_vit_dir), "--weightings", "equal", "pcgrad", "--results", str(results), "--no-doc"],
        capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
    assert "| multi-task, hard sharing, pcgrad |" in process.stdout and "| multi-task, soft sharing, equal |" in process.stdout
    saved = json.loads(results.read_text())
    for pair in ("text", "image"):
        assert [r["weighting"] for r in saved[pair]["runs"]] == ["equal", "pcgrad", "equal"]
        assert all(0 <= a <= 1 for r in saved[pair]["runs"] for a in r["accuracy"].values())


def test_federated_benchmark_runs_on_a_tiny_model(tiny_bert_dir, tmp_path):
    results = tmp_path / "federated.json"
    process = subprocess.run(
        [sys.executable, str(BENCH / "federated.py"), "--tiny", "--model", str(tiny_bert_dir), "--only", "text",
         "--clients", "2", "--rounds", "1", "--partitions", "iid", "--server-lrs", "2", "--no-attack",
         "--batch-divisors", "1", "--lr-multipliers", "1", "2", "--round-schedules", "cosine", "--results", str(results),
         "--no-doc"],
        capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:] + process.stdout[-3000:]
    saved = json.loads(results.read_text())["text"]
    central = saved["rows"]["centralised"]
    assert "| FedAvg, client LR cosine over rounds, IID |" in process.stdout
    assert f"| centralised, pooled data (84 examples), 1 epochs, batch {central['batch_size']}, lr {central['lr']:g} |" in process.stdout
    # ... as many as the two clients train on together: each holds out 15% for validation and 15% for its test
    assert central["train_examples"] == 84
    # Both sides tried the same batch sizes and LRs; the federated rows all use the pair chosen on the IID split.
    grid = {f"16 @ lr {lr:g}" for lr in (5e-3, 1e-2)}  # one batch size keeps this smoke run short
    assert set(central["batch_sweep"]) == set(saved["rows"]["iid"]["batch_sweep"]) == grid
    assert saved["federated_batch_size"] == saved["rows"]["iid"]["batch_size"] == 16
    assert saved["federated_lr"] == saved["rows"]["iid"]["lr"] == saved["rows"]["iid-fedavgm"]["lr"]
    assert "Batch size and client LR, chosen by validation" in process.stdout
    assert "| FedAvgM (server LR 2, momentum 0.9), client LR cosine over rounds, IID |" in process.stdout
    rows = json.loads(results.read_text())["text"]["rows"]
    assert set(rows) == {"centralised", "iid", "iid-fedavgm"} and rows["iid-fedavgm"]["aggregator"] == "fedavgm"
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())
    # The federations ran with the clients' LR decayed across rounds (the run's metrics record it).
    assert saved["federated_round_schedule"] == rows["iid"]["round_schedule"] == rows["iid-fedavgm"]["round_schedule"] == "cosine"


def test_federated_benchmark_table_names_the_chosen_round_schedule():
    sys.path.insert(0, str(BENCH))
    import federated

    row = {"test_accuracy": 0.8, "personalisation_gain_per_client": {}, "bytes_per_round": 1e6, "exchanged_fraction": 0.01,
           "seconds": 10, "aggregator": "fedavg", "round_schedule": "cosine"}
    pair = {"model": "m", "strategy": "full", "examples": 100, "clients": 2, "rounds": 3, "federated_batch_size": 16,
            "federated_lr": 0.003, "federated_round_schedule": "cosine",
            "rows": {"centralised": {"test_accuracy": 0.81, "seconds": 5, "batch_sweep": {"16 @ lr 0.001": 0.7, "16 @ lr 0.003": 0.6}},
                     "iid": {**row, "batch_sweep": {"16 @ lr 0.001, constant over rounds": 0.5,
                                                    "16 @ lr 0.003, cosine over rounds": 0.75}}}}
    table = federated.table({"machine": "here", "date": "today", "image": pair})
    assert "| FedAvg, client LR cosine over rounds, IID | 0.8000 | -1.00 pts |" in table
    assert ("Batch size and client LR (federated: and the decay of the clients' LR across rounds, `round_schedule`), "
            "chosen by validation accuracy") in table
    assert "used by every federated row, 16 @ lr 0.003, cosine over rounds)" in table
    assert "federated 16 @ lr 0.001, constant over rounds: 0.5000, 16 @ lr 0.003, cosine over rounds: 0.7500." in table


def test_federated_benchmark_ablation_reuses_the_recorded_pair(tmp_path, monkeypatch):
    """The optimiser-state ablation (reset vs keep) at the batch size and LR the recorded pair chose, once per seed.
    Its federations are the same `run_setting` calls the smoke run above makes for real (a Flower simulation each);
    here they are recorded instead of run, which keeps two simulations out of the suite."""
    import argparse

    import federated

    calls = []

    def run_setting(name, recipe, folder, args, **options):
        calls.append((name, recipe, options))
        keep = options["client_optimizer_state"] == "keep"
        return {"test_accuracy": 0.75 + 0.1 * keep, "best_val_accuracy": 0.7, "seconds": 1.0}

    monkeypatch.setattr(federated, "run_setting", run_setting)
    args = argparse.Namespace(optimizer_state_seeds=[0, 3])
    pair = {"federated_batch_size": 8, "federated_lr": 0.01}
    ablation = federated.run_optimizer_state_ablation(args, tmp_path, "text", {"batch_size": 32, "lr": 5e-4, "model": "m"},
                                                      pair)
    assert [(c[1]["batch_size"], c[1]["lr"], c[1]["seed"], c[2]) for c in calls] == [
        (8, 0.01, seed, {"partitioner": "iid", "client_optimizer_state": mode}) for seed in (0, 3) for mode in ("reset", "keep")]
    assert (ablation["batch_size"], ablation["lr"]) == (8, 0.01)
    table = "\n".join(federated.optimizer_state_table({"machine": "here", "text-optimizer-state": ablation}))
    assert "| kept (`client_optimizer_state: keep`) | 0.8500 / 0.7000 | 0.8500 / 0.7000 | 0.8500 |" in table
    assert "| reset each round (default) | 0.7500 / 0.7000 | 0.7500 / 0.7000 | 0.7500 |" in table
    assert "batch 8, lr 0.01" in table


def test_federated_benchmark_runs_each_round_schedule_candidate_once_per_seed(tmp_path, monkeypatch):
    """--round-schedule-seeds: FedAvg IID at the recorded batch size, each SCHEDULE@M candidate per seed (recorded
    instead of run, as above)."""
    import argparse

    import federated

    calls = []

    def run_setting(name, recipe, folder, args, **options):
        calls.append((recipe["batch_size"], recipe["lr"], recipe["seed"], options))
        return {"test_accuracy": 0.7 + 0.1 * (options["round_schedule"] == "cosine"), "best_val_accuracy": 0.8,
                "seconds": 1.0}

    def centralised(name, recipe, folder, args):
        calls.append(("centralised", recipe["batch_size"], recipe["lr"], recipe["seed"]))
        return {"test_accuracy": 0.84 + 0.02 * (recipe["seed"] == 2), "best_val_accuracy": 0.9}

    monkeypatch.setattr(federated, "run_setting", run_setting)
    monkeypatch.setattr(federated, "centralised", centralised)
    args = argparse.Namespace(round_schedule_seeds=[0, 2], schedule_candidates=["constant", "cosine@3", "cosine@3+keep"])
    pair = {"federated_batch_size": 16, "rows": {"centralised": {"batch_size": 16, "lr": 3e-3, "test_accuracy": 0.9}}}
    ablation = federated.run_round_schedule_seeds(args, tmp_path, "image", {"batch_size": 64, "lr": 1e-3}, pair)
    assert calls == [call for seed in (0, 2) for call in (
        ("centralised", 16, 3e-3, seed),
        *[(16, lr, seed, {"partitioner": "iid", "round_schedule": schedule, "client_optimizer_state": optimizer})
          for schedule, lr, optimizer in (("constant", 1e-3, "reset"), ("cosine", 3e-3, "reset"), ("cosine", 3e-3, "keep"))])]
    results = {"machine": "here", "image-round-schedule": ablation, "image": pair}
    table = "\n".join(federated.round_schedule_table(results))
    # The gaps are to the centralised runs' mean over the same seeds (0.85), not to the pair's one run (0.9).
    assert "| centralised, pooled data, batch 16 @ lr 0.003 | 0.8400 / 0.9000 | 0.8600 / 0.9000 | 0.8500 | 0.9000 | - |" in table
    assert "| cosine over rounds @ lr 0.003 | 0.8000 / 0.8000 | 0.8000 / 0.8000 | 0.8000 | 0.8000 | -5.00 pts |" in table
    assert "| constant over rounds @ lr 0.001 | 0.7000 / 0.8000 | 0.7000 / 0.8000 | 0.7000 | 0.8000 | -15.00 pts |" in table
    assert "| cosine over rounds @ lr 0.003, AdamW kept between rounds | 0.8000 / 0.8000 |" in table
    # --keep-recorded: a candidate and seed already in the table is taken from it; only the new candidate runs.
    calls.clear()
    args.schedule_candidates = ["cosine@3", "cosine@1+fedavgm:3"]
    again = federated.run_round_schedule_seeds(args, tmp_path, "image", {"batch_size": 64, "lr": 1e-3}, pair,
                                               recorded=ablation)
    assert calls == [(16, 1e-3, seed, {"partitioner": "iid", "round_schedule": "cosine", "client_optimizer_state": "reset",
                                       "aggregator": "fedavgm", "server_lr": 3.0}) for seed in (0, 2)]
    assert again["runs"]["cosine over rounds @ lr 0.003"] == ablation["runs"]["cosine over rounds @ lr 0.003"]
    assert "cosine over rounds @ lr 0.001, FedAvgM (server LR 3, momentum 0.9)" in again["runs"]
    calls.clear()  # a table recorded at another batch size is not reused
    federated.run_round_schedule_seeds(args, tmp_path, "image", {"batch_size": 64, "lr": 1e-3}, pair,
                                       recorded={**ablation, "batch_size": 64})
    assert len(calls) == 6
    for entry, message in (("cosine@3+momentum", r"the suffixes are \+keep and \+fedavgm"),
                           ("cosine@3+fedavgm:x", "fedavgm:1.0")):
        args.schedule_candidates = [entry]
        with pytest.raises(SystemExit, match=message):
            federated.run_round_schedule_seeds(args, tmp_path, "image", {"batch_size": 64, "lr": 1e-3}, pair)


def test_core_benchmark_says_when_an_inherited_recipe_no_longer_wins_the_grid():
    import core

    grid = core.EXPERIMENTS["sst2-8k"][3]["grid"]
    first, later = grid[0], grid[-1]
    results = {"sst2-8k": {"sweep": {core._recipe_key(first): {"val_accuracy": 0.86}}}}
    assert core._stale(core._recipe_key(first), "sst2-8k", results) == ""
    results["sst2-8k"]["sweep"][core._recipe_key(later)] = {"val_accuracy": 0.87}  # joined the grid and won
    assert core._recipe_key(later) in core._stale(core._recipe_key(first), "sst2-8k", results)
    assert core._stale(core._recipe_key(first), "no-such-grid", results) == ""
