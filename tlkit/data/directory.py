"""Loading a class-per-folder image directory."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.data.dataset import DataReport, ImageDataset, ImageSplit, stratified_indices
from tlkit.data.images import check_image, is_image_file, normalize_image_size

__all__ = ["from_directory"]

_TRAIN_NAMES = ("train",)
_VALIDATION_NAMES = ("validation", "val")
_TEST_NAMES = ("test",)
_SCAN_THREADS = 8


def from_directory(
    path: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int | None = 42,
    name: str | None = None,
    info: dict[str, Any] | None = None,
) -> ImageDataset:
    """Loads images laid out one sub-folder per class.

    ```
    path/
      class_a/  img1.jpg  more/img2.png ...
      class_b/  ...
    ```

    Class names are the sorted folder names. Images in nested folders inside a
    class folder count for that class. Hidden files and folders (names starting
    with ".") are ignored, and so are files without an image extension
    (`IMAGE_EXTENSIONS`, any case). Every image file is checked cheaply
    (`check_image`: header, pixel count, PIL `verify()`); unreadable ones are
    listed in `report.skipped`.

    If `path` has a `train/` folder and a `validation/` (or `val/`) and/or
    `test/` folder, each holding class folders (the `cats_and_dogs_filtered`
    layout), those splits are used as they are and the split arguments are
    ignored. Otherwise the examples are split per class (stratified) with a
    seeded shuffle, so the same seed gives the same split.

    Args:
        path: The dataset folder.
        image_size: Default `image_size` for `ImageSplit.to_dataset`, an int or
            `(height, width)`. Defaults to `None`.
        validation_split: Share of each class for validation; 0 for none.
            Defaults to 0.2.
        test_split: Share of each class for test; 0 for none. Defaults to 0.0.
        seed: Seed for the split. Defaults to 42.
        name: Dataset name. Defaults to the folder name.
        info: Source, licence and notes to attach. Defaults to `{}`.

    Returns:
        An `ImageDataset` whose splits are file-based.

    Raises:
        ValueError: If `path` is missing or not a folder, has no class folders,
            has only one class, has no readable images, if a class folder has
            no readable images, or if the split fractions are out of range.

    Example:

    >>> dataset = from_directory("flower_photos", image_size=224, test_split=0.1)
    >>> dataset.class_names
    ['daisy', 'dandelion', 'roses', 'sunflowers', 'tulips']
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(
            f"Image folder {str(root)!r} does not exist. Pass the folder that holds one "
            f"sub-folder per class. Received: path={os.fspath(path)!r}"
        )
    if not root.is_dir():
        raise ValueError(
            f"{str(root)!r} is a file, not a folder. Pass the folder that holds one "
            f"sub-folder per class. Received: path={os.fspath(path)!r}"
        )
    size = normalize_image_size(image_size)
    for argument, value in (("validation_split", validation_split), ("test_split", test_split)):
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise ValueError(
                f"`{argument}` must be a fraction in [0, 1), e.g. 0.2. "
                f"Received: {argument}={value!r}"
            )
    if float(validation_split) + float(test_split) >= 1.0:
        raise ValueError(
            "`validation_split + test_split` must be below 1 so that some images are "
            "left for training. "
            f"Received: validation_split={validation_split!r}, test_split={test_split!r}"
        )

    report = DataReport()
    dataset_name = name or root.name
    split_folders = _find_split_folders(root)
    if split_folders is not None:
        train_folder = split_folders.pop("train")
        class_names, train_files = _scan_classes(train_folder, report, require_all=True)
        splits = {"train": _make_split("train", class_names, train_files, report, root, size)}
        for split_name, folder in split_folders.items():
            names, files = _scan_classes(folder, report, require_all=False)
            unknown = sorted(set(names) - set(class_names))
            if unknown:
                raise ValueError(
                    f"Folder {str(folder)!r} has class folders that {str(train_folder)!r} "
                    f"lacks: {unknown}. Every class needs training images; rename or "
                    f"remove them. Received: classes={names}"
                )
            remapped = [(p, class_names.index(names[label])) for p, label in files]
            splits[split_name] = _make_split(split_name, class_names, remapped, report, root, size)
        return _dataset(dataset_name, class_names, splits, report, info)

    class_names, files = _scan_classes(root, report, require_all=True)
    labels = np.array([label for _, label in files], dtype=np.int32)
    fractions = [float(validation_split), float(test_split)]
    train_index, validation_index, test_index = stratified_indices(
        labels, len(class_names), fractions, seed
    )
    splits = {}
    for split_name, indices, fraction in (
        ("train", train_index, 1.0),
        ("validation", validation_index, fractions[0]),
        ("test", test_index, fractions[1]),
    ):
        if fraction > 0:
            chosen = [files[i] for i in indices]
            splits[split_name] = _make_split(split_name, class_names, chosen, report, root, size)
    return _dataset(dataset_name, class_names, splits, report, info)


def _dataset(name, class_names, splits, report, info) -> ImageDataset:
    return ImageDataset(
        name,
        class_names,
        splits["train"],
        splits.get("validation"),
        splits.get("test"),
        report=report,
        info=info,
    )


# ---------------------------------------------------------------------------
# Private helpers.
# ---------------------------------------------------------------------------


def _find_split_folders(root: Path) -> dict[str, Path] | None:
    children = {child.name: child for child in root.iterdir() if child.is_dir()}
    found: dict[str, Path] = {}
    for split_name, candidates in (
        ("train", _TRAIN_NAMES),
        ("validation", _VALIDATION_NAMES),
        ("test", _TEST_NAMES),
    ):
        for candidate in candidates:
            if candidate in children:
                found[split_name] = children[candidate]
                break
    if "train" in found and len(found) > 1:
        return found
    return None


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _scan_classes(
    folder: Path, report: DataReport, require_all: bool
) -> tuple[list[str], list[tuple[str, int]]]:
    class_folders = sorted(
        (child for child in folder.iterdir() if child.is_dir() and _visible(child.name)),
        key=lambda child: child.name,
    )
    if not class_folders:
        loose = [child.name for child in folder.iterdir() if is_image_file(child.name)]
        hint = (
            f" It holds {len(loose)} image file(s) directly; move them into one "
            "sub-folder per class."
            if loose
            else ""
        )
        raise ValueError(
            f"No class folders in {str(folder)!r}: expected one sub-folder per class, "
            f"e.g. {str(folder / 'cats')!r} and {str(folder / 'dogs')!r}.{hint} "
            f"Received: path={str(folder)!r}"
        )
    for class_folder in class_folders:
        _refuse_looping_link(folder, class_folder)
    class_names = [child.name for child in class_folders]
    candidates: list[tuple[str, int]] = []
    for label, class_folder in enumerate(class_folders):
        for path in _walk_images(class_folder):
            candidates.append((path, label))

    with ThreadPoolExecutor(max_workers=_SCAN_THREADS) as pool:
        reasons = list(pool.map(check_image, [path for path, _ in candidates]))
    files: list[tuple[str, int]] = []
    skipped_per_class = [0] * len(class_names)
    for (path, label), reason in zip(candidates, reasons, strict=True):
        if reason is None:
            files.append((path, label))
        else:
            report.add_skipped(path, reason)
            skipped_per_class[label] += 1

    if not files:
        raise ValueError(
            f"No readable images in {str(folder)!r} ({len(candidates)} candidate file(s), "
            f"{len(candidates) - len(files)} unreadable). Expected files ending in one of "
            ".jpg .jpeg .png .bmp .gif .webp .tif .tiff inside the class folders. "
            f"Received: path={str(folder)!r}"
        )
    counts = np.bincount([label for _, label in files], minlength=len(class_names))
    if require_all:
        empty = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
        if empty:
            details = ", ".join(
                f"{name!r} ({skipped_per_class[class_names.index(name)]} unreadable)"
                for name in empty
            )
            raise ValueError(
                f"Class folder(s) with no readable images in {str(folder)!r}: {details}. "
                "Add images to them or remove the folders (see report.skipped for "
                f"unreadable files). Received: empty_classes={empty}"
            )
        if len(class_names) < 2:
            raise ValueError(
                f"Only one class folder in {str(folder)!r}: classification needs at least "
                "two classes, one sub-folder each. If this folder IS a class, pass its "
                f"parent folder. Received: class_names={class_names}"
            )
    return class_names, files


def _refuse_looping_link(folder: Path, class_folder: Path) -> None:
    """Refuses a class folder that is a link back into the data.

    A link to the data folder or one of its ancestors would make a class of
    every image under a second label; a link to a folder inside the data
    folder would file another class's images twice. Links to folders
    elsewhere (data on another disk) are fine.

    Raises:
        ValueError: If `class_folder` is such a link.
    """
    if not class_folder.is_symlink():
        return
    target = class_folder.resolve()
    root = folder.resolve()
    if target == root or target in root.parents or root in target.parents:
        inside = root in target.parents
        where = "a folder inside the data folder" if inside else "the data folder or above it"
        raise ValueError(
            f"Class folder {str(class_folder)!r} is a link to {str(target)!r}, {where}: its "
            "images would be counted again under a second label. Remove the link or replace "
            f"it by a real folder. Received: class_folder={str(class_folder)!r}"
        )


def _walk_images(class_folder: Path) -> list[str]:
    found = []
    for directory, subdirectories, filenames in os.walk(class_folder):
        subdirectories[:] = sorted(d for d in subdirectories if _visible(d))
        for filename in sorted(filenames):
            if _visible(filename) and is_image_file(filename):
                found.append(os.path.join(directory, filename))
    return found


def _make_split(
    split_name: str,
    class_names: list[str],
    files: list[tuple[str, int]],
    report: DataReport,
    root: Path,
    size: tuple[int, int] | None,
) -> ImageSplit:
    files = sorted(files, key=lambda item: (item[1], item[0]))
    return ImageSplit(
        split_name,
        class_names,
        [label for _, label in files],
        paths=[path for path, _ in files],
        report=report,
        root=root,
        image_size=size,
    )
