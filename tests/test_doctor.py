"""Tests for tlkit.preflight: the pre-flight check of models and data."""

from __future__ import annotations

import argparse
import json
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

import tlkit
from tlkit import data
from tlkit.cli import add_doctor_command
from tlkit.preflight import doctor, doctor_command, doctor_detection

SIZE = 64


def _photo(seed: int, size: int = 64) -> Image.Image:
    """A smooth random image (blurred blobs), so resized copies keep their hash."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def _save(image: Image.Image, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def leaky_folder(tmp_path):
    """train/ and validation/ with a cross-split copy, a two-label copy and a resized copy."""
    root = tmp_path / "leaky"
    seed = 0
    for split, count in (("train", 6), ("validation", 3)):
        for class_name in ("cat", "dog"):
            for index in range(count):
                seed += 1
                _save(_photo(seed), root / split / class_name / f"{index}.png")
    shutil.copy(root / "train" / "cat" / "0.png", root / "validation" / "cat" / "copy.png")
    shutil.copy(root / "train" / "cat" / "1.png", root / "train" / "dog" / "mislabelled.png")
    with Image.open(root / "train" / "dog" / "2.png") as original:
        _save(
            original.resize((48, 48), Image.Resampling.BILINEAR),
            root / "validation" / "dog" / "small.png",
        )
    return root


def _model(**kwargs) -> keras.Model:
    return tlkit.build_classifier("mobilenet_v2", 3, image_size=SIZE, weights=None, **kwargs)


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


def test_duplicates_across_splits_and_under_two_labels(leaky_folder):
    report = doctor(data=str(leaky_folder))

    assert not report.ok
    conflict = report.get("duplicate_label_conflict")
    assert conflict.severity == "error"
    assert conflict.details["count"] == 1
    assert "train: train/cat/1.png (cat)" in conflict.details["groups"][0]
    assert "train: train/dog/mislabelled.png (dog)" in conflict.details["groups"][0]
    across = report.get("duplicates_across_splits")
    assert across.details["counts"] == {"train/validation": 1}
    assert "validation: validation/cat/copy.png (cat)" in across.details["groups"][0]
    within = report.get("duplicates_within_split")
    assert within.details["counts"] == {"train": 1}
    near = report.get("near_duplicates_across_splits")
    assert near.details["counts"] == {"train/validation": 1}
    assert (
        "train/dog/2.png" in near.details["pairs"][0]
        and "validation/dog/small.png" in near.details["pairs"][0]
    )
    assert not report.has("class_imbalance")
    assert "duplicate_label_conflict" in str(report)
    json.dumps(report.to_dict())


def test_near_duplicate_search_can_be_switched_off(leaky_folder):
    report = doctor(data=data.from_directory(leaky_folder), near_duplicates=False)
    assert report.has("duplicate_label_conflict")
    assert not report.has("near_duplicates_across_splits")


def test_clean_data_has_no_findings(tmp_path):
    for class_name in ("a", "b"):
        for index in range(5):
            _save(
                _photo(100 * ord(class_name) + index),
                tmp_path / class_name / f"{index}.png",
            )
    report = doctor(data=data.from_directory(tmp_path, validation_split=0.4))
    assert report.ok and report.findings == [], str(report)


def test_class_imbalance_reports_balanced_class_weights():
    labels = np.array([0] * 30 + [1] * 10)
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    split = data.ImageSplit("train", ["common", "rare"], labels, images=images)
    report = doctor(data=split, near_duplicates=False)

    finding = report.get("class_imbalance")
    assert finding.severity == "warning"
    assert finding.details["ratio"] == pytest.approx(3.0)
    # sklearn 'balanced': n_samples / (n_classes * count) = 40 / (2 * 30), 40 / (2 * 10).
    assert finding.details["class_weight"] == pytest.approx(
        {"common": 2 / 3, "rare": 2.0}, abs=1e-4
    )
    assert finding.details["class_weight_by_index"] == pytest.approx({0: 2 / 3, 1: 2.0}, abs=1e-4)

    balanced = data.ImageSplit("train", ["a", "b"], [0] * 12 + [1] * 10, images=images[:22])
    assert not doctor(data=balanced, near_duplicates=False).has("class_imbalance")


def test_in_memory_duplicates_are_counted_as_repeats_and_shared_images():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    train_images = np.concatenate([images[:6], images[[0, 0, 1]]])  # 3 repeats in train
    validation_images = np.concatenate([images[[0, 2]], images[6:]])  # 2 images shared
    train = data.ImageSplit("train", ["a", "b"], [0, 1, 0, 1, 0, 1, 0, 0, 0], images=train_images)
    validation = data.ImageSplit("validation", ["a", "b"], [0] * 6, images=validation_images)
    dataset = data.ImageDataset("toy", ["a", "b"], train, validation)

    report = doctor(data=dataset, near_duplicates=False)
    assert report.get("duplicates_within_split").details["counts"] == {"train": 3}
    assert report.get("duplicates_across_splits").details["counts"] == {"train/validation": 2}
    assert report.get("duplicate_label_conflict").details["count"] == 1  # image 1: b, then a


def test_unreadable_file_in_a_split_is_reported(tmp_path):
    paths = []
    for index in range(4):
        path = tmp_path / f"{index}.png"
        _photo(index).save(path)
        paths.append(str(path))
    (tmp_path / "3.png").write_bytes(b"not an image")
    split = data.ImageSplit("train", ["a", "b"], [0, 0, 1, 1], paths=paths)
    report = doctor(data=split)
    finding = report.get("unreadable_files")
    assert finding.severity == "warning"
    assert len(finding.details["unreadable_in_splits"]) == 1
    assert "3.png" in finding.details["unreadable_in_splits"][0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="Received: model=None"):
        doctor()
    with pytest.raises(ValueError, match="sample_size"):
        doctor(data=np.zeros((1, 4, 4, 3)), sample_size=0)
    with pytest.raises(TypeError, match="Received: data=int"):
        doctor(data=3)


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------


def test_data_scaled_to_unit_range_is_flagged_for_a_tlkit_model():
    import tensorflow as tf

    model = _model()
    images = np.random.default_rng(0).uniform(0, 255, (8, SIZE, SIZE, 3)).astype("float32")
    labels = np.zeros(8, dtype="int32")

    scaled = tf.data.Dataset.from_tensor_slices((images / 255.0, labels)).batch(4)
    report = doctor(model, scaled)
    finding = report.get("input_range_mismatch")
    assert finding.severity == "error" and not report.ok
    assert finding.details["model_expects"] == "0..255"
    assert finding.details["data_range"] == "0..1"
    assert "ImagePreprocessing" in finding.details["preprocessing"]

    assert not doctor(model, (images, labels)).has("input_range_mismatch")
    raw = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    assert doctor(model, raw).ok


def test_model_without_preprocessing_fed_raw_pixels():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    raw = np.full((2, SIZE, SIZE, 3), 200.0, dtype="float32")
    assert doctor(model, raw).has("no_input_preprocessing")
    assert doctor(model, raw).has("not_compiled")
    assert not doctor(model, raw / 255.0).has("no_input_preprocessing")


def test_trainable_batch_norm_and_missing_recompile_are_flagged_and_cleared_by_unfreeze():
    model = _model()
    assert doctor(model).findings == []

    tlkit.models.find_base(model).trainable = True
    report = doctor(model)
    batch_norm = report.get("trainable_batch_normalization")
    assert batch_norm is not None and batch_norm.details["count"] > 10
    assert batch_norm.details["statistics_update"] is False  # the base runs with training=False
    not_recompiled = report.get("not_recompiled")
    assert not_recompiled is not None and not_recompiled.details["changed_layers"] > 0

    tlkit.unfreeze(model, blocks=2)
    report = doctor(model)
    assert not report.has("trainable_batch_normalization")
    assert not report.has("not_recompiled")
    assert not report.has("high_fine_tune_learning_rate")


def test_changed_after_fit_without_recompile_is_an_error():
    model = _model()
    # What the first fit does (Trainer._symbolic_build): the optimizer learns the head's variables.
    model.optimizer.build(model.trainable_variables)
    tlkit.models.find_base(model).trainable = True

    report = doctor(model)
    finding = report.get("not_recompiled")
    assert finding.severity == "error" and not report.ok
    assert finding.details["differing_variables"] > 0
    assert report.has("high_fine_tune_learning_rate")

    tlkit.unfreeze(model, blocks=1)
    assert doctor(model).ok


def test_model_and_data_class_count_must_match():
    model = _model()
    split = data.ImageSplit(
        "train", ["a", "b"], [0, 1], images=np.full((2, 8, 8, 3), 100, dtype=np.uint8)
    )
    report = doctor(model, split, near_duplicates=False)
    assert report.get("num_classes_mismatch").severity == "error"


def test_uncompiled_model_is_a_warning():
    head = tlkit.build_head(8, 2)
    report = doctor(head)
    assert report.get("not_compiled").severity == "warning"
    assert report.ok


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def test_doctor_command_exit_code_and_parser(leaky_folder, tmp_path, capsys):
    assert doctor_command(str(leaky_folder), near_duplicates=False) == 1
    assert "duplicate_label_conflict" in capsys.readouterr().out

    clean = tmp_path / "clean"
    for class_name in ("a", "b"):
        for index in range(3):
            _save(_photo(1000 + 10 * ord(class_name) + index), clean / class_name / f"{index}.png")
    parser = argparse.ArgumentParser()
    add_doctor_command(parser.add_subparsers(dest="command"))
    arguments = parser.parse_args(["doctor", str(clean), "--json"])
    assert arguments.handler(arguments) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    with pytest.raises(FileNotFoundError, match="Received: data="):
        doctor_command(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------
# The known flaws of the shared datasets (README "Known flaws").
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_flowers_three_identical_pairs_one_under_two_labels(shared_datasets):
    flowers = data.load("tf_flowers", data_dir=shared_datasets, download=False)
    report = doctor(data=flowers)

    groups = set()
    for code in ("duplicates_across_splits", "duplicates_within_split"):
        finding = report.get(code)
        if finding is not None:
            groups.update(tuple(group) for group in finding.details["groups"])
    assert len(groups) == 3
    assert all(len(group) == 2 for group in groups)
    conflict = report.get("duplicate_label_conflict")
    assert conflict.severity == "error" and conflict.details["count"] == 1
    names = " ".join(conflict.details["groups"][0])
    assert "roses/15922772266_1167a06620.jpg (roses)" in names
    assert "tulips/15922772266_1167a06620.jpg (tulips)" in names
    assert not report.has("unreadable_files")
    assert not report.has("class_imbalance")  # 898 / 633 < 1.5


def test_pneumoniamnist_duplicate_counts(shared_datasets):
    pneumonia = data.load("pneumoniamnist", data_dir=shared_datasets, download=False)
    report = doctor(data=pneumonia)
    assert report.get("duplicates_within_split").details["counts"] == {"train": 18, "test": 3}
    assert report.get("duplicates_across_splits").details["counts"] == {"train/validation": 8}
    assert not report.has("duplicate_label_conflict")
    imbalance = report.get("class_imbalance")
    assert imbalance.details["counts"] == {"normal": 1214, "pneumonia": 3494}


def test_bccd_zero_area_boxes(shared_datasets):
    bccd = data.load_detection("bccd", data_dir=shared_datasets, download=False)
    report = doctor_detection(bccd)
    finding = report.get("zero_area_boxes")
    assert finding.details["count"] == 2
    assert finding.details["files"] == ["BloodImage_00338", "BloodImage_00343"]
    assert not report.has("duplicate_images")
