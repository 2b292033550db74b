"""Named datasets: where they live, how to fetch them safely, how to load them.

Each catalog entry resolves to a folder, searched in this order:

1. the `data_dir` argument (the dataset folder itself, or a folder holding it),
2. `$TLKIT_DATA_DIR/<folder>`,
3. `tlkit._io.cache_dir() / "datasets" / <folder>`,
4. entry-specific system copies (e.g. Debian's `dataset-fashion-mnist`),
5. a copy that tensorflow-datasets already prepared (`$TFDS_DATA_DIR` or
   `~/tensorflow_datasets`), exported once into the cache (tf_flowers),
6. a download into the cache (only with `download=True`), verified against a
   published sha256. A download without a published sha256 is refused unless
   the caller opts in (`allow_unverified=True` or
   `TLKIT_ALLOW_UNVERIFIED_DOWNLOADS=1`).

When all of these fail, `DatasetNotFoundError` says what was expected, where it
looked and how to fix it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from tlkit._io import atomic_path, cache_dir, sha256_file
from tlkit.data.dataset import DataReport, ImageDataset, ImageSplit
from tlkit.data.directory import from_directory
from tlkit.data.errors import DatasetNotFoundError
from tlkit.data.tfds import export_as_class_folders, find_prepared

__all__ = [
    "DatasetNotFoundError",
    "DetectionDataset",
    "DetectionExample",
    "UnsafeArchiveError",
    "dataset_info",
    "how_to_get",
    "list_datasets",
    "load",
    "load_detection",
    "resolve",
    "resolve_offline",
    "safe_extract",
]

DOWNLOAD_TIMEOUT_SECONDS = 10
_CHUNK_BYTES = 1 << 20

FASHION_MNIST_CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
BCCD_CLASS_NAMES = ["RBC", "WBC", "Platelets"]
ROAD_SIGNS_CLASS_NAMES = ["speedlimit", "crosswalk", "trafficlight", "stop"]


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target folder."""


# ---------------------------------------------------------------------------
# Catalog entries.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Download:
    url: str
    filename: str
    sha256: str | None  # Only a published checksum; never a made-up one.
    source_of_checksum: str | None = None


@dataclass(frozen=True)
class _Entry:
    name: str
    task: str
    folder: str
    layout: str
    is_complete: Callable[[Path], bool]
    downloads: tuple[_Download, ...]
    archive_subfolder: str | None  # Folder inside the archive that becomes `folder`.
    info: dict[str, Any]
    system_paths: tuple[str, ...] = ()
    class_names: tuple[str, ...] = field(default=())
    tfds_name: str | None = None  # A tensorflow-datasets copy that can stand in.
    size: str = ""  # Download size, for messages.
    manual: str = ""  # How to get a local-only dataset (no verifiable download).


def _has(*relative: str) -> Callable[[Path], bool]:
    return lambda folder: all((folder / item).exists() for item in relative)


def _has_npz(folder: Path) -> bool:
    return (folder / "pneumoniamnist.npz").is_file() or (
        folder / "pneumoniamnist" / "pneumoniamnist.npz"
    ).is_file()


def _has_gtsrb(folder: Path) -> bool:
    return (folder / "train" / "00_speed_limit_20").is_dir() and (folder / "test").is_dir()


def _has_bccd(folder: Path) -> bool:
    return (folder / "ImageSets" / "Main" / "train.txt").is_file() and (
        (folder / "annotations").is_dir() or (folder / "Annotations").is_dir()
    )


_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# sha256 published by TensorFlow Datasets (tensorflow_datasets/url_checksums/fashion_mnist.txt).
_FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
_FASHION_INFO = {
    "source": "Zalando Research, https://github.com/zalandoresearch/fashion-mnist",
    "licence": "MIT",
    "citation": (
        "Han Xiao, Kashif Rasul, Roland Vollgraf. Fashion-MNIST: a Novel Image Dataset "
        "for Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017."
    ),
    "homepage": "https://github.com/zalandoresearch/fashion-mnist",
}

_ENTRIES: dict[str, _Entry] = {
    entry.name: entry
    for entry in (
        _Entry(
            name="tf_flowers",
            task="classification",
            folder="flower_photos",
            layout="flower_photos/{daisy,dandelion,roses,sunflowers,tulips}/*.jpg",
            is_complete=_has("daisy", "tulips"),
            downloads=(
                _Download(
                    "http://download.tensorflow.org/example_images/flower_photos.tgz",
                    "flower_photos.tgz",
                    "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c",
                    "tensorflow_datasets/datasets/tf_flowers/checksums.tsv",
                ),
            ),
            archive_subfolder="flower_photos",
            tfds_name="tf_flowers",
            size="218 MB",
            info={
                "source": "TensorFlow team, flower_photos.tgz (photos from Flickr)",
                "licence": "CC BY 2.0 (credit for every photo in flower_photos/LICENSE.txt)",
                "citation": "The TensorFlow Team. Flowers, 2019. "
                "http://download.tensorflow.org/example_images/flower_photos.tgz",
                "homepage": "https://www.tensorflow.org/datasets/catalog/tf_flowers",
                "notes": (
                    "No official split: tlkit uses a fixed, seeded, stratified 80/10/10 "
                    "train/validation/test split. Known flaw: three byte-identical pairs, "
                    "one under two labels (roses/15922772266_1167a06620.jpg and "
                    "tulips/15922772266_1167a06620.jpg)."
                ),
            },
        ),
        _Entry(
            name="cats_and_dogs_filtered",
            task="classification",
            folder="cats_and_dogs_filtered",
            layout="cats_and_dogs_filtered/{train,validation}/{cats,dogs}/*.jpg",
            is_complete=_has("train", "validation"),
            downloads=(
                _Download(
                    "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip",
                    "cats_and_dogs_filtered.zip",
                    None,
                ),
            ),
            archive_subfolder="cats_and_dogs_filtered",
            size="66 MB",
            info={
                "source": "Google, cats_and_dogs_filtered.zip (TensorFlow transfer-learning "
                "tutorial), a subset of Kaggle 'Dogs vs. Cats' (Microsoft Asirra)",
                "licence": "No explicit licence; redistributed by Google for education",
                "citation": "Elson, Douceur, Howell, Saul. Asirra: A CAPTCHA that Exploits "
                "Interest-Aligned Manual Image Categorization. ACM CCS 2007.",
                "homepage": "https://www.tensorflow.org/tutorials/images/transfer_learning",
                "notes": "Official train (1000+1000) and validation (500+500) folders; "
                "validation is used as validation, there is no test split.",
            },
        ),
        _Entry(
            name="pneumoniamnist",
            task="classification",
            folder="pneumoniamnist",
            layout="pneumoniamnist/pneumoniamnist.npz with {train,val,test}_{images,labels}",
            is_complete=_has_npz,
            downloads=(
                _Download(
                    "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
                    "pneumoniamnist.npz",
                    "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8",
                    "tensorflow_datasets/datasets/pneumonia_mnist/checksums.tsv",
                ),
            ),
            archive_subfolder=None,
            size="4 MB",
            class_names=("normal", "pneumonia"),
            info={
                "source": "MedMNIST v2 (images from Kermany et al. 2018)",
                "licence": "CC BY 4.0",
                "citation": (
                    "Jiancheng Yang et al. MedMNIST v2 - A large-scale lightweight benchmark "
                    "for 2D and 3D biomedical image classification. Scientific Data, 2023."
                ),
                "homepage": "https://medmnist.com/",
                "notes": (
                    "28x28 grey chest X-rays; official train/val/test arrays (4708/524/624). "
                    "Duplicates inherited from the source: 18 within train, 3 within test, "
                    "8 shared between train and val."
                ),
            },
        ),
        _Entry(
            name="fashion_mnist",
            task="classification",
            folder="fashion-mnist",
            layout="fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
            is_complete=_has(*_FASHION_FILES),
            downloads=tuple(
                _Download(
                    f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{filename}",
                    filename,
                    _FASHION_SHA256[filename],
                    "tensorflow_datasets/url_checksums/fashion_mnist.txt",
                )
                for filename in _FASHION_FILES
            ),
            archive_subfolder=None,
            size="30 MB",
            system_paths=("/usr/share/datasets/fashion-mnist",),
            class_names=tuple(FASHION_MNIST_CLASS_NAMES),
            info={
                **_FASHION_INFO,
                "notes": "Full set: 60000 train and 10000 test 28x28 grey images; "
                "no validation split (use `dataset.train.split(0.1)`).",
            },
        ),
        _Entry(
            name="fashion_mnist_small",
            task="classification",
            folder="fashion_mnist_small",
            layout="fashion_mnist_small.npz (package data: tlkit/resources/)",
            is_complete=_has("fashion_mnist_small.npz"),
            downloads=(),
            archive_subfolder=None,
            class_names=tuple(FASHION_MNIST_CLASS_NAMES),
            info={
                **_FASHION_INFO,
                "source": _FASHION_INFO["source"]
                + "; subset made by data/make_fashion_mnist_small.py from Debian's "
                "dataset-fashion-mnist package",
                "notes": "Embedded subset: 100 train and 50 test images per class "
                "(1000/500), stratified and seeded; no validation split.",
            },
        ),
        _Entry(
            name="bccd",
            task="detection",
            folder="bccd",
            layout="bccd/{images/*.jpg, annotations/*.xml (Pascal VOC), "
            "ImageSets/Main/{train,val,test}.txt} (or the VOC names JPEGImages/, Annotations/)",
            is_complete=_has_bccd,
            downloads=(
                # The v1.0 tag, whose sha256 TensorFlow Datasets publishes; a branch
                # archive (master.zip) has no stable bytes to check.
                _Download(
                    "https://github.com/Shenggan/BCCD_Dataset/archive/v1.0.zip",
                    "BCCD_Dataset-1.0.zip",
                    "97af5cc16d14d293fcb3c82a8f66e49b0339a8d0abd8e9508e0feeb4911caa1f",
                    "tensorflow_datasets/datasets/bccd/checksums.tsv",
                ),
            ),
            archive_subfolder="BCCD_Dataset-1.0/BCCD",
            size="8 MB",
            class_names=tuple(BCCD_CLASS_NAMES),
            info={
                "source": "BCCD Dataset by Shenggan, https://github.com/Shenggan/BCCD_Dataset",
                "licence": "MIT",
                "citation": "Shenggan. BCCD Dataset: a small-scale dataset for blood cells "
                "detection. GitHub, 2017.",
                "homepage": "https://github.com/Shenggan/BCCD_Dataset",
                "notes": "Object detection (RBC, WBC, Platelets), 364 images 640x480. "
                "Known flaw: two zero-area boxes (BloodImage_00338, BloodImage_00343), "
                "dropped by load_detection.",
            },
        ),
        _Entry(
            name="gtsrb",
            task="classification",
            folder="gtsrb",
            layout="gtsrb/{train,validation,test}/NN_name/*.png "
            "(00_speed_limit_20 .. 42_end_of_no_passing_over_3.5t)",
            is_complete=_has_gtsrb,
            # No archive of this subset has a published, checkable sha256: local only.
            downloads=(),
            archive_subfolder=None,
            manual=(
                "download the official GTSRB training and test archives from "
                "https://benchmark.ini.rub.de/gtsrb_dataset.html and build the subset: "
                "60 train and 15 validation images per class from different tracks, up to "
                "40 test images per class, class folders NN_name in the official id order"
            ),
            info={
                "source": "German Traffic Sign Recognition Benchmark (GTSRB), Institut fuer "
                "Neuroinformatik, Ruhr-Universitaet Bochum; a subset at original resolution",
                "licence": "Research use with citation (Stallkamp et al. 2012)",
                "citation": (
                    "J. Stallkamp, M. Schlipsing, J. Salmen, C. Igel. Man vs. computer: "
                    "Benchmarking machine learning algorithms for traffic sign recognition. "
                    "Neural Networks 32 (2012) 323-332."
                ),
                "homepage": "https://benchmark.ini.rub.de/gtsrb_dataset.html",
                "notes": (
                    "43 classes; class names are the folder names NN_name, NN the official "
                    "class id. Shipped split: train 60 per class (2580), validation 15 per "
                    "class (633; class 19 has 3) from other physical signs (tracks), test up "
                    "to 40 per class (1674) from the official test set. Frames of one track "
                    "are near-duplicates: never re-split train randomly (it leaks). Many "
                    "classes are mirror images of each other: never flip."
                ),
            },
        ),
        _Entry(
            name="road_signs",
            task="detection",
            folder="road_signs",
            layout="road_signs/{images/*.jpg, annotations/*.xml (Pascal VOC), "
            "ImageSets/Main/{train,val,test}.txt}",
            is_complete=_has_bccd,
            # Kaggle needs an account; its archive has no published sha256: local only.
            downloads=(),
            archive_subfolder=None,
            class_names=tuple(ROAD_SIGNS_CLASS_NAMES),
            manual=(
                "download Kaggle's 'Road Sign Detection' (andrewmvd, needs a Kaggle "
                "account) from https://www.kaggle.com/datasets/andrewmvd/road-sign-detection, "
                "composite transparent PNG pixels on white, save them as images/*.jpg next to "
                "annotations/*.xml and write ImageSets/Main/{train,val,test}.txt"
            ),
            info={
                "source": "Kaggle 'Road Sign Detection' by andrewmvd "
                "(877 web photos, Pascal VOC boxes)",
                "licence": "CC0 1.0",
                "citation": "andrewmvd. Road Sign Detection. Kaggle, 2020. "
                "https://www.kaggle.com/datasets/andrewmvd/road-sign-detection",
                "homepage": "https://www.kaggle.com/datasets/andrewmvd/road-sign-detection",
                "notes": (
                    "Object detection (speedlimit, crosswalk, trafficlight, stop), 877 "
                    "photos mostly 300x400; seeded split train/val/test 613/88/176; 1244 "
                    "boxes, 412 smaller than 32x32 px. A speed-limit box can show any "
                    "number: the class is 'speedlimit', not the value."
                ),
            },
        ),
    )
}


def list_datasets() -> list[str]:
    """Returns the names `load` and `load_detection` accept, sorted."""
    return sorted(_ENTRIES)


def dataset_info(name: str) -> dict[str, Any]:
    """Returns what tlkit knows about a named dataset.

    Args:
        name: One of `list_datasets()`.

    Returns:
        A dict with `name`, `task`, `folder`, `layout`, `urls`, `sha256`,
        `class_names`, `source`, `licence`, `citation`, `homepage` and `notes`.

    Raises:
        ValueError: If `name` is unknown.
    """
    entry = _entry(name)
    return {
        "name": entry.name,
        "task": entry.task,
        "folder": entry.folder,
        "layout": entry.layout,
        "urls": [download.url for download in entry.downloads],
        "sha256": {download.filename: download.sha256 for download in entry.downloads},
        "class_names": list(entry.class_names),
        **entry.info,
    }


def _entry(name: str) -> _Entry:
    if name not in _ENTRIES:
        raise ValueError(
            f"Unknown dataset {name!r}. Choose one of {list_datasets()}, or load your own "
            f"folder with tlkit.data.from_directory(path). Received: name={name!r}"
        )
    return _ENTRIES[name]


def _embedded_data_dir() -> Path:
    # Package data (pyproject's [tool.setuptools.package-data]), so it is in every wheel.
    return Path(__file__).resolve().parents[1] / "resources"


# ---------------------------------------------------------------------------
# Resolution and download.
# ---------------------------------------------------------------------------


ALLOW_UNVERIFIED_ENVIRONMENT = "TLKIT_ALLOW_UNVERIFIED_DOWNLOADS"


def _candidates(entry: _Entry, data_dir: str | os.PathLike | None) -> list[Path]:
    candidates: list[Path] = []
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        candidates += [data_dir, data_dir / entry.folder]
    if entry.name == "fashion_mnist_small":
        candidates.append(_embedded_data_dir())
    environment = os.environ.get("TLKIT_DATA_DIR")
    if environment:
        candidates.append(Path(environment).expanduser() / entry.folder)
    candidates.append(cache_dir() / "datasets" / entry.folder)
    candidates += [Path(path) for path in entry.system_paths]
    return candidates


def resolve_offline(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where a named dataset is on this machine, without downloading or writing anything.

    Checks `data_dir`, `$TLKIT_DATA_DIR`, the cache, system copies and a
    prepared tensorflow-datasets copy; cheap enough for test collection.

    Args:
        name: One of `list_datasets()`.
        data_dir: A folder that is, or holds, the dataset folder. Defaults to `None`.

    Returns:
        The dataset folder (or the tfds copy's folder), or `None` when absent.

    Raises:
        ValueError: If `name` is unknown.
    """
    entry = _entry(name)
    for candidate in _candidates(entry, data_dir):
        if candidate.is_dir() and entry.is_complete(candidate):
            return candidate
    if entry.tfds_name:
        return find_prepared(entry.tfds_name, data_dir)
    return None


def how_to_get(name: str) -> str:
    """One line that says how to make a named dataset available.

    Args:
        name: One of `list_datasets()`.

    Returns:
        The ways to get it: `TLKIT_DATA_DIR`, the cache, tfds, a download.

    Raises:
        ValueError: If `name` is unknown.
    """
    entry = _entry(name)
    if not entry.downloads and entry.name == "fashion_mnist_small":
        return "it ships inside tlkit (tlkit/resources/); reinstall tlkit if it is missing"
    ways = [
        f"set TLKIT_DATA_DIR to a folder holding {entry.layout}",
        f"or put it in {cache_dir() / 'datasets' / entry.folder}",
    ]
    if entry.manual:
        ways.append(
            f"to get it ({entry.name} is local only: no checkable download): {entry.manual}"
        )
    if entry.tfds_name:
        ways.append(f"or prepare it with tensorflow_datasets.load({entry.tfds_name!r})")
    if entry.downloads:
        download = entry.downloads[0]
        checked = (
            "sha256-checked"
            if all(item.sha256 for item in entry.downloads)
            else f"no published sha256: needs allow_unverified=True or "
            f"{ALLOW_UNVERIFIED_ENVIRONMENT}=1"
        )
        size = f"{entry.size}, " if entry.size else ""
        loader = "load_detection" if entry.task == "detection" else "load"
        ways.append(
            f"or run tlkit.data.{loader}({name!r}) once online ({size}{checked}, "
            f"from {download.url})"
        )
    return "; ".join(ways)


def resolve(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    allow_unverified: bool = False,
) -> Path:
    """Finds (or downloads) the folder of a named dataset.

    Args:
        name: One of `list_datasets()`.
        data_dir: A folder that is, or holds, the dataset folder. Searched
            first. Defaults to `None`.
        download: Whether to download into the cache when no copy is found.
            Defaults to `True`.
        allow_unverified: Whether to download files that have no published
            sha256 (`$TLKIT_ALLOW_UNVERIFIED_DOWNLOADS=1` does the same); their
            sha256 is printed. Defaults to `False`.

    Returns:
        The dataset folder.

    Raises:
        ValueError: If `name` is unknown.
        DatasetNotFoundError: If no copy is found and downloading is off, refused
            (no published sha256) or fails.
    """
    entry = _entry(name)
    candidates = _candidates(entry, data_dir)
    for candidate in candidates:
        if candidate.is_dir() and entry.is_complete(candidate):
            return candidate
    cached = cache_dir() / "datasets" / entry.folder

    failure = None
    prepared = find_prepared(entry.tfds_name, data_dir) if entry.tfds_name else None
    if prepared is not None:
        print(f"tlkit: exporting the tensorflow-datasets copy at {prepared} to {cached} (once)")
        try:
            export_as_class_folders(entry.tfds_name, cached, data_dir)
        except (OSError, ValueError) as error:
            failure = f"exporting the tfds copy failed: {type(error).__name__}: {error}"
        else:
            if entry.is_complete(cached):
                return cached
            failure = f"the tfds copy at {prepared} does not have the layout {entry.layout}"

    allowed = allow_unverified or os.environ.get(ALLOW_UNVERIFIED_ENVIRONMENT) == "1"
    unverified = [item.url for item in entry.downloads if item.sha256 is None]
    if download and unverified and not allowed:
        failure = (
            f"Download refused: no sha256 is published for {', '.join(unverified)}, so its "
            f"content cannot be checked. Pass allow_unverified=True (or set "
            f"{ALLOW_UNVERIFIED_ENVIRONMENT}=1) to download it anyway; its sha256 is printed."
        )
    elif download and entry.downloads:
        try:
            return _download(entry, cached)
        except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as error:
            failure = (
                f"Download from {entry.downloads[0].url} failed: {type(error).__name__}: {error}"
            )
    raise DatasetNotFoundError(_not_found_message(entry, candidates, download, failure))


def _not_found_message(
    entry: _Entry, candidates: list[Path], download: bool, failure: str | None
) -> str:
    searched = "\n".join(f"  - {candidate}" for candidate in candidates)
    if entry.manual:
        download_line = (
            f"This dataset is local only (no download with a published checksum). "
            f"To get it: {entry.manual}."
        )
    elif not entry.downloads:
        download_line = "This dataset is not downloadable."
    elif failure:
        download_line = failure
    elif not download:
        download_line = "Download was off (download=False)."
    else:
        download_line = ""
    environment = os.environ.get("TLKIT_DATA_DIR")
    return (
        f"Dataset {entry.name!r} was not found. Expected the layout {entry.layout}.\n"
        f"Searched:\n{searched}\n{download_line}\n"
        f"To fix: set TLKIT_DATA_DIR to a folder holding {entry.folder!r} "
        f"(e.g. export TLKIT_DATA_DIR=../shared/datasets), pass data_dir=..., put the files "
        f"in {cache_dir() / 'datasets' / entry.folder}, or call with download=True while "
        f"online. Received: name={entry.name!r}, TLKIT_DATA_DIR={environment!r}"
    )


def _download(entry: _Entry, target: Path) -> Path:
    downloads_folder = cache_dir() / "downloads"
    downloads_folder.mkdir(parents=True, exist_ok=True)
    files = [_fetch(download, downloads_folder / download.filename) for download in entry.downloads]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.folder}.", dir=target.parent))
    try:
        for path in files:
            if path.name.endswith((".zip", ".tgz", ".tar.gz", ".tar")):
                safe_extract(path, staging)
            else:
                shutil.copy2(path, staging / path.name)
        source = staging / entry.archive_subfolder if entry.archive_subfolder else staging
        if not (source.is_dir() and entry.is_complete(source)):
            raise ValueError(f"the downloaded files do not have the expected layout {entry.layout}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _fetch(download: _Download, destination: Path) -> Path:
    if destination.is_file() and download.sha256 and sha256_file(destination) == download.sha256:
        return destination
    print(f"tlkit: downloading {download.url} -> {destination}")
    digest = hashlib.sha256()
    with atomic_path(destination) as temporary:
        with urllib.request.urlopen(download.url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            with open(temporary, "wb") as handle:
                while chunk := response.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    handle.write(chunk)
        actual = digest.hexdigest()
        if download.sha256 is None:
            print(
                f"tlkit: sha256 of {download.filename} is {actual}; NOT verified, because "
                "no checksum is published for it (downloaded because unverified downloads "
                "were allowed)."
            )
        elif actual != download.sha256:
            raise ValueError(
                f"sha256 mismatch for {download.url}: expected {download.sha256} "
                f"(from {download.source_of_checksum}), got {actual}; the file was discarded"
            )
    return destination


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extracts a zip or tar archive, refusing members that escape `target`.

    Every member is checked before anything is written: absolute paths, `..`
    components, drive letters, symbolic and hard links, and device files are
    refused (zip-slip and tar path traversal).

    Args:
        archive: A `.zip`, `.tar`, `.tar.gz`/`.tgz` (any compression tarfile reads).
        target: The folder to extract into; created if missing.

    Returns:
        The target folder.

    Raises:
        UnsafeArchiveError: If a member would land outside `target` or is a link
            or special file. Nothing is extracted then.
        ValueError: If `archive` is neither a zip nor a tar file.
    """
    archive = Path(archive)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            for member in handle.infolist():
                mode = member.external_attr >> 16
                if stat.S_ISLNK(mode):
                    _refuse(archive, member.filename, "is a symbolic link")
                _check_member_path(archive, member.filename, root)
            handle.extractall(root)
        return target
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            members = handle.getmembers()
            for member in members:
                if member.issym() or member.islnk():
                    _refuse(archive, member.name, f"is a link to {member.linkname!r}")
                if not (member.isfile() or member.isdir()):
                    _refuse(archive, member.name, "is a device, FIFO or other special file")
                _check_member_path(archive, member.name, root)
            handle.extractall(root, members=members, filter="data")
        return target
    raise ValueError(
        f"{str(archive)!r} is neither a zip nor a tar archive; expected .zip, .tar, .tar.gz "
        f"or .tgz. Received: archive={str(archive)!r}"
    )


def _check_member_path(archive: Path, name: str, root: Path) -> None:
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        _refuse(archive, name, "has an absolute path")
    if ".." in normalized.split("/"):
        _refuse(archive, name, "contains '..'")
    destination = (root / normalized).resolve()
    if destination != root and root not in destination.parents:
        _refuse(archive, name, f"would be written outside {root}")


def _refuse(archive: Path, name: str, reason: str) -> None:
    raise UnsafeArchiveError(
        f"Refusing to extract {str(archive)!r}: member {name!r} {reason}. The archive may "
        "be malicious or damaged; download it again from the official source. "
        f"Received: member={name!r}"
    )


# ---------------------------------------------------------------------------
# Loading classification datasets.
# ---------------------------------------------------------------------------


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    seed: int | None = 42,
    image_size: int | tuple[int, int] | None = None,
    allow_unverified: bool = False,
) -> ImageDataset:
    """Loads a named classification dataset.

    Args:
        name: One of `list_datasets()` whose task is classification:
            "tf_flowers", "cats_and_dogs_filtered", "gtsrb", "pneumoniamnist",
            "fashion_mnist" or "fashion_mnist_small".
        data_dir: A folder that is, or holds, the dataset folder; searched
            before `$TLKIT_DATA_DIR` and the cache. Defaults to `None`.
        download: Whether to download when no copy is found. Defaults to `True`.
        seed: Seed of the split, for datasets without an official one
            (tf_flowers). Defaults to 42.
        image_size: Default `image_size` for `to_dataset`. Defaults to `None`.
        allow_unverified: Whether to download files without a published
            sha256 (see `resolve`). Defaults to `False`.

    Returns:
        An `ImageDataset` with `info` filled in.

    Raises:
        ValueError: If `name` is unknown or names a detection dataset.
        DatasetNotFoundError: If the data is not found and cannot be downloaded.

    Example:

    >>> dataset = load("tf_flowers", download=False)
    >>> [len(split) for split in dataset.splits.values()]
    [2936, 367, 367]
    """
    entry = _entry(name)
    if entry.task != "classification":
        raise ValueError(
            f"{name!r} is a {entry.task} dataset; load it with "
            f"tlkit.data.load_detection({name!r}). Received: name={name!r}"
        )
    folder = resolve(name, data_dir=data_dir, download=download, allow_unverified=allow_unverified)
    info = {**dataset_info(name), "path": str(folder)}
    if name == "tf_flowers":
        return from_directory(
            folder,
            image_size=image_size,
            validation_split=0.1,
            test_split=0.1,
            seed=seed,
            name=name,
            info=info,
        )
    if name in ("cats_and_dogs_filtered", "gtsrb"):
        # The shipped split folders, as they are (gtsrb's is by physical sign).
        return from_directory(folder, image_size=image_size, name=name, info=info)
    if name == "pneumoniamnist":
        npz = folder / "pneumoniamnist.npz"
        if not npz.is_file():
            npz = folder / "pneumoniamnist" / "pneumoniamnist.npz"
        with np.load(npz) as arrays:
            splits = {
                split: (arrays[f"{key}_images"], arrays[f"{key}_labels"])
                for split, key in (("train", "train"), ("validation", "val"), ("test", "test"))
            }
        return _array_dataset(name, list(entry.class_names), splits, info, image_size, npz)
    if name == "fashion_mnist":
        splits = {
            split: (
                _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz"),
                _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz"),
            )
            for split, prefix in (("train", "train"), ("test", "t10k"))
        }
        return _array_dataset(name, list(entry.class_names), splits, info, image_size, folder)
    # fashion_mnist_small
    npz = folder / "fashion_mnist_small.npz"
    with np.load(npz) as arrays:
        splits = {
            split: (arrays[f"{split}_images"], arrays[f"{split}_labels"])
            for split in ("train", "test")
        }
    return _array_dataset(name, list(entry.class_names), splits, info, image_size, npz)


def _array_dataset(
    name: str,
    class_names: list[str],
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    info: dict[str, Any],
    image_size: int | tuple[int, int] | None,
    source: Path,
) -> ImageDataset:
    report = DataReport()
    if info.get("notes"):
        report.notes.append(info["notes"])
    made = {}
    for split_name, (images, labels) in splits.items():
        labels = np.asarray(labels).reshape(-1)
        if len(images) != len(labels):
            raise ValueError(
                f"{source}: split {split_name!r} has {len(images)} images but "
                f"{len(labels)} labels; the file is damaged, download it again. "
                f"Received: path={str(source)!r}"
            )
        made[split_name] = ImageSplit(
            split_name,
            class_names,
            labels,
            images=np.asarray(images, dtype=np.uint8),
            report=report,
            image_size=image_size,
        )
    return ImageDataset(
        name,
        class_names,
        made["train"],
        made.get("validation"),
        made.get("test"),
        report=report,
        info=info,
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(
            f"{str(path)!r} is not an unsigned-byte IDX file; download it again. "
            f"Received: header={data[:4]!r}"
        )
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ---------------------------------------------------------------------------
# Detection datasets.
# ---------------------------------------------------------------------------


class DetectionExample(NamedTuple):
    """One image with its boxes.

    Attributes:
        image_path: The image file.
        boxes: float32 `(N, 4)` `[xmin, ymin, xmax, ymax]` in pixels.
        labels: int32 `(N,)`, indices into the dataset's `class_names`.
    """

    image_path: str
    boxes: np.ndarray
    labels: np.ndarray


@dataclass
class DetectionDataset:
    """An object-detection dataset as lists of `DetectionExample`.

    Attributes:
        name: Dataset name.
        class_names: Box class names.
        train: Training examples.
        validation: Validation examples.
        test: Test examples.
        report: `class_counts` counts boxes per split and class; `skipped` lists
            images or annotations that could not be used; `notes` says how many
            boxes were dropped.
        dropped_boxes: `(annotation file, description)` of every zero-area box
            dropped.
        info: Source, licence, citation, homepage and notes.
    """

    name: str
    class_names: list[str]
    train: list[DetectionExample]
    validation: list[DetectionExample]
    test: list[DetectionExample]
    report: DataReport
    dropped_boxes: list[tuple[str, str]]
    info: dict[str, Any]

    @property
    def num_classes(self) -> int:
        """The number of box classes."""
        return len(self.class_names)


def load_detection(
    name: str = "bccd",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    allow_unverified: bool = False,
) -> DetectionDataset:
    """Loads a named object-detection dataset (Pascal VOC XML annotations).

    Splits come from `ImageSets/Main/{train,val,test}.txt`. Boxes with
    `xmax <= xmin` or `ymax <= ymin` are dropped and listed in `dropped_boxes`.

    Args:
        name: A detection dataset of `list_datasets()`: "bccd" or "road_signs".
            Defaults to "bccd".
        data_dir: A folder that is, or holds, the dataset folder. Defaults to `None`.
        download: Whether to download when no copy is found. Defaults to `True`.
        allow_unverified: Whether to download files without a published
            sha256 (see `resolve`). Defaults to `False`.

    Returns:
        A `DetectionDataset`.

    Raises:
        ValueError: If `name` is unknown or not a detection dataset.
        DatasetNotFoundError: If the data is not found and cannot be downloaded.
    """
    entry = _entry(name)
    if entry.task != "detection":
        raise ValueError(
            f"{name!r} is a {entry.task} dataset; load it with tlkit.data.load({name!r}). "
            f"Received: name={name!r}"
        )
    folder = resolve(name, data_dir=data_dir, download=download, allow_unverified=allow_unverified)
    annotations = folder / "annotations"
    if not annotations.is_dir():
        annotations = folder / "Annotations"
    images = folder / "images"
    if not images.is_dir():
        images = folder / "JPEGImages"
    class_names = list(entry.class_names)
    report = DataReport()
    dropped: list[tuple[str, str]] = []
    splits: dict[str, list[DetectionExample]] = {}
    for split_name, list_name in (("train", "train"), ("validation", "val"), ("test", "test")):
        ids_file = folder / "ImageSets" / "Main" / f"{list_name}.txt"
        ids = ids_file.read_text().split() if ids_file.is_file() else []
        examples = []
        counts = dict.fromkeys(class_names, 0)
        for image_id in ids:
            example = _read_voc(
                annotations / f"{image_id}.xml", images, class_names, report, dropped
            )
            if example is not None:
                examples.append(example)
                for label in example.labels:
                    counts[class_names[label]] += 1
        splits[split_name] = examples
        report.class_counts[split_name] = counts
    report.notes.append(f"dropped {len(dropped)} zero-area box(es)")
    return DetectionDataset(
        name,
        class_names,
        splits["train"],
        splits["validation"],
        splits["test"],
        report,
        dropped,
        {**dataset_info(name), "path": str(folder)},
    )


def _read_voc(
    xml_path: Path,
    images: Path,
    class_names: list[str],
    report: DataReport,
    dropped: list[tuple[str, str]],
) -> DetectionExample | None:
    try:
        tree = ElementTree.parse(xml_path)
    except (OSError, ElementTree.ParseError) as error:
        report.add_skipped(str(xml_path), f"unreadable annotation: {error}")
        return None
    root = tree.getroot()
    image_path = images / (root.findtext("filename") or f"{xml_path.stem}.jpg").strip()
    if not image_path.is_file():
        image_path = images / f"{xml_path.stem}.jpg"
    if not image_path.is_file():
        report.add_skipped(str(xml_path), f"image {image_path.name} not found in {images}")
        return None
    boxes, labels = [], []
    for index, item in enumerate(root.iter("object")):
        label_name = (item.findtext("name") or "").strip()
        box = item.find("bndbox")
        if label_name not in class_names or box is None:
            dropped.append((str(xml_path), f"object {index}: unknown class {label_name!r}"))
            continue
        try:
            coordinates = [float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            dropped.append((str(xml_path), f"object {index}: malformed bndbox"))
            continue
        xmin, ymin, xmax, ymax = coordinates
        if xmax <= xmin or ymax <= ymin:
            dropped.append(
                (str(xml_path), f"object {index} ({label_name}): zero-area box {coordinates}")
            )
            continue
        boxes.append(coordinates)
        labels.append(class_names.index(label_name))
    return DetectionExample(
        str(image_path),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int32),
    )
