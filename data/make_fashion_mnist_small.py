"""Writes tlkit/resources/fashion_mnist_small.npz, the small Fashion-MNIST subset embedded in tlkit.

Reads the original IDX files (gzip) of Fashion-MNIST, as shipped by Debian's
`dataset-fashion-mnist` package, and keeps, for each of the 10 classes, the first
100 training and 50 test images of a seeded permutation (seed 0): 1000 training
and 500 test images, uint8 28x28, with uint8 labels. Images keep the original
order of the permutation within each class; classes are concatenated in label order.

Usage (from the repository root):

    apt-get install dataset-fashion-mnist
    python data/make_fashion_mnist_small.py \
        --source /usr/share/datasets/fashion-mnist --output tlkit/resources/fashion_mnist_small.npz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np

from tlkit._io import atomic_path
from tlkit.data.catalog import FASHION_MNIST_CLASS_NAMES

CLASS_NAMES = FASHION_MNIST_CLASS_NAMES
TRAIN_PER_CLASS = 100
TEST_PER_CLASS = 50
SEED = 0


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzip IDX file (unsigned byte data) into a numpy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r}).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the first `per_class` examples of each class in a seeded permutation."""
    order = rng.permutation(len(labels))
    chosen = [order[labels[order] == c][:per_class] for c in range(len(CLASS_NAMES))]
    return np.concatenate(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parents[1]
        / "tlkit"
        / "resources"
        / "fashion_mnist_small.npz",
    )
    arguments = parser.parse_args()

    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, prefix, per_class in (
        ("train", "train", TRAIN_PER_CLASS),
        ("test", "t10k", TEST_PER_CLASS),
    ):
        images = read_idx(arguments.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(arguments.source / f"{prefix}-labels-idx1-ubyte.gz")
        index = first_per_class(labels, per_class, rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[index])
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[index])
    with atomic_path(arguments.output) as temporary:
        np.savez_compressed(temporary, **arrays)
    digest = hashlib.sha256(arguments.output.read_bytes()).hexdigest()
    for key, value in arrays.items():
        print(f"{key}: {value.shape} {value.dtype}")
    print(f"sha256 {digest}  {arguments.output}")


if __name__ == "__main__":
    main()
