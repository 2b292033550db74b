"""Reliability of data loading and `doctor` (issue #15, items B and I)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tlkit import data
from tlkit.preflight import doctor


def _photo(seed: int, size: int = 64) -> Image.Image:
    """A smooth random image (blurred blobs), so resized copies keep their hash."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def _folder(root, classes=("daisy", "roses"), count=4):
    seed = 0
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(count):
            seed += 1
            _photo(seed).save(root / name / f"{index}.png")
    return root


# ---------------------------------------------------------------------------
# I: a class folder that links back into the data.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["root", "parent", "sibling"])
def test_a_class_folder_linking_back_into_the_data_is_refused(tmp_path, target):
    root = _folder(tmp_path / "photos")
    destination = {"root": root, "parent": tmp_path, "sibling": root / "daisy"}[target]
    os.symlink(destination, root / "everything", target_is_directory=True)
    with pytest.raises(ValueError, match="is a link to .* second label") as caught:
        data.from_directory(root)
    assert "everything" in str(caught.value) and "Received: class_folder=" in str(caught.value)


def test_a_class_folder_linking_elsewhere_is_kept(tmp_path):
    root = _folder(tmp_path / "photos")
    elsewhere = _folder(tmp_path / "other-disk", classes=("tulips",))
    os.symlink(elsewhere / "tulips", root / "tulips", target_is_directory=True)
    dataset = data.from_directory(root, validation_split=0.0)
    assert dataset.class_names == ["daisy", "roses", "tulips"]
    assert dataset.train.class_counts() == {"daisy": 4, "roses": 4, "tulips": 4}


# ---------------------------------------------------------------------------
# B: a near-identical image under two labels in the same split.
# ---------------------------------------------------------------------------


def test_doctor_finds_a_resized_copy_under_another_label_in_the_same_split(tmp_path):
    root = _folder(tmp_path / "photos")
    with Image.open(root / "daisy" / "2.png") as original:
        original.resize((48, 48), Image.Resampling.BILINEAR).save(root / "roses" / "resized.png")
    dataset = data.from_directory(root, validation_split=0.0)  # One split: train.
    report = doctor(data=dataset)
    assert not report.ok
    conflict = report.get("near_duplicate_label_conflict")
    assert conflict is not None and conflict.severity == "error", str(report)
    assert conflict.details["count"] == 1
    pair = conflict.details["pairs"][0]
    assert "daisy/2.png (daisy)" in pair and "roses/resized.png (roses)" in pair
    assert "OK" not in str(report).splitlines()[0]


def test_doctor_does_not_call_a_same_label_copy_a_conflict(tmp_path):
    root = _folder(tmp_path / "photos")
    with Image.open(root / "daisy" / "2.png") as original:
        original.resize((48, 48), Image.Resampling.BILINEAR).save(root / "daisy" / "resized.png")
    report = doctor(data=data.from_directory(root, validation_split=0.0))
    assert not report.has("near_duplicate_label_conflict")
    assert report.ok, str(report)
