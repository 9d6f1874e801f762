"""kill -9 at 10 seeded-random points of a tiny run (inside training steps, halfway through checkpoint
writes, between a checkpoint and its pointer, while caching features), resume each, and require the
same final metrics and bitwise the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ..conftest import make_sentences, write_table

FAULTS = Path(__file__).with_name("faults.py")
STEPS = 3 * 10  # 3 epochs of 160 examples in batches of 16
CHECKPOINT_EVERY = 4  # 2 mid-epoch checkpoints + 1 at each epoch end = 9 checkpoints


def _kill_points(count: int = 10, seed: int = 2026) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    points = [("train-step", n) for n in rng.sample(range(1, STEPS + 1), 4)]
    points += [("weights-write", n) for n in rng.sample(range(1, 10), 3)]
    points += [("pointer-write", n) for n in rng.sample(range(1, 10), 2)]
    points += [("feature-batch", rng.randint(1, 3))]
    return points[:count]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("kill")
    rows = make_sentences(240, seed=3)
    files = {name: write_table(root / f"{name}.csv", part)
             for name, part in (("train", rows[:160]), ("val", rows[160:200]), ("test", rows[200:]))}
    args = ["fit", "--train", str(files["train"]), "--val", str(files["val"]), "--test", str(files["test"]),
            "--model", str(tiny_bert_dir), "--epochs", "3", "--batch-size", "16", "--lr", "1e-3",
            "--baseline-epochs", "2", "--patience", "none", "--checkpoint-every", str(CHECKPOINT_EVERY)]
    reference = root / "reference"
    subprocess.run([sys.executable, "-m", "transferkit", *args, "--out", str(reference)], check=True,
                   capture_output=True)
    return root, args, reference


def _outcome(run: Path) -> tuple[dict, dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics, load_file(run / "model" / "model.safetensors")


POINTS = _kill_points()


def _kill_then_resume(root: Path, args: list[str], point: tuple[str, int]) -> dict:
    """Kill a run at ``point``, then resume it; what the test checks, recorded as it happens."""
    run = root / f"{point[0]}-{point[1]}"
    killed = subprocess.run([sys.executable, str(FAULTS), point[0], str(point[1]), "--", *args, "--out", str(run)],
                            capture_output=True, text=True)
    seen = {"run": run, "killed": killed, "finished_before_resume": (run / "metrics.json").exists(),
            "had_checkpoint": (run / "checkpoints" / "latest").is_file()}
    if (run / "config.yaml").is_file():
        resume = [sys.executable, "-m", "transferkit", "fit", "--out", str(run), "--resume"]
    else:  # killed before the run directory existed: starting again is the resume
        resume = [sys.executable, "-m", "transferkit", *args, "--out", str(run)]
    seen["resumed"] = subprocess.run(resume, capture_output=True, text=True)
    return seen


@pytest.fixture(scope="module")
def outcomes(setup) -> dict:
    # Two points at a time: each point is two short processes (the killed run, its resume) that spend most of
    # their time starting Python and importing libraries, which two cores run side by side. The kill points are
    # counted events, not timings, and each process keeps its own thread count, so results are unchanged.
    root, args, _ = setup
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(POINTS, pool.map(lambda point: _kill_then_resume(root, args, point), POINTS)))


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_kill_minus_9_then_resume_gives_the_uninterrupted_result(setup, outcomes, point):
    reference = setup[2]
    seen = outcomes[point]
    assert seen["killed"].returncode == -signal.SIGKILL, seen["killed"].stderr[-2000:]
    assert not seen["finished_before_resume"]
    resumed = seen["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if seen["had_checkpoint"]:  # it continued from the checkpoint rather than starting the fine-tuning again
        assert "fine-tune (full):   0%" not in resumed.stderr

    expected_metrics, expected_weights = _outcome(reference)
    metrics, weights = _outcome(seen["run"])
    assert metrics["test"] == expected_metrics["test"]
    assert metrics["baseline"]["test"] == expected_metrics["baseline"]["test"]
    assert [h["val_loss"] for h in metrics["history"]] == [h["val_loss"] for h in expected_metrics["history"]]
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert weights[name].equal(tensor), name
