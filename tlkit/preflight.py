"""A pre-flight check for what usually ruins a transfer-learning run.

`doctor` looks at a model and/or a dataset before any training and reports:

- Model: an input range that does not match the model's preprocessing (the
  classic mistake is feeding images scaled to 0..1 to a model that normalises
  raw 0..255 pixels itself), trainable BatchNormalization layers in the
  pretrained base, `trainable` flags changed since the last `compile` (Keras
  only picks them up when recompiling), a high learning rate while the base is
  trainable, a model that was never compiled, and a class count or class order
  that differs from the data's.
- Data: class imbalance (with the class weights to use), byte-identical images
  within and between splits (and above all under two labels), near-identical
  images between splits or under two labels (in any split), and unreadable
  files.
- Detection data: boxes the loader dropped (zero-area or malformed) and
  duplicate images.

Example:

>>> import tlkit
>>> from tlkit.preflight import doctor
>>> report = doctor(data=tlkit.data.load("tf_flowers"))
>>> print(report)
>>> report.has("duplicate_label_conflict")
True
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlkit._keras_compat import (
    compiled_trainable_state,
    flatten_layers,
    inbound_nodes,
    optimizer_variables,
)
from tlkit.backbones.preprocessing import ImagePreprocessing
from tlkit.data import (
    DetectionDataset,
    ImageDataset,
    ImageSplit,
    check_image,
    dataset_info,
    from_directory,
    load,
    load_detection,
    load_image,
)
from tlkit.data.source import data_kind
from tlkit.models import find_base, get_class_names
from tlkit.predict import load_classifier

__all__ = [
    "SEVERITIES",
    "DoctorReport",
    "Finding",
    "doctor",
    "doctor_command",
    "doctor_detection",
]

SEVERITIES = ("error", "warning", "info")

# Class imbalance above this ratio of largest to smallest class is reported.
IMBALANCE_RATIO = 1.5
# Near-duplicate thresholds (see `_fingerprints`): Hamming distance of two 64-bit
# difference hashes, and mean absolute difference of two mean-centred 16x16 grey
# thumbnails in 0..255 units. Measured on the shared data: copies of one photo
# re-encoded or slightly edited score 0..1 and under 4; different 28 px chest
# X-rays with equal hashes still differ by more than 8.
NEAR_DUPLICATE_DISTANCE = 2
NEAR_DUPLICATE_DIFFERENCE = 4.0
# A learning rate at or above this while the base is trainable wrecks pretrained features.
FINE_TUNE_LEARNING_RATE = 1e-4

_MAX_LISTED = 10
_HASH_SIZE = 8
_THUMBNAIL_SIZE = 16
_PAIR_CHUNK = 1024
_RANGE_FILE_SAMPLES = 32


# ---------------------------------------------------------------------------
# Findings and the report.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing the doctor noticed.

    Attributes:
        severity: `"error"` (the run will be wrong), `"warning"` (it will
            probably be worse than it could be) or `"info"`.
        code: A short stable identifier, e.g. `"input_range_mismatch"`.
        message: What is wrong and how to fix it.
        details: Numbers and names behind the message (JSON-serialisable).
    """

    severity: str
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable copy."""
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "details": _jsonable(self.details),
        }


@dataclass
class DoctorReport:
    """The findings of `doctor`, most severe first.

    Attributes:
        findings: The findings, errors first, then warnings, then infos.
        seconds: Time spent per check, in seconds.
    """

    findings: list[Finding] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether there is no error (warnings and infos are allowed)."""
        return not any(finding.severity == "error" for finding in self.findings)

    def has(self, code: str) -> bool:
        """Returns whether a finding with this `code` was reported."""
        return any(finding.code == code for finding in self.findings)

    def get(self, code: str) -> Finding | None:
        """Returns the first finding with this `code`, or None."""
        return next((finding for finding in self.findings if finding.code == code), None)

    def count(self, severity: str) -> int:
        """Returns how many findings have this severity."""
        return sum(finding.severity == severity for finding in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable copy."""
        return {
            "ok": self.ok,
            "findings": [finding.to_dict() for finding in self.findings],
            "seconds": {name: round(value, 3) for name, value in self.seconds.items()},
        }

    def __str__(self) -> str:
        counts = ", ".join(
            f"{self.count(severity)} {severity}{'s' if self.count(severity) != 1 else ''}"
            for severity in SEVERITIES
        )
        verdict = "OK" if self.ok else "PROBLEMS FOUND"
        lines = [f"tlkit doctor: {verdict} ({counts})"]
        if not self.findings:
            lines.append("  nothing to report")
        for finding in self.findings:
            lines.append(f"{finding.severity.upper():7} {finding.code}: {finding.message}")
            for item in finding.details.get("examples", [])[:3]:
                lines.append(f"          - {item}")
        return "\n".join(lines)

    def _add(self, severity: str, code: str, message: str, **details: Any) -> None:
        self.findings.append(Finding(severity, code, message, details))

    def _sort(self) -> None:
        self.findings.sort(key=lambda finding: SEVERITIES.index(finding.severity))


# ---------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------


def doctor(
    model=None,
    data=None,
    sample_size: int = 256,
    near_duplicates: bool = True,
) -> DoctorReport:
    """Checks a model and/or a dataset for what usually ruins a transfer-learning run.

    Args:
        model: A `keras.Model` (e.g. from `tlkit.build_classifier` or
            `tlkit.load_classifier`), or None. Defaults to None.
        data: What the model will be trained on: an `ImageDataset`, an
            `ImageSplit`, a folder of class sub-folders (loaded with
            `tlkit.data.from_directory`), a `DetectionDataset`, or, for the
            input-range check only, a `tf.data.Dataset` of `(images, labels)`
            or an image array. Defaults to None.
        sample_size: How many images to sample for the pixel-range check.
            Defaults to 256.
        near_duplicates: Whether to look for near-identical images between
            splits (a perceptual hash of every image; a few seconds for a few
            thousand photos). Defaults to True.

    Returns:
        A `DoctorReport`; `report.ok` is False when there is an error.

    Raises:
        ValueError: If neither `model` nor `data` is given, or `sample_size`
            is not a positive int.
        TypeError: If `model` is not a `keras.Model` or `data` is of an
            unsupported type.

    Example:
        >>> model = tlkit.build_classifier("mobilenet_v2", 5, image_size=160)
        >>> report = doctor(model, tlkit.data.load("tf_flowers"))
        >>> report.ok, report.has("class_imbalance")
        (False, False)
    """
    if model is None and data is None:
        raise ValueError(
            "Give a model, data or both to check, e.g. doctor(model, dataset). "
            "Received: model=None, data=None"
        )
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
        raise ValueError(
            f"`sample_size` must be a positive int, e.g. 256. Received: sample_size={sample_size!r}"
        )
    if isinstance(data, (str, os.PathLike)):
        data = _load_folder(data)
    if isinstance(data, ImageSplit):
        data = ImageDataset(data.name, data.class_names, data, report=data.report)

    report = DoctorReport()
    if isinstance(data, DetectionDataset):
        start = time.perf_counter()
        _check_detection(report, data)
        report.seconds["detection"] = time.perf_counter() - start
        if model is not None:
            _check_model(report, model, None, sample_size)
        report._sort()
        return report

    if model is not None:
        start = time.perf_counter()
        _check_model(report, model, data, sample_size)
        report.seconds["model"] = time.perf_counter() - start
    if isinstance(data, ImageDataset):
        _check_dataset(report, data, near_duplicates)
    elif data is not None and model is None and not _is_pixel_source(data):
        raise TypeError(
            "`data` must be an ImageDataset, an ImageSplit, a folder path, a "
            "DetectionDataset, a tf.data.Dataset or an image array. "
            f"Received: data={type(data).__name__}"
        )
    report._sort()
    return report


def doctor_detection(dataset: DetectionDataset) -> DoctorReport:
    """Checks a detection dataset: dropped boxes, skipped files, duplicate images.

    Args:
        dataset: A `DetectionDataset` from `tlkit.data.load_detection`.

    Returns:
        A `DoctorReport`.

    Raises:
        TypeError: If `dataset` is not a `DetectionDataset`.
    """
    if not isinstance(dataset, DetectionDataset):
        raise TypeError(
            "`dataset` must be a DetectionDataset from tlkit.data.load_detection. "
            f"Received: dataset={type(dataset).__name__}"
        )
    return doctor(data=dataset)


def doctor_command(
    data: str, model: str | None = None, near_duplicates: bool = True, as_json: bool = False
) -> int:
    """Runs `doctor` for the command line and prints the report.

    Args:
        data: A folder with one sub-folder per class, or a catalog name from
            `tlkit.data.list_datasets()` (a detection dataset such as "bccd" is
            loaded with `load_detection`).
        model: A `.keras` model file to check against the data, or None.
            Defaults to None.
        near_duplicates: Whether to look for near-identical images between
            splits. Defaults to True.
        as_json: Print the report as JSON instead of text. Defaults to False.

    Returns:
        The exit code: 1 if the report has an error, else 0.

    Raises:
        FileNotFoundError: If `data` is neither a folder nor a dataset name.
    """
    if data_kind(data) == "folder":
        dataset = _load_folder(data)
    elif dataset_info(data)["task"] == "detection":
        dataset = load_detection(data)
    else:
        dataset = load(data)
    loaded_model = None
    if model is not None:
        loaded_model = load_classifier(model)
    report = doctor(loaded_model, dataset, near_duplicates=near_duplicates)
    print(json.dumps(report.to_dict(), indent=2) if as_json else report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------
# Model checks.
# ---------------------------------------------------------------------------


def _check_model(report: DoctorReport, model, data, sample_size: int) -> None:
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a keras.Model, e.g. from tlkit.build_classifier. "
            f"Received: model={type(model).__name__}"
        )
    _check_compiled(report, model)
    _check_batch_normalization(report, model)
    if data is not None:
        _check_input_range(report, model, data, sample_size)
        if isinstance(data, ImageDataset):
            _check_classes(report, model, data)


def _check_compiled(report: DoctorReport, model) -> None:
    if not getattr(model, "compiled", False):
        report._add(
            "warning",
            "not_compiled",
            "The model is not compiled, so it cannot be trained. Call "
            "tlkit.heads.compile_classifier(model) (or model.compile(...)) before fit.",
        )
        return
    # Keras 3 snapshots every layer's `trainable` flag in `compile`
    # (`_compiled_trainable_state`). Once the optimizer is built (first fit) it
    # also holds the list of variables it updates, and the traced train step
    # keeps using that list until the model is recompiled.
    changed = []
    snapshot = compiled_trainable_state(model)
    if snapshot is not None:
        changed = [
            layer.name
            for layer in flatten_layers(model)
            if layer in snapshot and layer.trainable != snapshot[layer]
        ]
    optimizer = getattr(model, "optimizer", None)
    stale_variables = 0
    if optimizer is not None and getattr(optimizer, "built", False):
        known = {id(variable) for variable in optimizer_variables(optimizer)}
        current = {id(variable) for variable in model.trainable_variables}
        stale_variables = len(known ^ current)
    if changed or stale_variables:
        built = stale_variables > 0
        report._add(
            "error" if built else "warning",
            "not_recompiled",
            f"`trainable` changed on {len(changed)} layer(s) since the model was compiled"
            + (
                f", and the optimizer still updates the old set of variables "
                f"({stale_variables} differ); fit would keep training the old ones"
                if built
                else "; Keras only applies the change (and a low fine-tuning learning "
                "rate) when you recompile"
            )
            + ". Use tlkit.unfreeze(model, ...), which recompiles, or call "
            "tlkit.heads.compile_classifier(model, learning_rate=1e-5) after changing "
            "`trainable`.",
            changed_layers=len(changed),
            differing_variables=stale_variables,
            examples=changed[:_MAX_LISTED],
        )
    learning_rate = _learning_rate(optimizer)
    if (
        learning_rate is not None
        and learning_rate >= FINE_TUNE_LEARNING_RATE
        and next(_base_trainable_variables(model), None) is not None
    ):
        report._add(
            "warning",
            "high_fine_tune_learning_rate",
            f"The pretrained base has trainable weights but the learning rate is "
            f"{learning_rate:g}; large updates wreck the pretrained features. Fine-tune "
            "with about 1e-5: tlkit.unfreeze(model, learning_rate=1e-5).",
            learning_rate=learning_rate,
        )


def _check_batch_normalization(report: DoctorReport, model) -> None:
    import keras

    trainable = []
    updating = []
    for base, called_in_inference in _nested_bases(model):
        if not base.trainable:
            continue
        for layer in _walk_trainable(base, True):
            if isinstance(layer, keras.layers.BatchNormalization):
                trainable.append(layer.name)
                if not called_in_inference:
                    updating.append(layer.name)
    if not trainable:
        return
    if updating:
        message = (
            f"{len(updating)} BatchNormalization layer(s) in the pretrained base are "
            "trainable and the base is not called with training=False, so fit will "
            "overwrite their ImageNet statistics with those of your small batches. "
        )
    else:
        message = (
            f"{len(trainable)} BatchNormalization layer(s) in the pretrained base are "
            "trainable; their statistics stay frozen (the base runs with "
            "training=False) but their scale and offset will drift. "
        )
    report._add(
        "error" if updating else "warning",
        "trainable_batch_normalization",
        message + "Unfreeze with tlkit.unfreeze(model, blocks=...), which keeps "
        "BatchNormalization frozen, instead of setting base.trainable = True.",
        count=len(trainable),
        statistics_update=bool(updating),
        examples=trainable[:5],
    )


def _check_input_range(report: DoctorReport, model, data, sample_size: int) -> None:
    expectation, layer_description = _input_expectation(model)
    pixels = _sample_pixels(data, sample_size)
    if pixels is None:
        return
    low, high, count = pixels
    data_range = _classify_range(low, high)
    details = {
        "model_expects": expectation,
        "preprocessing": layer_description,
        "data_range": data_range,
        "data_min": low,
        "data_max": high,
        "images_sampled": count,
    }
    seen = f"the sampled pixels ({count} image(s)) lie in {low:.3g}..{high:.3g}"
    if expectation == "0..255" and data_range in ("0..1", "-1..1"):
        report._add(
            "error",
            "input_range_mismatch",
            f"The model normalises raw 0..255 pixels itself ({layer_description}), but "
            f"{seen}: the data is already scaled, so the base sees almost black "
            "images. Remove the division by 255 (or Rescaling/preprocess_input) from the "
            "input pipeline; ImageSplit.to_dataset already yields 0..255.",
            **details,
        )
    elif expectation == "0..1" and data_range == "0..255":
        report._add(
            "error",
            "input_range_mismatch",
            f"The model's input normalisation ({layer_description}) expects values "
            f"scaled to about 0..1, but {seen}. Scale the data by 1/255 or rebuild the "
            "normalisation for raw pixels.",
            **details,
        )
    elif expectation == "unknown" and data_range == "0..255":
        report._add(
            "warning",
            "no_input_preprocessing",
            f"The model has no ImagePreprocessing, Rescaling or Normalization layer "
            f"before its first weights, and {seen}: raw pixels reach a pretrained "
            "base that was trained on normalised ones. Put the backbone's "
            "preprocessing inside the model (tlkit.build_classifier does).",
            **details,
        )
    elif data_range == "other":
        report._add(
            "warning",
            "unusual_pixel_range",
            f"{seen[0].upper()}{seen[1:]}, which is neither 0..255 nor 0..1 nor -1..1. "
            "Check the decoding (16-bit images?) and feed raw 0..255 RGB.",
            **details,
        )


def _check_classes(report: DoctorReport, model, dataset: ImageDataset) -> None:
    try:
        outputs = int(model.output_shape[-1])
    except (AttributeError, TypeError, ValueError):
        return
    if outputs != dataset.num_classes:
        report._add(
            "error",
            "num_classes_mismatch",
            f"The model has {outputs} outputs but the data has {dataset.num_classes} "
            "classes. Build the model with num_classes equal to the data's. "
            f"Received: num_classes={dataset.num_classes}",
            model_outputs=outputs,
            data_classes=dataset.num_classes,
        )
        return
    names = get_class_names(model)
    if names is not None and names != dataset.class_names:
        report._add(
            "warning",
            "class_names_mismatch",
            "The class names stored in the model differ from the data's (or are in "
            "another order), so predictions would be labelled wrongly. Build the model "
            "with class_names=dataset.class_names.",
            model_class_names=names,
            data_class_names=dataset.class_names,
        )


def _nested_bases(model):
    """Yields `(base, called with training=False)` for each nested pretrained base.

    A base is the tlkit backbone when there is one, else any nested model with
    convolution or BatchNormalization layers (a Dense-only head is not a base).
    """
    import keras

    try:
        bases = [find_base(model)]
    except ValueError:
        feature_layers = (keras.layers.BatchNormalization, keras.layers.Conv2D)
        bases = [
            layer
            for layer in model.layers
            if isinstance(layer, keras.Model)
            and any(isinstance(inner, feature_layers) for inner in _layers_in_order(layer))
        ]
    for base in bases:
        nodes = inbound_nodes(base)
        inference = bool(nodes) and all(
            getattr(node, "arguments", None) is not None
            and node.arguments.kwargs.get("training") is False
            for node in nodes
        )
        yield base, inference


def _walk_trainable(layer, parent_trainable: bool):
    for inner in getattr(layer, "layers", []):
        effective = parent_trainable and inner.trainable
        if effective:
            yield inner
        if getattr(inner, "layers", None):
            yield from _walk_trainable(inner, effective)


def _base_trainable_variables(model):
    for base, _ in _nested_bases(model):
        yield from base.trainable_variables


def _learning_rate(optimizer) -> float | None:
    if optimizer is None:
        return None
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError, AttributeError):
        return None  # A schedule: no single number to compare.


def _input_expectation(model) -> tuple[str, str]:
    """What input range the model expects, from its layers before the first weights.

    Returns:
        `(expectation, description)`, expectation one of `"0..255"`, `"0..1"`,
        `"unknown"` (no normalisation found).
    """
    import keras

    for layer in _layers_in_order(model):
        if isinstance(layer, ImagePreprocessing):
            return "0..255", f"ImagePreprocessing mode {layer.mode!r} in {layer.name!r}"
        if isinstance(layer, keras.layers.Rescaling):
            scale = float(np.max(np.abs(np.asarray(layer.scale, dtype=np.float64))))
            if scale * 255.0 <= 2.5:
                return "0..255", f"Rescaling scale={scale:.4g} in {layer.name!r}"
            continue
        if isinstance(layer, keras.layers.Normalization):
            try:
                mean = float(np.max(np.abs(keras.ops.convert_to_numpy(layer.mean))))
            except (AttributeError, TypeError, ValueError):
                return "unknown", f"Normalization {layer.name!r} (not adapted)"
            expectation = "0..255" if mean > 2.0 else "0..1"
            return expectation, f"Normalization mean up to {mean:.3g} in {layer.name!r}"
        if layer.weights:
            break
    return "unknown", "none"


def _layers_in_order(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers_in_order(layer)
        else:
            yield layer


def _sample_pixels(data, sample_size: int) -> tuple[float, float, int] | None:
    rng = np.random.default_rng(0)
    if isinstance(data, ImageDataset):
        split = data.train
        if split.images is not None:
            chosen = rng.choice(len(split), min(sample_size, len(split)), replace=False)
            images = split.images[np.sort(chosen)]
            return float(images.min()), float(images.max()), len(images)
        chosen = rng.choice(
            len(split), min(sample_size, _RANGE_FILE_SAMPLES, len(split)), replace=False
        )
        low, high, count = np.inf, -np.inf, 0
        for index in np.sort(chosen):
            try:
                image = load_image(split.paths[index], 64)
            except ValueError:
                continue  # Reported by the unreadable-files check.
            low, high, count = min(low, image.min()), max(high, image.max()), count + 1
        return (float(low), float(high), count) if count else None
    if hasattr(data, "as_numpy_iterator"):
        low, high, count = np.inf, -np.inf, 0
        for element in data.as_numpy_iterator():
            images = element[0] if isinstance(element, tuple) else element
            images = np.asarray(images)
            low, high = min(low, float(images.min())), max(high, float(images.max()))
            count += images.shape[0] if images.ndim == 4 else 1
            if count >= sample_size:
                break
        return (low, high, count) if count else None
    if isinstance(data, tuple) and data:
        data = data[0]
    if isinstance(data, np.ndarray) and data.size:
        images = data[:sample_size] if data.ndim == 4 else data
        return float(images.min()), float(images.max()), len(images) if data.ndim == 4 else 1
    return None


def _is_pixel_source(data) -> bool:
    return hasattr(data, "as_numpy_iterator") or isinstance(data, (np.ndarray, tuple))


def _classify_range(low: float, high: float) -> str:
    if low >= -1e-3 and high <= 1.0 + 1e-3:
        return "0..1"
    if low >= -1.5 and high <= 1.5:
        return "-1..1"
    if low >= -0.5 and 1.5 < high <= 255.5:
        return "0..255"
    return "other"


# ---------------------------------------------------------------------------
# Dataset checks.
# ---------------------------------------------------------------------------


def _check_dataset(report: DoctorReport, dataset: ImageDataset, near_duplicates: bool) -> None:
    start = time.perf_counter()
    _check_class_balance(report, dataset)
    report.seconds["classes"] = time.perf_counter() - start

    start = time.perf_counter()
    items, digests, fingerprints, unreadable = _fingerprints(dataset, near_duplicates)
    report.seconds["hashing"] = time.perf_counter() - start

    _check_unreadable(report, dataset, unreadable)
    start = time.perf_counter()
    _check_exact_duplicates(report, dataset, items, digests)
    report.seconds["exact_duplicates"] = time.perf_counter() - start
    if near_duplicates:
        start = time.perf_counter()
        _check_near_duplicates(report, dataset, items, digests, fingerprints)
        _check_near_duplicate_label_conflicts(report, dataset, items, digests, fingerprints)
        report.seconds["near_duplicates"] = time.perf_counter() - start


def _check_class_balance(report: DoctorReport, dataset: ImageDataset) -> None:
    from sklearn.utils.class_weight import compute_class_weight

    counts = np.bincount(dataset.train.labels, minlength=dataset.num_classes)
    empty = [name for name, count in zip(dataset.class_names, counts, strict=True) if count == 0]
    if empty:
        report._add(
            "error",
            "empty_class",
            f"{len(empty)} class(es) have no training images, so the model can never "
            "learn them. Add images or remove the classes. "
            f"Received: empty_classes={empty}",
            classes=empty,
        )
        return
    ratio = float(counts.max() / counts.min())
    if ratio <= IMBALANCE_RATIO:
        return
    weights = compute_class_weight(
        "balanced", classes=np.arange(dataset.num_classes), y=dataset.train.labels
    )
    class_weight = {
        name: round(float(weight), 4)
        for name, weight in zip(dataset.class_names, weights, strict=True)
    }
    largest = dataset.class_names[int(counts.argmax())]
    smallest = dataset.class_names[int(counts.argmin())]
    report._add(
        "warning",
        "class_imbalance",
        f"The training classes are imbalanced: {largest!r} has {int(counts.max())} images, "
        f"{smallest!r} only {int(counts.min())} ({ratio:.2f}x). Accuracy will flatter the "
        "model; pass class weights to fit (details['class_weight'], by name; Keras wants "
        "them by index) and report per-class recall or balanced accuracy.",
        ratio=round(ratio, 3),
        counts={name: int(count) for name, count in zip(dataset.class_names, counts, strict=True)},
        class_weight=class_weight,
        class_weight_by_index={index: weight for index, weight in enumerate(class_weight.values())},
    )


def _fingerprints(dataset: ImageDataset, near_duplicates: bool):
    """Hashes every example: sha256 of its bytes, plus a perceptual fingerprint.

    The perceptual fingerprint is a 64-bit difference hash (is each pixel of an
    8x9 grey thumbnail brighter than its right neighbour?) and a 16x16 grey
    thumbnail. The hash is cheap to compare for every pair between two splits;
    the thumbnail confirms the few candidate pairs, because on small, uniform
    images (28 px chest X-rays) different images often share a hash. Written
    here in a few lines rather than adding the `imagehash` dependency.

    Returns:
        `(items, digests, fingerprints, unreadable)`: `items` are
        `(split, index, label, name)` for every example, `digests` their sha256
        digests, `fingerprints` `(hashes uint64 array, thumbnails float32
        array)` or None, and `unreadable` `(name, reason)` pairs.
    """
    items: list[tuple[str, int, int, str]] = []
    digests: list[bytes] = []
    hashes: list[int] = []
    thumbnails: list[np.ndarray] = []
    unreadable: list[tuple[str, str]] = []
    unusable = np.full((_THUMBNAIL_SIZE, _THUMBNAIL_SIZE), np.nan, np.float32)
    for split_name, split in dataset.splits.items():
        for index in range(len(split)):
            name = _item_name(split, index)
            items.append((split_name, index, int(split.labels[index]), name))
            if split.images is not None:
                array = np.ascontiguousarray(split.images[index])
                digests.append(hashlib.sha256(array.tobytes()).digest())
                if near_duplicates:
                    image = Image.fromarray(
                        array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
                    )
                    hash_value, thumbnail = _perceptual(image)
                    hashes.append(hash_value)
                    thumbnails.append(thumbnail)
                continue
            path = split.paths[index]
            try:
                with open(path, "rb") as handle:
                    content = handle.read()
                reason = check_image(path)
            except OSError as error:
                content = f"unreadable:{path}".encode()  # Unique, so never a duplicate.
                reason = f"{type(error).__name__}: {error}"
            if reason is not None:
                unreadable.append((name, reason))
            digests.append(hashlib.sha256(content).digest())
            if near_duplicates:
                try:
                    with Image.open(io.BytesIO(content)) as image:
                        # JPEGs decode at 1/2..1/8 scale: plenty for a 16 px thumbnail.
                        image.draft("L", (4 * _THUMBNAIL_SIZE, 4 * _THUMBNAIL_SIZE))
                        hash_value, thumbnail = _perceptual(image)
                except Exception:  # Reported as unreadable; NaN never matches.
                    hash_value, thumbnail = 0, unusable
                hashes.append(hash_value)
                thumbnails.append(thumbnail)
    fingerprints = None
    if near_duplicates and items:
        fingerprints = (np.array(hashes, dtype=np.uint64), np.stack(thumbnails))
    return items, digests, fingerprints, unreadable


def _perceptual(image: Image.Image) -> tuple[int, np.ndarray]:
    grey = image.convert("L")
    small = np.asarray(
        grey.resize((_HASH_SIZE + 1, _HASH_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0),
        dtype=np.int16,
    )
    bits = (small[:, 1:] > small[:, :-1]).reshape(-1)
    hash_value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    thumbnail = np.asarray(
        grey.resize(
            (_THUMBNAIL_SIZE, _THUMBNAIL_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0
        ),
        dtype=np.float32,
    )
    return hash_value, thumbnail - thumbnail.mean()


def _item_name(split: ImageSplit, index: int) -> str:
    if split.paths is None:
        return f"{split.name}[{index}]"
    path = split.paths[index]
    if split.root:
        path = os.path.relpath(path, split.root)
    return path.replace(os.sep, "/")


def _check_unreadable(report: DoctorReport, dataset: ImageDataset, unreadable) -> None:
    skipped = list(dataset.report.skipped)
    if not skipped and not unreadable:
        return
    report._add(
        "warning",
        "unreadable_files",
        f"{len(skipped)} file(s) were left out by the loader and {len(unreadable)} "
        "file(s) in the splits cannot be read (they are dropped while training). "
        "Replace or delete them; the reasons are in details.",
        skipped_by_loader=[f"{path}: {reason}" for path, reason in skipped],
        unreadable_in_splits=[f"{name}: {reason}" for name, reason in unreadable],
        examples=[f"{path}: {reason}" for path, reason in (skipped + unreadable)[:_MAX_LISTED]],
    )


def _check_exact_duplicates(report: DoctorReport, dataset: ImageDataset, items, digests) -> None:
    groups: dict[bytes, list[int]] = defaultdict(list)
    for position, digest in enumerate(digests):
        groups[digest].append(position)
    duplicates = [members for members in groups.values() if len(members) > 1]
    if not duplicates:
        return
    split_order = list(dataset.splits)
    within: dict[str, int] = {}
    within_groups: list[list[str]] = []
    across: dict[str, int] = {}
    across_groups: list[list[str]] = []
    conflicts: list[list[str]] = []

    def describe(members):
        return [
            f"{items[m][0]}: {items[m][3]} ({dataset.class_names[items[m][2]]})" for m in members
        ]

    for members in duplicates:
        splits_here = [items[m][0] for m in members]
        # Within a split: images that repeat an earlier image of the same split.
        repeated = False
        for split_name in split_order:
            extra = splits_here.count(split_name) - 1
            if extra > 0:
                within[split_name] = within.get(split_name, 0) + extra
                repeated = True
        if repeated:
            within_groups.append(describe(members))
        # Between splits: distinct images present in both.
        present = [name for name in split_order if name in splits_here]
        for first in range(len(present)):
            for second in range(first + 1, len(present)):
                key = f"{present[first]}/{present[second]}"
                across[key] = across.get(key, 0) + 1
        if len(present) > 1:
            across_groups.append(describe(members))
        if len({items[m][2] for m in members}) > 1:
            conflicts.append(describe(members))

    if conflicts:
        report._add(
            "error",
            "duplicate_label_conflict",
            f"{len(conflicts)} image(s) appear byte for byte under two or more labels, so "
            "the model is taught both answers (and scored against one). Keep the copy "
            "with the right label and delete the other.",
            count=len(conflicts),
            groups=conflicts,
            examples=[" = ".join(group) for group in conflicts[:_MAX_LISTED]],
        )
    if across:
        summary = ", ".join(f"{key} {count}" for key, count in across.items())
        report._add(
            "warning",
            "duplicates_across_splits",
            f"Byte-identical images are shared between splits ({summary}): validation and "
            "test scores are inflated by images the model trained on. Remove the copies "
            "from the evaluation splits.",
            counts=across,
            count=len(across_groups),
            groups=across_groups,
            examples=[" = ".join(group) for group in across_groups[:_MAX_LISTED]],
        )
    if within:
        summary = ", ".join(f"{key} {count}" for key, count in within.items())
        report._add(
            "info",
            "duplicates_within_split",
            f"Images that repeat an earlier one byte for byte in the same split: {summary}. "
            "They count twice in training and scoring; delete the extra copies.",
            counts=within,
            count=len(within_groups),
            groups=within_groups,
            examples=[" = ".join(group) for group in within_groups[:_MAX_LISTED]],
        )


def _check_near_duplicates(
    report: DoctorReport, dataset: ImageDataset, items, digests, fingerprints
) -> None:
    if fingerprints is None:
        return
    hashes, thumbnails = fingerprints
    split_of = np.array([item[0] for item in items])
    split_order = list(dataset.splits)
    pairs: list[tuple[int, int, int]] = []
    counts: dict[str, int] = {}
    for first_index, first in enumerate(split_order):
        left = np.flatnonzero(split_of == first)
        for second in split_order[first_index + 1 :]:
            right = np.flatnonzero(split_of == second)
            found = 0
            for start in range(0, len(left), _PAIR_CHUNK):
                rows = left[start : start + _PAIR_CHUNK]
                distance = np.bitwise_count(hashes[rows][:, None] ^ hashes[right][None, :])
                row_hits, column_hits = np.nonzero(distance <= NEAR_DUPLICATE_DISTANCE)
                for row, column in zip(rows[row_hits], right[column_hits], strict=True):
                    if digests[row] == digests[column]:
                        continue  # Byte-identical: reported as an exact duplicate.
                    difference = float(np.abs(thumbnails[row] - thumbnails[column]).mean())
                    if difference <= NEAR_DUPLICATE_DIFFERENCE:
                        bits = int(np.bitwise_count(hashes[row] ^ hashes[column]))
                        pairs.append((int(row), int(column), bits))
                        found += 1
            if found:
                counts[f"{first}/{second}"] = found
    if not pairs:
        return
    described = [
        f"{items[a][0]}: {items[a][3]} ({dataset.class_names[items[a][2]]}) ~ "
        f"{items[b][0]}: {items[b][3]} ({dataset.class_names[items[b][2]]})"
        for a, b, _ in pairs
    ]
    different_labels = sum(items[a][2] != items[b][2] for a, b, _ in pairs)
    summary = ", ".join(f"{key} {count}" for key, count in counts.items())
    report._add(
        "warning",
        "near_duplicates_across_splits",
        f"Near-identical images (re-encoded, resized or lightly edited copies) are "
        f"shared between splits ({summary} pair(s), {different_labels} with different "
        "labels): they inflate validation and test scores. Look at them and remove "
        "the copies from the evaluation splits.",
        counts=counts,
        different_labels=different_labels,
        pairs=described,
        examples=described[:_MAX_LISTED],
    )


def _check_near_duplicate_label_conflicts(
    report: DoctorReport, dataset: ImageDataset, items, digests, fingerprints
) -> None:
    """Near-identical images under two labels, in any splits (the same split included).

    `_check_near_duplicates` compares splits with each other only; a resized
    copy of a daisy filed under roses in the same split is as harmful, so every
    pair with different labels is compared here.
    """
    if fingerprints is None:
        return
    hashes, thumbnails = fingerprints
    labels = np.array([item[2] for item in items])
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(items), _PAIR_CHUNK):
        rows = np.arange(start, min(start + _PAIR_CHUNK, len(items)))
        columns = np.arange(start, len(items))  # Each pair once: column > row.
        distance = np.bitwise_count(hashes[rows][:, None] ^ hashes[columns][None, :])
        close = (
            (distance <= NEAR_DUPLICATE_DISTANCE)
            & (labels[rows][:, None] != labels[columns][None, :])
            & (columns[None, :] > rows[:, None])
        )
        for row, column in zip(*np.nonzero(close), strict=True):
            first, second = int(rows[row]), int(columns[column])
            if digests[first] == digests[second]:
                continue  # Byte-identical: reported as duplicate_label_conflict.
            difference = float(np.abs(thumbnails[first] - thumbnails[second]).mean())
            if difference <= NEAR_DUPLICATE_DIFFERENCE:
                pairs.append((first, second))
    if not pairs:
        return
    described = [
        f"{items[a][0]}: {items[a][3]} ({dataset.class_names[items[a][2]]}) ~ "
        f"{items[b][0]}: {items[b][3]} ({dataset.class_names[items[b][2]]})"
        for a, b in pairs
    ]
    report._add(
        "error",
        "near_duplicate_label_conflict",
        f"{len(pairs)} pair(s) of near-identical images (re-encoded, resized or lightly "
        "edited copies) carry different labels, so the model is taught both answers. "
        "Look at them, keep the copy with the right label and delete the other.",
        count=len(pairs),
        pairs=described,
        examples=described[:_MAX_LISTED],
    )


# ---------------------------------------------------------------------------
# Detection checks.
# ---------------------------------------------------------------------------


def _check_detection(report: DoctorReport, dataset: DetectionDataset) -> None:
    zero_area = [(path, reason) for path, reason in dataset.dropped_boxes if "zero-area" in reason]
    other = [(path, reason) for path, reason in dataset.dropped_boxes if "zero-area" not in reason]
    if zero_area:
        report._add(
            "warning",
            "zero_area_boxes",
            f"{len(zero_area)} box(es) have zero area (xmax <= xmin or ymax <= ymin); the "
            "loader dropped them. Fix the annotations if the objects matter, or keep "
            "them dropped (a zero-area box gives NaN losses in most detectors).",
            count=len(zero_area),
            files=sorted({Path(path).stem for path, _ in zero_area}),
            examples=[f"{Path(path).name}: {reason}" for path, reason in zero_area[:_MAX_LISTED]],
        )
    if other:
        report._add(
            "warning",
            "dropped_boxes",
            f"{len(other)} box(es) were dropped for an unknown class or a malformed "
            "bndbox. Fix the annotations or add the class names.",
            count=len(other),
            examples=[f"{Path(path).name}: {reason}" for path, reason in other[:_MAX_LISTED]],
        )
    if dataset.report.skipped:
        report._add(
            "warning",
            "unreadable_files",
            f"{len(dataset.report.skipped)} image(s) or annotation(s) were left out by "
            "the loader. Replace or delete them; the reasons are in details.",
            skipped_by_loader=[f"{path}: {reason}" for path, reason in dataset.report.skipped],
            examples=[f"{path}: {reason}" for path, reason in dataset.report.skipped[:_MAX_LISTED]],
        )
    splits = {"train": dataset.train, "validation": dataset.validation, "test": dataset.test}
    groups: dict[bytes, list[str]] = defaultdict(list)
    empty = 0
    for split_name, examples in splits.items():
        for example in examples:
            with open(example.image_path, "rb") as handle:
                groups[hashlib.sha256(handle.read()).digest()].append(
                    f"{split_name}: {Path(example.image_path).name}"
                )
            empty += len(example.boxes) == 0
    duplicates = [members for members in groups.values() if len(members) > 1]
    if duplicates:
        report._add(
            "warning",
            "duplicate_images",
            f"{len(duplicates)} image(s) appear more than once, byte for byte. Remove "
            "the copies (from the evaluation splits first).",
            count=len(duplicates),
            groups=duplicates,
            examples=[" = ".join(group) for group in duplicates[:_MAX_LISTED]],
        )
    if empty:
        report._add(
            "info",
            "images_without_boxes",
            f"{empty} image(s) have no boxes left; they train as pure background.",
            count=empty,
        )


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _load_folder(path: str | os.PathLike) -> ImageDataset:
    if not Path(path).is_dir():
        raise ValueError(
            "`data` as a path must be a folder with one sub-folder of images per class. "
            f"Received: data={os.fspath(path)!r}"
        )
    return from_directory(path)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
