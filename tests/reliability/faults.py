"""Run the transferkit CLI with a SIGKILL planted at a chosen point (used by test_kill_and_resume).

    python faults.py POINT N -- fit ARGS...

POINT is where the process kills itself, at the N-th time it gets there:
  train-step        right after an optimiser step (state changed in memory, not yet saved)
  weights-write     halfway through writing a checkpoint's weights file
  pointer-write     after a checkpoint folder is in place, before its pointer file is replaced
  feature-batch     while caching frozen features for the linear-probe baseline
"""

import os
import signal
import sys

from transferkit.cli import main
from transferkit.engine import checkpoint, feature_cache, loop

point, target = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1:]
count = {"n": 0}


def arrive() -> None:
    count["n"] += 1
    if count["n"] == target:
        os.kill(os.getpid(), signal.SIGKILL)


if point == "train-step":
    real_step = loop.Engine._train_step

    def train_step(self, batch, epoch, step):
        loss = real_step(self, batch, epoch, step)
        if self.description.startswith("fine-tune"):
            arrive()
        return loss

    loop.Engine._train_step = train_step
elif point == "weights-write":
    real_save = checkpoint.save_weights

    def save_weights(model, path):
        real_save(model, path)
        if count["n"] + 1 == target:
            data = path.read_bytes()  # leave a half-written file behind, as a kill mid-write would
            path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
        arrive()

    checkpoint.save_weights = save_weights
elif point == "pointer-write":
    real_write = checkpoint.atomic_write_text

    def atomic_write_text(path, text):
        if path.name in ("latest", "best"):
            arrive()
        real_write(path, text)

    checkpoint.atomic_write_text = atomic_write_text
elif point == "feature-batch":
    real_features = feature_cache.compute_features

    def compute_features(*args, **kwargs):
        arrive()
        return real_features(*args, **kwargs)

    feature_cache.compute_features = compute_features
else:
    sys.exit(f"unknown fault point {point}")

sys.exit(main(argv))
