"""Exporting a trained classifier for deployment: SavedModel, TFLite (float and int8), ONNX.

`export_model` strips the augmentation layers (`inference_model`), fixes the input
size so converters see static shapes, writes every format with the label map, and
checks each file against the Keras model on real images: top-1 agreement, the
largest probability difference, and for int8 the accuracy drop.

Every exported model takes float32 RGB images with values in 0..255 of shape
`(batch, image_size, image_size, 3)` (preprocessing is inside the model) and returns
class probabilities. Class names are in `labels.txt` (one per line, in label order),
in the SavedModel's `class_names` endpoint, and in a zip appended to each `.tflite`
file (the TFLite "associated files" layout; `zipfile.ZipFile("model.tflite")` reads
it, interpreters ignore it).

Example:

```python
model = tlkit.load_classifier("runs/flowers/model.keras")
flowers = tlkit.data.load("tf_flowers")
images, labels = next(iter(flowers.validation.to_dataset(224, batch_size=64)))
report = export_model(model, "exported", representative_data=images, check_data=(images, labels))
print(report)
```
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlkit._io import atomic_path, write_json, write_text
from tlkit.data.source import resolve_data
from tlkit.models import get_class_names
from tlkit.predict import load_classifier

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

FORMATS = ("saved_model", "tflite", "tflite_int8", "onnx")

# File or folder name of each format inside the export folder.
FORMAT_FILES = {
    "saved_model": "saved_model",
    "tflite": "model.tflite",
    "tflite_int8": "model_int8.tflite",
    "onnx": "model.onnx",
}

REPORT_FILE = "export_report.json"
LABELS_FILE = "labels.txt"

# Preprocessing layers that are random in training and must not reach an
# exported model. RandomCrop is left out on purpose: at inference it crops or
# resizes deterministically, so removing it would change the model.
_RANDOM_LAYER_NAMES = tuple(
    name
    for name in dir(keras.layers)
    if (name.startswith("Random") or name in ("RandAugment", "AugMix", "CutMix", "MixUp"))
    and name != "RandomCrop"
)
_RANDOM_LAYERS = tuple(getattr(keras.layers, name) for name in _RANDOM_LAYER_NAMES)

# Default number of representative images for int8 calibration.
REPRESENTATIVE_COUNT = 100

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


@dataclass
class FormatResult:
    """What happened to one export format.

    Attributes:
        format: The format name, one of `FORMATS`.
        status: `"ok"`, `"skipped"` (a tool is missing; see `reason`) or
            `"failed"` (the converter or the check raised; see `reason`).
        path: File or folder name inside the export folder, or None.
        size_bytes: Size on disk, or None.
        seconds: Conversion time.
        reason: Why the format was skipped or failed, or None.
        top1_agreement: Share of check images where the export's top class
            equals the Keras model's, or None when there was no check data.
        max_abs_diff: Largest absolute difference of any class probability.
        accuracy: The export's accuracy on the check labels.
        keras_accuracy: The Keras model's accuracy on the same images.
        accuracy_drop: `keras_accuracy - accuracy`.
        notes: Details such as the quantization scheme.
    """

    format: str
    status: str = "ok"
    path: str | None = None
    size_bytes: int | None = None
    seconds: float | None = None
    reason: str | None = None
    top1_agreement: float | None = None
    max_abs_diff: float | None = None
    accuracy: float | None = None
    keras_accuracy: float | None = None
    accuracy_drop: float | None = None
    notes: str | None = None


@dataclass
class ExportReport:
    """The result of `export_model`, also written to `export_report.json`.

    Attributes:
        out_dir: The export folder.
        model_name: The Keras model's name.
        image_size: Input height and width of every exported model.
        class_names: Class names in label order.
        input: A description of the input every export takes.
        check_examples: How many images the checks used (0: not checked).
        representative_examples: How many images calibrated int8.
        results: One `FormatResult` per requested format, in order.
        versions: Library versions used for the export.
    """

    out_dir: str
    model_name: str
    image_size: int
    class_names: list[str]
    input: str
    check_examples: int = 0
    representative_examples: int = 0
    results: list[FormatResult] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def result(self, name: str) -> FormatResult:
        """The `FormatResult` of one format.

        Raises:
            KeyError: If that format was not requested.
        """
        for item in self.results:
            if item.format == name:
                return item
        raise KeyError(
            f"No result for format {name!r}; the export had "
            f"{[item.format for item in self.results]}. Received: name={name!r}"
        )

    @property
    def ok(self) -> bool:
        """True when no format failed (skipped ones do not count as failures)."""
        return all(item.status != "failed" for item in self.results)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        return asdict(self)

    def __str__(self) -> str:
        return format_report(self)


def format_report(report: ExportReport) -> str:
    """A short table of the formats, their size and how well they agree with Keras.

    Args:
        report: An `ExportReport`.

    Returns:
        The table as text, one line per format.
    """

    def number(value, pattern):
        return pattern.format(value) if value is not None else "-"

    lines = [
        f"Exported {report.model_name} to {report.out_dir}/ "
        f"(input {report.input}; {len(report.class_names)} classes in {LABELS_FILE})",
        f"Checked on {report.check_examples} images"
        + (
            f"; int8 calibrated on {report.representative_examples}"
            if report.representative_examples
            else ""
        ),
        f"{'format':<12} {'status':<8} {'size':>9} {'top-1 agree':>11} {'max |dp|':>9} "
        f"{'accuracy':>8} {'drop':>7}",
    ]
    for item in report.results:
        size = f"{item.size_bytes / 1e6:.1f} MB" if item.size_bytes is not None else "-"
        lines.append(
            f"{item.format:<12} {item.status:<8} {size:>9} "
            f"{number(item.top1_agreement, '{:.3f}'):>11} {number(item.max_abs_diff, '{:.1e}'):>9} "
            f"{number(item.accuracy, '{:.3f}'):>8} {number(item.accuracy_drop, '{:+.3f}'):>7}"
        )
        if item.reason:
            lines.append(f"  {item.format}: {item.reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Inference model
# ---------------------------------------------------------------------------


def inference_model(model: keras.Model, verify: bool = True) -> keras.Model:
    """The classifier without its augmentation, with a fixed input size.

    The functional graph is rebuilt on the same (shared, not copied) layers,
    skipping the layer named `"augmentation"` and any Keras random
    preprocessing layer (`RandomFlip`, `RandomRotation`, ...). The input is
    fixed to `(image_size, image_size, 3)`, the size of the `"resize"` layer,
    so converters get static shapes. Every layer is called with
    `training=False`, so the model behaves the same however it is called.
    The outputs are the class probabilities.

    Args:
        model: A classifier from `tlkit.build_classifier` (or
            `tlkit.load_classifier`).
        verify: Whether to check that the new model predicts what the original
            does on a few random images. Defaults to True.

    Returns:
        A functional `keras.Model` named like the original plus `"_inference"`,
        sharing the original's weights.

    Raises:
        ValueError: If the model is not a functional tlkit classifier (no
            `"resize"` layer), or random layers remain inside a nested model.
        RuntimeError: If `verify` finds the two models disagree.

    Example:
        >>> model = tlkit.build_classifier("mobilenet_v2", 3, augmentation="natural")
        >>> inference_model(model).input_shape
        (None, 224, 224, 3)
    """
    image_size = _image_size(model)
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="image")

    def call_function(layer, *args, **kwargs):
        if _is_augmentation(layer):
            return args[0]
        return layer(*args, **{**kwargs, "training": False})  # Dropout off, always.

    rebuilt = keras.models.clone_model(
        model,
        input_tensors=inputs,
        clone_function=lambda layer: layer,  # Share the trained layers.
        call_function=call_function,
    )
    result = keras.Model(rebuilt.input, rebuilt.output, name=f"{model.name}_inference")
    remaining = [layer.name for layer in _all_layers(result) if isinstance(layer, _RANDOM_LAYERS)]
    if remaining:
        raise ValueError(
            "Random augmentation layers remain inside a nested model, so the export would not "
            "be deterministic. Keep augmentation in a top-level layer named 'augmentation' "
            f"(as `tlkit.build_classifier` does). Received: layers={remaining}"
        )
    if verify:
        probe = np.random.default_rng(0).uniform(0, 255, (2, image_size, image_size, 3))
        probe = probe.astype("float32")
        expected = np.asarray(model.predict(probe, verbose=0))
        actual = np.asarray(result.predict(probe, verbose=0))
        difference = float(np.max(np.abs(expected - actual)))
        if difference > 1e-5:
            raise RuntimeError(
                "The inference model does not reproduce the original model's predictions "
                f"(largest difference {difference:.2e}). Please report this with the model's "
                f"summary. Received: model={model.name!r}"
            )
    return result


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export_model(
    model: keras.Model,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    representative_data=None,
    check_data=None,
    overwrite: bool = False,
) -> ExportReport:
    """Exports a classifier to deployable formats and checks each against Keras.

    Writes into `out_dir`:

    - `saved_model/`: a TensorFlow SavedModel. `serve(images)` (also the
      `serving_default` signature) returns probabilities; `class_names()`
      returns the class names as a string tensor.
    - `model.tflite`: float32 TFLite.
    - `model_int8.tflite`: post-training full-integer quantization (int8
      weights and activations, every op an int8 builtin), calibrated on
      `representative_data`; input and output stay float32 (the model
      quantizes and dequantizes at its edges), so it is called exactly like
      `model.tflite`.
    - `model.onnx`: ONNX via tf2onnx (skipped, with the reason recorded, when
      tf2onnx is not installed).
    - `labels.txt`: the class names, one per line in label order. The
      `.tflite` files also carry it as an appended zip (associated file).
    - `export_report.json`: the `ExportReport`.

    Every model takes float32 RGB 0..255 images of shape
    `(batch, image_size, image_size, 3)`. Check and representative images of
    another size are resized by the model's own `"resize"` layer first.

    The files are written to a temporary folder beside `out_dir` that is
    renamed onto it at the end, so a crash never leaves a half export.

    Args:
        model: A classifier from `tlkit.build_classifier` or
            `tlkit.load_classifier`.
        out_dir: The folder to create.
        formats: Which of `FORMATS` to write. Defaults to all of them.
        representative_data: Real images for int8 calibration, about 100:
            a float array `(N, H, W, 3)` in 0..255, an `(images, labels)`
            pair, or a `tf.data.Dataset` of `(images, labels)` batches. Defaults
            to None (use the `check_data` images; needed for `"tflite_int8"`).
        check_data: `(images, labels)` of real images to compare every export
            with the Keras model (labels may be None). Defaults to None (no
            checks; the report then has no agreement numbers).
        overwrite: Whether to replace an existing export folder. Defaults to
            False.

    Returns:
        An `ExportReport` (also in `out_dir/export_report.json`).

    Raises:
        ValueError: On an unknown format, missing calibration data for int8,
            or bad image arrays.
        FileExistsError: If `out_dir` exists and `overwrite` is False, or it is
            not an earlier export.

    Example:
        >>> report = export_model(model, "exported", check_data=(images, labels))
        >>> report.result("tflite_int8").accuracy_drop
        0.0
    """
    import tensorflow as tf

    formats = _check_formats(formats)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    class_names = get_class_names(model) or [str(i) for i in range(int(model.output_shape[-1]))]
    image_size = _image_size(model)

    check_images, check_labels = _check_pair(check_data)
    representative = _images_only(representative_data)
    if representative is None and "tflite_int8" in formats:
        if check_images is None:
            raise ValueError(
                "The 'tflite_int8' format needs about 100 real images to calibrate the "
                "quantization: pass `representative_data` (or `check_data`), or leave "
                "'tflite_int8' out of `formats`. Received: representative_data=None"
            )
        representative = check_images
    if representative is not None:
        representative = _fit_to_size(model, representative, image_size)
    if check_images is not None:
        check_images = _fit_to_size(model, check_images, image_size)
        if check_labels is not None and len(check_labels) != len(check_images):
            raise ValueError(
                f"check_data has {len(check_images)} images but {len(check_labels)} labels. "
                f"Received: len(labels)={len(check_labels)}"
            )

    inference = inference_model(model)
    reference = None
    if check_images is not None:
        reference = np.asarray(inference.predict(check_images, batch_size=32, verbose=0))

    report = ExportReport(
        out_dir=str(out_dir),
        model_name=model.name,
        image_size=image_size,
        class_names=list(class_names),
        input=f"float32 (batch, {image_size}, {image_size}, 3) RGB in 0..255",
        check_examples=0 if check_images is None else len(check_images),
        representative_examples=(
            len(representative) if representative is not None and "tflite_int8" in formats else 0
        ),
        versions=_versions(),
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        write_text(staging / LABELS_FILE, "".join(f"{name}\n" for name in class_names))
        needs_saved_model = any(
            name in formats for name in ("saved_model", "tflite", "tflite_int8")
        )
        saved_model_dir = staging / FORMAT_FILES["saved_model"]
        if needs_saved_model:
            started = time.perf_counter()
            _write_saved_model(inference, saved_model_dir, class_names, image_size)
            seconds = time.perf_counter() - started
            if "saved_model" in formats:
                loaded = tf.saved_model.load(str(saved_model_dir))
                result = FormatResult(
                    "saved_model",
                    path=FORMAT_FILES["saved_model"],
                    size_bytes=_size(saved_model_dir),
                    seconds=round(seconds, 2),
                    notes="serve(images) and the serving_default signature return "
                    "probabilities; class_names() returns the label map.",
                )
                _record_check(
                    result,
                    lambda images: loaded.serve(tf.constant(images)).numpy(),
                    check_images,
                    check_labels,
                    reference,
                )
                report.results.append(result)
        for name in formats:
            if name == "saved_model":
                continue
            started = time.perf_counter()
            result = FormatResult(name, path=FORMAT_FILES[name])
            try:
                if name in ("tflite", "tflite_int8"):
                    content = _convert_tflite(
                        saved_model_dir, representative if name == "tflite_int8" else None
                    )
                    content = append_labels(content, class_names)
                    with atomic_path(staging / FORMAT_FILES[name]) as temporary:
                        temporary.write_bytes(content)
                    result.notes = (
                        "full-integer int8 (weights and activations), float32 input and "
                        f"output, calibrated on {len(representative)} images"
                        if name == "tflite_int8"
                        else "float32"
                    ) + f"; {LABELS_FILE} appended as a zip"
                    predict = _tflite_predictor(staging / FORMAT_FILES[name])
                else:  # onnx
                    missing = _missing_onnx_tools()
                    if missing:
                        result.status, result.path = "skipped", None
                        result.reason = (
                            f"{' and '.join(missing)} not installed; "
                            "`pip install tf2onnx==1.17.0 onnx onnxruntime` to export ONNX"
                        )
                        report.results.append(result)
                        continue
                    _write_onnx(inference, staging / FORMAT_FILES["onnx"], image_size)
                    result.notes = "opset chosen by tf2onnx; input 'image', dynamic batch"
                    predict = _onnx_predictor(staging / FORMAT_FILES["onnx"])
                result.seconds = round(time.perf_counter() - started, 2)
                result.size_bytes = _size(staging / FORMAT_FILES[name])
                if predict is None:
                    result.notes += "; not checked (onnxruntime not installed)"
                else:
                    _record_check(result, predict, check_images, check_labels, reference)
            except Exception as error:  # Recorded; the other formats go on.
                result.status, result.path = "failed", None
                result.reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                (staging / FORMAT_FILES[name]).unlink(missing_ok=True)
            report.results.append(result)
        if "saved_model" not in formats and saved_model_dir.exists():
            shutil.rmtree(saved_model_dir)  # Only the converters' input.
        # Formats in the order asked for.
        report.results.sort(key=lambda item: formats.index(item.format))
        write_json(staging / REPORT_FILE, report.to_dict())
        _replace_folder(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return report


def append_labels(content: bytes, class_names: Sequence[str]) -> bytes:
    """Appends `labels.txt` to a TFLite flatbuffer as a zip (an associated file).

    This is the layout the TFLite metadata tools use for associated files:
    interpreters read the flatbuffer and ignore the trailing zip, and
    `zipfile.ZipFile(path).read("labels.txt")` reads the labels back. No
    `TFLITE_METADATA` table is written, so the TFLite Task / MediaPipe APIs
    do not pick the labels up by themselves; ship `labels.txt` for those.

    Args:
        content: The `.tflite` bytes.
        class_names: Class names in label order.

    Returns:
        The bytes with the zip appended.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(LABELS_FILE, "".join(f"{name}\n" for name in class_names))
    return bytes(content) + buffer.getvalue()


def read_labels(path: str | os.PathLike) -> list[str]:
    """The class names of an export: `labels.txt`, or the zip in a `.tflite` file.

    Args:
        path: An export folder, a `labels.txt` or a `.tflite` from `export_model`.

    Returns:
        The class names in label order.

    Raises:
        FileNotFoundError: If there is no label map at `path`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    if path.suffix == ".tflite" and path.is_file():
        with zipfile.ZipFile(path) as archive:
            text = archive.read(LABELS_FILE).decode("utf-8")
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(
            f"No label map at {path}. Pass an export folder or its {LABELS_FILE}. "
            f"Received: path={path}"
        )
    return [line for line in text.splitlines() if line]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def export_command(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    data: str | None = None,
    formats: Sequence[str] = FORMATS,
    overwrite: bool = False,
    check_count: int = 64,
    representative_count: int = REPRESENTATIVE_COUNT,
    seed: int = 42,
    log=print,
) -> int:
    """`python -m tlkit export MODEL --out DIR [--data DATA] [--formats ...]`.

    Loads the model in safe mode, takes check images from DATA's validation
    split (else test, else train) and int8 calibration images from its
    training split, exports, and prints the table.

    Args:
        model_path: A `model.keras` written by `tlkit train`.
        out_dir: The export folder.
        data: A class-per-folder directory or a dataset name (see
            `tlkit.data.source.resolve_data`). Defaults to None: no checks, and int8
            is left out because it needs real images to calibrate.
        formats: Which of `FORMATS` to write. Defaults to all of them.
        overwrite: Whether to replace an existing export folder. Defaults to
            False.
        check_count: Images to check the exports on. Defaults to 64.
        representative_count: Images to calibrate int8 with. Defaults to 100.
        seed: Seed for picking the images. Defaults to 42.
        log: Where to print. Defaults to `print`.

    Returns:
        0 when no format failed, else 1.

    Raises:
        ValueError: If DATA's class names differ from the model's.
        FileExistsError: If `out_dir` exists and `overwrite` is False.
    """
    formats = _check_formats(formats)
    _check_out_dir(Path(out_dir), overwrite)  # Fail before the slow part.
    model = load_classifier(model_path)
    image_size = _image_size(model)
    representative = check = None
    if data is None:
        if "tflite_int8" in formats:
            formats = tuple(name for name in formats if name != "tflite_int8")
            if not formats:
                raise ValueError(
                    "The tflite_int8 format needs real images to calibrate: pass --data "
                    "with the data the model was trained on. Received: data=None"
                )
            log("No --data: leaving out tflite_int8 (it needs real images to calibrate).")
        log("No --data: the exports are written but not checked against Keras.")
    else:
        dataset = resolve_data(data, seed=seed, log=log)
        names = get_class_names(model)
        if names is not None and list(dataset.class_names) != list(names):
            raise ValueError(
                f"DATA's classes differ from the model's {names}; pass the data the model "
                f"was trained on. Received: class_names={list(dataset.class_names)}"
            )
        check_split = dataset.validation or dataset.test or dataset.train
        calibration_split = dataset.train
        check = _take(check_split, check_count, image_size, seed)
        if "tflite_int8" in formats:
            representative = _take(calibration_split, representative_count, image_size, seed + 1)[0]
        log(
            f"Checking on {len(check[0])} {check_split.name} images"
            + (
                f", calibrating int8 on {len(representative)} {calibration_split.name} images."
                if representative is not None
                else "."
            )
        )
    report = export_model(
        model,
        out_dir,
        formats=formats,
        representative_data=representative,
        check_data=check,
        overwrite=overwrite,
    )
    log(format_report(report))
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


def _is_augmentation(layer) -> bool:
    return layer.name == "augmentation" or isinstance(layer, _RANDOM_LAYERS)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _image_size(model: keras.Model) -> int:
    try:
        config = model.get_layer("resize").get_config()
    except ValueError:
        raise ValueError(
            "Expected a tlkit classifier with a 'resize' layer that sets the input size; "
            "build it with `tlkit.build_classifier` or load it with `tlkit.load_classifier`. "
            f"Received: model={model.name!r}"
        ) from None
    if config["height"] != config["width"]:
        raise ValueError(
            "Expected a square input size. "
            f"Received: height={config['height']}, width={config['width']}"
        )
    return int(config["height"])


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [formats]
    formats = tuple(dict.fromkeys(formats))
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"Unknown export format. Expected some of {FORMATS}. Received: formats={list(formats)}"
        )
    return formats


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"{out_dir} is a file; pick a folder name for the export. Received: out_dir={out_dir}"
        )
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"The export folder {out_dir} already exists. Pass overwrite=True (--overwrite) "
            f"to replace it, or choose another folder. Received: out_dir={out_dir}"
        )
    if not (out_dir / REPORT_FILE).is_file():
        raise FileExistsError(
            f"{out_dir} is not an earlier export (no {REPORT_FILE}), so it is not replaced "
            f"even with overwrite=True. Choose another folder. Received: out_dir={out_dir}"
        )


def _replace_folder(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _as_numpy(value) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _images_only(data) -> np.ndarray | None:
    if data is None:
        return None
    if isinstance(data, tuple) and len(data) == 2:
        data = data[0]
    if hasattr(data, "element_spec"):  # a tf.data.Dataset
        batches = []
        for batch in data:
            batches.append(_as_numpy(batch[0] if isinstance(batch, (tuple, list)) else batch))
        data = np.concatenate(batches) if batches else np.zeros((0, 1, 1, 3))
    return _check_images(data, "representative_data")


def _check_pair(data) -> tuple[np.ndarray | None, np.ndarray | None]:
    if data is None:
        return None, None
    if hasattr(data, "element_spec"):
        images, labels = [], []
        for batch_images, batch_labels in data:
            images.append(_as_numpy(batch_images))
            labels.append(_as_numpy(batch_labels))
        data = (np.concatenate(images), np.concatenate(labels))
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(
            "check_data must be an (images, labels) pair (labels may be None) or a "
            f"tf.data.Dataset of such batches. Received: check_data={type(data).__name__}"
        )
    images = _check_images(data[0], "check_data")
    labels = None if data[1] is None else _as_numpy(data[1]).reshape(-1).astype("int64")
    return images, labels


def _check_images(images, name: str) -> np.ndarray:
    images = _as_numpy(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(
            f"{name} images must be a non-empty RGB batch (N, H, W, 3) with values in 0..255. "
            f"Received: shape={images.shape}"
        )
    return images.astype("float32")


def _fit_to_size(model: keras.Model, images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:3] == (image_size, image_size):
        return images
    # The model's own resize layer, so the export sees what the model saw.
    resize = model.get_layer("resize")
    return np.concatenate(
        [_as_numpy(resize(images[start : start + 32])) for start in range(0, len(images), 32)]
    ).astype("float32")


def _take(split, count: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.random.default_rng(seed).permutation(len(split))[:count]
    subset = split.subset(np.sort(indices))
    images, labels = [], []
    for batch_images, batch_labels in subset.to_dataset(image_size=image_size, batch_size=32):
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _write_saved_model(model: keras.Model, path: Path, class_names, image_size: int) -> None:
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda images: model(images, training=False),
        input_signature=[
            tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="image")
        ],
    )
    names = [str(name) for name in class_names]
    archive.add_endpoint(
        "class_names", tf.function(lambda: tf.constant(names, dtype=tf.string)), input_signature=[]
    )
    with _quiet():
        archive.write_out(str(path), verbose=False)


def _convert_tflite(saved_model_dir: Path, representative: np.ndarray | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=["serving_default"]
    )
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def batches() -> Iterable[list[np.ndarray]]:
            for image in representative:
                yield [image[None]]

        converter.representative_dataset = batches
    with _quiet():
        return converter.convert()


def _tflite_predictor(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # tf.lite's copy is deprecated but still there in TF 2.21.
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(path))

    def predict(images: np.ndarray) -> np.ndarray:
        input_detail = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(input_detail["index"], list(images.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(input_detail["index"], images.astype(np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()

    return predict


def _missing_onnx_tools() -> list[str]:
    import importlib.util

    return [name for name in ("tf2onnx", "onnx") if importlib.util.find_spec(name) is None]


def _write_onnx(model: keras.Model, path: Path, image_size: int) -> None:
    spec = keras.InputSpec(shape=(None, image_size, image_size, 3), dtype="float32", name="image")
    with _quiet(), atomic_path(path) as temporary:
        model.export(str(temporary), format="onnx", verbose=False, input_signature=[spec])


def _onnx_predictor(path: Path):
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: images.astype(np.float32)})[0]

    return predict


def _record_check(result: FormatResult, predict, images, labels, reference) -> None:
    if images is None:
        result.notes = (result.notes or "") + "; not checked (no check_data)"
        return
    probabilities = np.concatenate(
        [np.asarray(predict(images[start : start + 32])) for start in range(0, len(images), 32)]
    )
    result.top1_agreement = float(np.mean(probabilities.argmax(-1) == reference.argmax(-1)))
    result.max_abs_diff = float(np.max(np.abs(probabilities - reference)))
    if labels is not None:
        result.accuracy = float(np.mean(probabilities.argmax(-1) == labels))
        result.keras_accuracy = float(np.mean(reference.argmax(-1) == labels))
        result.accuracy_drop = result.keras_accuracy - result.accuracy


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@contextlib.contextmanager
def _quiet():
    """Silences the converters' Python warnings and INFO logging."""
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "absl", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
