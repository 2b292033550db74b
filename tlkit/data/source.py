"""Turning a DATA argument (a folder or a dataset name) into a dataset.

The command line's `train`, `export` and `doctor` commands all take DATA; this
is the one place that decides what it means.
"""

from __future__ import annotations

from pathlib import Path

from tlkit.data.catalog import DatasetNotFoundError, list_datasets, load
from tlkit.data.directory import from_directory

DEMO_DATASET = "tf_flowers"
FALLBACK_DATASET = "fashion_mnist_small"


def resolve_data(data: str | None, validation_split: float = 0.2, seed: int = 42, log=print):
    """A dataset from a folder path, a catalog name, or the demo default.

    With no `data`, uses `tf_flowers` when it resolves (TLKIT_DATA_DIR, the
    cache, or a download) and falls back to the embedded Fashion-MNIST subset,
    saying which one it used and why.
    """
    if data is None:
        try:
            dataset = load(DEMO_DATASET, seed=seed)
            log(f"Data: {DEMO_DATASET} (real photos; the demo default).")
            return dataset
        except DatasetNotFoundError as error:
            first_line = str(error).splitlines()[0]
            log(
                f"Data: {DEMO_DATASET} is not available here ({first_line}). Using the "
                f"embedded {FALLBACK_DATASET} instead (28 px grey clothing: far from ImageNet, "
                "so transfer helps less). Set TLKIT_DATA_DIR to a folder with flower_photos/ "
                "to use real photos."
            )
            return load(FALLBACK_DATASET, seed=seed)
    if data_kind(data) == "folder":
        dataset = from_directory(data, validation_split=validation_split, seed=seed)
        log(f"Data: folder {data}: {dataset}.")
        return dataset
    dataset = load(data, seed=seed)
    log(f"Data: {data}: {dataset}.")
    return dataset


def data_kind(data: str) -> str:
    """Whether a DATA argument names an existing folder or a catalog dataset.

    Args:
        data: A folder path or a dataset name (see `tlkit.data.list_datasets`).

    Returns:
        `"folder"` for an existing path (checked first), else `"dataset"`.

    Raises:
        FileNotFoundError: If `data` is neither.
    """
    if Path(data).exists():
        return "folder"
    if data in list_datasets():
        return "dataset"
    raise FileNotFoundError(
        f"DATA is neither an existing folder nor a dataset name. Pass a folder with one "
        f"sub-folder of images per class, or one of {list_datasets()}. "
        f"Received: data={data!r}"
    )
