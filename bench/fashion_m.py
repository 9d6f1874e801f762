"""Fashion-M: Fashion-MNIST shifted the way MNIST-M was made from MNIST (Ganin et al. 2016), reproducibly.

Each grey garment is blended with a random 28x28 patch of a colour photograph: every channel becomes
|patch - garment|, so the garment keeps its shape while colour and texture come from the photo. The
photos are the colour images scikit-image ships (astronaut, coffee, chelsea, rocket, ...; the
original used BSDS500, which is not installable offline). Written as IDX files (4-D, H x W x 3) with
their labels beside them, which every transferkit command reads.

    python bench/fashion_m.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def photos() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("Fashion-M needs scikit-image's bundled photos: pip install scikit-image") from None
    return [np.asarray(getattr(skimage.data, name)())[..., :3] for name in PHOTOS]


def blend(images: np.ndarray, seed: int) -> np.ndarray:
    """(N, 28, 28) uint8 grey -> (N, 28, 28, 3) uint8: |random photo patch - garment| per channel."""
    rng = np.random.default_rng(seed)
    sources = photos()
    out = np.empty((*images.shape, 3), dtype=np.uint8)
    h, w = images.shape[1:]
    for i, image in enumerate(images):
        photo = sources[rng.integers(len(sources))]
        top, left = rng.integers(photo.shape[0] - h), rng.integers(photo.shape[1] - w)
        patch = photo[top:top + h, left:left + w].astype(np.int16)
        out[i] = np.abs(patch - image[..., None].astype(np.int16)).astype(np.uint8)
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make(out: Path, seed: int = 0, source_dir: Path = FASHION) -> dict[str, Path]:
    """Fashion-M train and test IDX pairs in ``out``; returns the images files."""
    from transferkit.data.readers import parse_idx

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = parse_idx(source_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = parse_idx(source_dir / f"{prefix}-labels-idx1-ubyte.gz")
        target = out / f"fashion-m-{split}-images-idx3-ubyte.gz"
        write_idx(target, blend(images, seed + (split == "test")))
        write_idx(out / f"fashion-m-{split}-labels-idx1-ubyte.gz", labels)
        written[split] = target
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in make(args.out, args.seed).items():
        print(f"{split}: {path}")
