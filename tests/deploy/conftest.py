"""Finished runs to deploy (tiny random backbones through the real loading path) and a live server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from transferkit.cli import main

from ..conftest import make_sentences, make_stripes, write_table


@pytest.fixture(scope="session")
def text_run(tiny_bert_dir, tmp_path_factory) -> Path:
    """A LoRA run on the tiny BERT, so export has adapters to merge."""
    root = tmp_path_factory.mktemp("text-run")
    rows = make_sentences(160, seed=3)
    train = write_table(root / "train.csv", rows[:100])
    write_table(root / "test.csv", rows[100:])
    run = root / "run"
    assert main(["fit", "--train", str(train), "--val-fraction", "0.2", "--test", str(root / "test.csv"),
                 "--model", str(tiny_bert_dir), "--strategy", "lora", "--epochs", "1", "--lr", "1e-2",
                 "--no-baseline", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="session")
def image_run(tiny_vit_dir, tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("image-run")
    images, labels = make_stripes(40, size=16)
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / label / f"{i:03d}.png")
    run = root / "run"
    assert main(["fit", "--train", str(root / "images"), "--val-fraction", "0.2", "--test-fraction", "0.2",
                 "--model", str(tiny_vit_dir), "--epochs", "1", "--no-baseline", "--out", str(run)]) == 0
    return run


class LiveServer:
    """A real uvicorn server on an ephemeral loopback port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
