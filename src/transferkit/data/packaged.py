"""Datasets known by name: found on disk where a package installed them, else downloaded upstream.

``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` puts the IDX files in
``/usr/share/datasets/fashion-mnist``; otherwise they are downloaded once from the authors' site
into ``~/.cache/transferkit/fashion-mnist`` (Xiao et al. 2017, MIT licence).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from ..errors import UserError
from .dataset import Examples
from .readers import read_idx

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": "train-images-idx3-ubyte.gz",
    "test": "t10k-images-idx3-ubyte.gz",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)

PACKAGED_DATASETS = ("fashion-mnist",)


def _cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERKIT_CACHE", Path.home() / ".cache" / "transferkit")) / "fashion-mnist"


def fashion_mnist_dir(download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST files, downloading them if no installed copy exists."""
    needed = [name for f in FASHION_MNIST_FILES.values() for name in (f, f.replace("images-idx3", "labels-idx1"))]
    candidates = [Path(os.environ["TRANSFERKIT_FASHION_MNIST"])] if "TRANSFERKIT_FASHION_MNIST" in os.environ else []
    candidates += [Path(d) for d in FASHION_MNIST_DIRS] + [_cache_dir()]
    for folder in candidates:
        if all((folder / name).is_file() for name in needed):
            return folder
    if not download:
        raise UserError("Fashion-MNIST is not installed: run 'apt-get install dataset-fashion-mnist' or set TRANSFERKIT_FASHION_MNIST to a folder with its IDX files")
    target = _cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    for name in needed:
        if (target / name).is_file():
            continue
        partial = target / (name + ".part")
        try:
            with urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=30) as response, open(partial, "wb") as out:
                out.write(response.read())
            partial.replace(target / name)
        except OSError:
            partial.unlink(missing_ok=True)
            raise UserError(
                "Fashion-MNIST is not installed and could not be downloaded: run 'apt-get install dataset-fashion-mnist' "
                "or put its four IDX files in a folder and set TRANSFERKIT_FASHION_MNIST to it"
            ) from None
    return target


def load_packaged(name: str) -> dict[str, Examples]:
    """The splits a packaged dataset ships with, by split name."""
    if name == "fashion-mnist":
        folder = fashion_mnist_dir()
        return {
            split: read_idx(folder / filename, class_names=FASHION_MNIST_CLASSES)
            for split, filename in FASHION_MNIST_FILES.items()
        }
    raise UserError(f"unknown packaged dataset '{name}': choose one of {', '.join(PACKAGED_DATASETS)}")
