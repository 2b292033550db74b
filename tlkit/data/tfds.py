"""tensorflow-datasets interop: use an image-classification dataset tfds already prepared.

`from_tfds` reads a dataset that `tfds` has already written to disk (it never
downloads) and exports its images once, as the original encoded bytes, into
class-per-folder files under the tlkit cache. From there it is an ordinary
file-based `ImageDataset` (`from_directory`), so the feature cache, the
corrupt-file checks and the seeded splits work exactly as for a folder.

Files rather than in-memory arrays because tfds image datasets often have
images of different sizes (tf_flowers), which one numpy array cannot hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tlkit._io import cache_dir
from tlkit.data.dataset import ImageDataset
from tlkit.data.directory import from_directory
from tlkit.data.errors import DatasetNotFoundError

__all__ = ["export_as_class_folders", "find_prepared", "from_tfds", "tfds_data_dirs"]

_SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
_COMPLETE_MARKER = ".tlkit-export-complete"


def tfds_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for prepared tfds datasets, in order.

    Args:
        data_dir: A tfds data folder to search first. Defaults to `None`.

    Returns:
        `data_dir` (when given), then `$TFDS_DATA_DIR` or, when it is unset,
        `~/tensorflow_datasets`.
    """
    folders = []
    if data_dir is not None:
        folders.append(Path(data_dir).expanduser())
    # tfds's own default: $TFDS_DATA_DIR when set, else ~/tensorflow_datasets.
    folders.append(Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser())
    return folders


def find_prepared(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Finds the folder of a dataset tfds has prepared on disk, without importing tfds.

    Args:
        name: The tfds name, optionally with a config (`"name/config"`).
        data_dir: A tfds data folder to search first. Defaults to `None`.

    Returns:
        The newest version folder holding `dataset_info.json`, or `None`.
    """
    for folder in tfds_data_dirs(data_dir):
        root = folder / name
        if not root.is_dir():
            continue
        # <data_dir>/<name>/<version>/ or <data_dir>/<name>/<config>/<version>/.
        found = [
            path
            for path in sorted(root.glob("*/dataset_info.json"))
            + sorted(root.glob("*/*/dataset_info.json"))
            if not path.parent.name.startswith("incomplete")  # tfds still writing it
        ]
        if found:
            return max(found, key=lambda path: _version_key(path.parent.name)).parent
    return None


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)) or (-1,)


def from_tfds(
    name: str,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    validation_split: float = 0.1,
    test_split: float = 0.1,
    seed: int | None = 42,
) -> ImageDataset:
    """Loads an image-classification dataset that tensorflow-datasets has on disk.

    Nothing is downloaded: prepare the dataset with `tfds.load(name)` (or copy
    its folder) first. The images are exported once into the tlkit cache
    (`$TLKIT_CACHE_DIR/tfds/...`), keyed by name, version and split.

    Args:
        name: A tfds dataset name such as "tf_flowers", optionally "name/config".
        split: One tfds split ("train", "test", ...) to use as the whole
            dataset, divided by `validation_split` and `test_split`. `None`
            uses every split: tfds's "train", "validation" (or "val") and
            "test" become tlkit's splits; a dataset with only "train" is
            divided as for a string. Defaults to `None`.
        data_dir: The tfds data folder. Defaults to `$TFDS_DATA_DIR`, then
            `~/tensorflow_datasets`.
        image_size: Default `image_size` for `to_dataset`. Defaults to `None`.
        validation_split: Share of each class for validation when dividing.
            Defaults to 0.1.
        test_split: Share of each class for test when dividing. Defaults to 0.1.
        seed: Seed of the division. Defaults to 42.

    Returns:
        A file-based `ImageDataset`; `info` holds the tfds description,
        citation, homepage and version.

    Raises:
        DatasetNotFoundError: If no prepared copy is on disk.
        ValueError: If the dataset has no image feature and class-label feature,
            or `split` is not one of its splits.
    """
    prepared = find_prepared(name, data_dir)
    if prepared is None:
        searched = ", ".join(str(folder) for folder in tfds_data_dirs(data_dir))
        raise DatasetNotFoundError(
            f"No prepared tensorflow-datasets copy of {name!r} was found in {searched}. "
            f"Prepare it once while online with `tensorflow_datasets.load({name!r})`, or pass "
            f"data_dir=... (the folder holding {name!r}). Received: name={name!r}"
        )
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(prepared))
    image_key, label_key = _classification_keys(tfds, builder, name)
    label_feature = builder.info.features[label_key]
    class_names = list(label_feature.names)
    available = sorted(builder.info.splits.keys())
    if split is not None and split not in available:
        raise ValueError(
            f"{name!r} has no split {split!r}; choose one of {available}, or None for all of "
            f"them. Received: split={split!r}"
        )
    if split is None:
        named = {key: _SPLIT_FOLDERS[key] for key in available if key in _SPLIT_FOLDERS}
        chosen = named if "train" in named and len(named) > 1 else None
    else:
        chosen = None
    export_splits = chosen or {split or "train": None}

    version = prepared.name
    safe_name = name.replace("/", "__")
    target = cache_dir() / "tfds" / safe_name / version / (split or "all")
    if not (target / _COMPLETE_MARKER).is_file():
        _export(tfds, builder, export_splits, image_key, label_key, class_names, target)
    info: dict[str, Any] = {
        "name": name,
        "source": f"tensorflow-datasets {name} {builder.info.version} ({prepared})",
        "homepage": builder.info.homepage,
        "citation": builder.info.citation,
        "notes": (
            f"tfds splits {sorted(export_splits)}"
            + ("" if chosen else f", divided {validation_split}/{test_split} with seed {seed}")
        ),
        "path": str(target),
    }
    if chosen:
        return from_directory(target, image_size=image_size, name=name, info=info)
    return from_directory(
        target,
        image_size=image_size,
        validation_split=validation_split,
        test_split=test_split,
        seed=seed,
        name=name,
        info=info,
    )


def _classification_keys(tfds, builder, name: str) -> tuple[str, str]:
    features = builder.info.features
    images = [key for key, value in features.items() if isinstance(value, tfds.features.Image)]
    labels = [key for key, value in features.items() if isinstance(value, tfds.features.ClassLabel)]
    if not images or not labels:
        raise ValueError(
            f"{name!r} is not an image-classification dataset: expected an Image feature and "
            f"a ClassLabel feature. Received: features={sorted(features.keys())}"
        )
    image_key = "image" if "image" in images else images[0]
    label_key = "label" if "label" in labels else labels[0]
    return image_key, label_key


def export_folder_name(class_name: str) -> str:
    """A file-system-safe folder name for a class (slashes and leading dots replaced)."""
    return re.sub(r"[/\\\x00]", "_", class_name).lstrip(".") or "_"


def _extension(encoded: bytes) -> str:
    if encoded.startswith(b"\x89PNG"):
        return ".png"
    if encoded.startswith(b"\xff\xd8"):
        return ".jpg"
    if encoded[:4] in (b"GIF8",):
        return ".gif"
    if encoded[:2] == b"BM":
        return ".bmp"
    return ".png"  # tfds encodes Image features it made from arrays as PNG.


def _export(tfds, builder, splits, image_key, label_key, class_names, target: Path) -> None:
    """Writes every image of `splits` under `target`; atomic by renaming a staging folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        counts: dict[str, int] = {}
        for tfds_split, folder in splits.items():
            root = staging / folder if folder else staging
            for class_name in class_names:
                (root / export_folder_name(class_name)).mkdir(parents=True, exist_ok=True)
            dataset = builder.as_dataset(
                split=tfds_split,
                decoders={image_key: tfds.decode.SkipDecoding()},
                shuffle_files=False,
            )
            count = 0
            for example in tfds.as_numpy(dataset):
                encoded = bytes(example[image_key])
                class_name = class_names[int(example[label_key])]
                path = (
                    root
                    / export_folder_name(class_name)
                    / f"{tfds_split}-{count:06d}{_extension(encoded)}"
                )
                path.write_bytes(encoded)
                count += 1
            counts[tfds_split] = count
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"examples": counts}))
        if target.exists():
            shutil.rmtree(target)  # An incomplete earlier export (no marker).
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_as_class_folders(
    name: str, target: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> Path | None:
    """Writes every image of a prepared tfds dataset into `target/<class>/` files.

    Used by `tlkit.data.load` to turn a tfds copy of a catalog dataset (such as
    tf_flowers) into the catalog's folder layout, once.

    Args:
        name: The tfds name.
        target: The folder to create; it must not exist yet.
        data_dir: A tfds data folder to search first. Defaults to `None`.

    Returns:
        `target`, or `None` when tfds has no prepared copy.

    Raises:
        ValueError: If the dataset is not image classification.
    """
    prepared = find_prepared(name, data_dir)
    if prepared is None:
        return None
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(prepared))
    image_key, label_key = _classification_keys(tfds, builder, name)
    class_names = list(builder.info.features[label_key].names)
    splits = dict.fromkeys(sorted(builder.info.splits.keys()))
    target = Path(target)
    _export(tfds, builder, splits, image_key, label_key, class_names, target)
    return target
