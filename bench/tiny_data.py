"""Tiny labelled sentence files for the benchmark scripts' smoke runs (tests only; never reported)."""

from __future__ import annotations

import random
from pathlib import Path


def tiny_sentences(folder: Path, counts=(("train", 64), ("val", 16), ("test", 16))) -> dict:
    rng = random.Random(0)
    words = {1: ["good", "great", "fine"], 0: ["bad", "poor", "awful"]}
    files = {}
    for name, count in counts:
        rows = ["sentence\tlabel"]
        for i in range(count):
            label = i % 2
            rows.append(f"the movie was {rng.choice(words[label])}\t{label}")
        path = Path(folder) / f"{name}.tsv"
        path.write_text("\n".join(rows) + "\n")
        files[name] = str(path)
    return files
