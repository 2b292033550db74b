"""Tests of tlkit.data's catalog: resolution, safe download/extract, named datasets.

Nothing here touches the network: downloads are off or `urlopen` is replaced.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tlkit.data.catalog as catalog
from tlkit import data


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No TLKIT_DATA_DIR, an empty cache, and a network that must not be used."""
    monkeypatch.delenv("TLKIT_DATA_DIR", raising=False)
    monkeypatch.delenv("TLKIT_ALLOW_UNVERIFIED_DOWNLOADS", raising=False)
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tensorflow_datasets"))

    def no_network(*args, **kwargs):
        raise AssertionError("tests must not open network connections")

    monkeypatch.setattr(catalog.urllib.request, "urlopen", no_network)
    return tmp_path


def _png_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), color).save(buffer, format="PNG")
    return buffer.getvalue()


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# Catalog metadata.
# ---------------------------------------------------------------------------


def test_list_and_info():
    names = data.list_datasets()
    for name in (
        "tf_flowers",
        "cats_and_dogs_filtered",
        "pneumoniamnist",
        "fashion_mnist",
        "fashion_mnist_small",
        "bccd",
        "gtsrb",
        "road_signs",
    ):
        assert name in names
    for name in names:
        info = data.dataset_info(name)
        for key in ("licence", "citation", "homepage", "source", "folder", "layout"):
            assert info[key], (name, key)
    assert data.dataset_info("tf_flowers")["folder"] == "flower_photos"
    assert "15922772266_1167a06620" in data.dataset_info("tf_flowers")["notes"]
    assert data.dataset_info("pneumoniamnist")["class_names"] == ["normal", "pneumonia"]
    assert data.dataset_info("fashion_mnist")["class_names"][0] == "T-shirt/top"
    assert data.dataset_info("cats_and_dogs_filtered")["sha256"] == {
        "cats_and_dogs_filtered.zip": None  # None published: never invent one.
    }
    with pytest.raises(ValueError, match="Unknown dataset 'flowers'.*tf_flowers"):
        data.dataset_info("flowers")


def test_checksums_match_those_tensorflow_datasets_publishes():
    import tensorflow_datasets

    root = Path(tensorflow_datasets.__file__).parent
    published = {}
    for tsv in (
        root / "datasets" / "tf_flowers" / "checksums.tsv",
        root / "datasets" / "pneumonia_mnist" / "checksums.tsv",
        root / "url_checksums" / "fashion_mnist.txt",
    ):
        for line in tsv.read_text().splitlines():
            if line.strip():
                url, _, sha256, *_ = line.split("\t")
                published[url] = sha256
    checked = 0
    for name in ("tf_flowers", "pneumoniamnist", "fashion_mnist"):
        info = data.dataset_info(name)
        for url in info["urls"]:
            filename = catalog._entry(name).downloads[info["urls"].index(url)].filename
            assert info["sha256"][filename] == published[url], url
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------------------
# Resolution and downloads.
# ---------------------------------------------------------------------------


def test_not_found_error_explains_what_and_where(isolated):
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.load("tf_flowers", data_dir=isolated / "mine", download=False)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "'tf_flowers' was not found" in message
    assert "flower_photos/{daisy" in message
    assert str(isolated / "mine") in message
    assert str(isolated / "cache" / "datasets" / "flower_photos") in message
    assert "TLKIT_DATA_DIR" in message and "download=False" in message


def test_download_failure_becomes_clear_error_quickly(isolated, monkeypatch):
    calls = []

    def refuse(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(catalog.urllib.request, "urlopen", refuse)
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError, match="failed: URLError.*name resolution"):
        data.load("pneumoniamnist")
    assert time.monotonic() - start < 5
    assert calls and all(0 < timeout <= 10 for _, timeout in calls)
    assert not list((isolated / "cache").rglob("*.npz"))  # No partial file left.


def _flowers_like_tgz() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for class_index, name in enumerate(["daisy", "dandelion", "roses", "sunflowers", "tulips"]):
            for index in range(3):
                payload = _png_bytes((class_index * 50, index * 10, 0))
                member = tarfile.TarInfo(f"flower_photos/{name}/{index}.png")
                member.size = len(payload)
                archive.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


def test_download_with_wrong_checksum_is_discarded(isolated, monkeypatch):
    payload = _flowers_like_tgz()
    monkeypatch.setattr(
        catalog.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload)
    )
    with pytest.raises(data.DatasetNotFoundError, match="sha256 mismatch"):
        data.load("tf_flowers")
    assert not (isolated / "cache" / "datasets" / "flower_photos").exists()
    assert not (isolated / "cache" / "downloads" / "flower_photos.tgz").exists()


def test_download_verified_extracted_and_loaded(isolated, monkeypatch, capsys):
    payload = _flowers_like_tgz()
    monkeypatch.setattr(
        catalog.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload)
    )
    digest = hashlib.sha256(payload).hexdigest()
    entry = catalog._ENTRIES["tf_flowers"]
    fake = catalog._Download(entry.downloads[0].url, "flower_photos.tgz", digest, "test")
    monkeypatch.setitem(
        catalog._ENTRIES,
        "tf_flowers",
        catalog._Entry(**{**entry.__dict__, "downloads": (fake,)}),
    )
    dataset = data.load("tf_flowers", seed=0)
    assert dataset.class_names == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 15
    assert Path(dataset.info["path"]) == isolated / "cache" / "datasets" / "flower_photos"
    assert "downloading" in capsys.readouterr().out
    # The second call finds the cached copy without downloading.
    monkeypatch.setattr(catalog.urllib.request, "urlopen", None)
    assert len(data.load("tf_flowers").train) == len(dataset.train)


def test_unverified_download_prints_its_sha256(isolated, monkeypatch, capsys):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for split in ("train", "validation"):
            for name in ("cats", "dogs"):
                archive.writestr(f"cats_and_dogs_filtered/{split}/{name}/1.png", _png_bytes(1))
    payload = buffer.getvalue()
    monkeypatch.setattr(
        catalog.urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload)
    )
    dataset = data.load("cats_and_dogs_filtered", allow_unverified=True)
    assert (len(dataset.train), len(dataset.validation), dataset.test) == (2, 2, None)
    output = capsys.readouterr().out
    assert hashlib.sha256(payload).hexdigest() in output and "NOT verified" in output


def test_unverified_download_is_refused_without_opt_in(isolated, monkeypatch):
    # `isolated` makes any network call fail the test: the refusal comes first.
    with pytest.raises(data.DatasetNotFoundError, match="Download refused: no sha256"):
        data.load("cats_and_dogs_filtered")
    monkeypatch.setenv("TLKIT_ALLOW_UNVERIFIED_DOWNLOADS", "1")
    with pytest.raises(AssertionError, match="must not open network"):
        data.load("cats_and_dogs_filtered")  # The opt-in reaches the download.


def test_every_download_but_one_has_a_published_sha256():
    unverified = {
        name
        for name in data.list_datasets()
        for digest in data.dataset_info(name)["sha256"].values()
        if digest is None
    }
    # Google publishes no checksum for cats_and_dogs_filtered.zip; it needs the opt-in.
    assert unverified == {"cats_and_dogs_filtered"}


# ---------------------------------------------------------------------------
# safe_extract.
# ---------------------------------------------------------------------------


def _tar_with(tmp_path, name, kind=tarfile.REGTYPE, linkname="") -> Path:
    path = tmp_path / "crafted.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        good = tarfile.TarInfo("good/file.txt")
        good.size = 2
        archive.addfile(good, io.BytesIO(b"ok"))
        member = tarfile.TarInfo(name)
        member.type = kind
        member.linkname = linkname
        member.size = 4 if kind == tarfile.REGTYPE else 0
        archive.addfile(member, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    return path


def test_safe_extract_refuses_zip_slip(tmp_path):
    archive = tmp_path / "crafted.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("good/file.txt", "ok")
        handle.writestr("../evil.txt", "evil")
    target = tmp_path / "out" / "target"
    with pytest.raises(data.UnsafeArchiveError, match=r"'\.\./evil\.txt' contains '\.\.'"):
        data.safe_extract(archive, target)
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not (target / "good" / "file.txt").exists()  # Nothing extracted at all.


@pytest.mark.parametrize(
    "name, kind, linkname, match",
    [
        ("../evil", tarfile.REGTYPE, "", "contains '..'"),
        ("good/../../evil", tarfile.REGTYPE, "", "contains '..'"),
        ("/tmp/evil_absolute", tarfile.REGTYPE, "", "absolute path"),
        ("link", tarfile.SYMTYPE, "/etc/passwd", "symbolic|link"),
        ("hard", tarfile.LNKTYPE, "../../outside", "link"),
    ],
)
def test_safe_extract_refuses_crafted_tar(tmp_path, name, kind, linkname, match):
    archive = _tar_with(tmp_path, name, kind, linkname)
    target = tmp_path / "out" / "target"
    with pytest.raises(data.UnsafeArchiveError, match=match):
        data.safe_extract(archive, target)
    assert not (tmp_path / "out" / "evil").exists()
    assert not (target / "good" / "file.txt").exists()


def test_safe_extract_extracts_ordinary_archives(tmp_path):
    archive = _tar_with(tmp_path, "good/second.txt")
    target = data.safe_extract(archive, tmp_path / "target")
    assert (target / "good" / "file.txt").read_text() == "ok"
    assert (target / "good" / "second.txt").read_text() == "evil"
    not_archive = tmp_path / "plain.txt"
    not_archive.write_text("hello")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        data.safe_extract(not_archive, tmp_path / "other")


# ---------------------------------------------------------------------------
# Named datasets.
# ---------------------------------------------------------------------------


def test_fashion_mnist_small_is_embedded(isolated):
    dataset = data.load("fashion_mnist_small", download=False)
    assert dataset.num_classes == 10 and dataset.class_names[9] == "Ankle boot"
    assert (len(dataset.train), len(dataset.test), dataset.validation) == (1000, 500, None)
    assert dataset.train.images.shape == (1000, 28, 28)
    assert set(dataset.report.class_counts["train"].values()) == {100}
    assert set(dataset.report.class_counts["test"].values()) == {50}
    images, labels = next(iter(dataset.train.to_dataset(batch_size=16, shuffle=True, seed=0)))
    assert images.shape == (16, 28, 28, 3) and labels.dtype.name == "int32"
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 255.0


def test_detection_dataset_through_load_is_refused():
    with pytest.raises(ValueError, match=r"load_detection\('bccd'\)"):
        data.load("bccd", download=False)
    with pytest.raises(ValueError, match=r"tlkit.data.load\('tf_flowers'\)"):
        data.load_detection("tf_flowers", download=False)


def test_tf_flowers_from_shared_folder(shared_datasets):
    dataset = data.load("tf_flowers", data_dir=shared_datasets, download=False)
    assert dataset.class_names == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (2936, 367, 367)
    totals = {
        name: sum(
            dataset.report.class_counts[split][name] for split in ("train", "validation", "test")
        )
        for name in dataset.class_names
    }
    assert totals == {
        "daisy": 633,
        "dandelion": 898,
        "roses": 641,
        "sunflowers": 699,
        "tulips": 799,
    }
    assert dataset.report.skipped == []
    again = data.load("tf_flowers", data_dir=shared_datasets / "flower_photos", download=False)
    assert again.test.paths == dataset.test.paths
    assert again.test.fingerprint() == dataset.test.fingerprint()
    other_seed = data.load("tf_flowers", data_dir=shared_datasets, download=False, seed=1)
    assert other_seed.test.paths != dataset.test.paths
    images, labels = next(iter(dataset.test.to_dataset(image_size=96, batch_size=8)))
    assert images.shape == (8, 96, 96, 3)
    np.testing.assert_array_equal(labels.numpy(), dataset.test.labels[:8])


def test_cats_and_dogs_from_shared_folder(shared_datasets, monkeypatch):
    monkeypatch.setenv("TLKIT_DATA_DIR", str(shared_datasets))
    dataset = data.load("cats_and_dogs_filtered", download=False, image_size=64)
    assert dataset.class_names == ["cats", "dogs"]
    assert dataset.test is None
    assert dataset.report.class_counts == {
        "train": {"cats": 1000, "dogs": 1000},
        "validation": {"cats": 500, "dogs": 500},
    }
    assert all("/validation/" in path for path in dataset.validation.paths)
    batches = list(dataset.train.to_dataset(batch_size=16, shuffle=True, seed=0).take(2))
    assert [tuple(images.shape) for images, _ in batches] == [(16, 64, 64, 3)] * 2


def test_pneumoniamnist_from_shared_folder(shared_datasets):
    dataset = data.load("pneumoniamnist", data_dir=shared_datasets, download=False)
    assert dataset.class_names == ["normal", "pneumonia"]
    assert dataset.report.class_counts == {
        "train": {"normal": 1214, "pneumonia": 3494},
        "validation": {"normal": 135, "pneumonia": 389},
        "test": {"normal": 234, "pneumonia": 390},
    }
    assert dataset.train.images.shape == (4708, 28, 28) and dataset.train.labels.dtype == np.int32
    images, labels = next(iter(dataset.test.to_dataset(image_size=32, batch_size=64)))
    assert images.shape == (64, 32, 32, 3)
    np.testing.assert_array_equal(images.numpy()[..., 0], images.numpy()[..., 2])
    np.testing.assert_array_equal(labels.numpy(), dataset.test.labels[:64])


def test_bccd_detection_from_shared_folder(shared_datasets):
    dataset = data.load_detection("bccd", data_dir=shared_datasets, download=False)
    assert dataset.class_names == ["RBC", "WBC", "Platelets"]
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (205, 87, 72)
    assert len(dataset.dropped_boxes) == 2
    assert sorted(Path(path).stem for path, _ in dataset.dropped_boxes) == [
        "BloodImage_00338",
        "BloodImage_00343",
    ]
    boxes = sum(sum(counts.values()) for counts in dataset.report.class_counts.values())
    assert boxes == 4888 - 2
    for example in dataset.train + dataset.validation + dataset.test:
        image_path, example_boxes, labels = example
        assert Path(image_path).is_file()
        assert example_boxes.dtype == np.float32 and example_boxes.shape == (len(labels), 4)
        assert labels.dtype == np.int32
        assert np.all(example_boxes[:, 2] > example_boxes[:, 0])
        assert np.all(example_boxes[:, 3] > example_boxes[:, 1])


def test_gtsrb_from_shared_folder(shared_datasets):
    if not (shared_datasets / "gtsrb").is_dir():
        pytest.skip(f"gtsrb not found in {shared_datasets}")
    dataset = data.load("gtsrb", data_dir=shared_datasets, download=False)
    # Class names are the folder names NN_name, in the official class-id order.
    assert len(dataset.class_names) == 43
    assert [int(name[:2]) for name in dataset.class_names] == list(range(43))
    assert dataset.class_names[0] == "00_speed_limit_20"
    assert dataset.class_names[42] == "42_end_of_no_passing_over_3.5t"
    # The shipped split, as the datasets README states it.
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (2580, 633, 1674)
    assert set(dataset.report.class_counts["train"].values()) == {60}
    validation = dataset.report.class_counts["validation"]
    assert validation["19_dangerous_curve_left"] == 3
    assert {count for name, count in validation.items() if not name.startswith("19_")} == {15}
    assert max(dataset.report.class_counts["test"].values()) == 40
    assert dataset.report.skipped == []
    # Split by physical sign: no track (file-name prefix) appears in two splits.
    tracks = {
        split: {(Path(path).parent.name, Path(path).name.split("_")[0]) for path in paths}
        for split, paths in (("train", dataset.train.paths), ("val", dataset.validation.paths))
    }
    assert not tracks["train"] & tracks["val"]
    assert "Stallkamp" in dataset.info["citation"]


def test_local_only_datasets_say_how_to_get_them(isolated):
    for name, loader in (("gtsrb", data.load), ("road_signs", data.load_detection)):
        assert data.dataset_info(name)["urls"] == []  # No invented URL or checksum.
        with pytest.raises(data.DatasetNotFoundError, match="local only.*To get it: download"):
            loader(name, data_dir=isolated / "mine")  # download=True: still no network.
        assert "local only" in data.how_to_get(name)


def test_road_signs_detection_from_shared_folder(shared_datasets):
    if not (shared_datasets / "road_signs").is_dir():
        pytest.skip(f"road_signs not found in {shared_datasets}")
    dataset = data.load_detection("road_signs", data_dir=shared_datasets, download=False)
    assert dataset.class_names == ["speedlimit", "crosswalk", "trafficlight", "stop"]
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (613, 88, 176)
    totals = {
        name: sum(counts[name] for counts in dataset.report.class_counts.values())
        for name in dataset.class_names
    }
    assert totals == {"speedlimit": 783, "crosswalk": 200, "trafficlight": 170, "stop": 91}
    assert dataset.dropped_boxes == []  # No zero-area boxes in this set.
    boxes = np.concatenate(
        [example.boxes for example in dataset.train + dataset.validation + dataset.test]
    )
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert int(np.sum(areas < 32 * 32)) == 412  # "smaller than 32x32 px" (COCO's small).
    assert all(Path(example.image_path).is_file() for example in dataset.test)
