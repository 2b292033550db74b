"""Exporting classifiers: augmentation stripped, every format checked against Keras."""

from __future__ import annotations

import importlib.util
import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tlkit
from tlkit import export
from tlkit.data import ImageSplit
from tlkit.models import find_base

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 64
CLASS_NAMES = ["blue", "green", "red"]  # sorted, as a class-per-folder loader reads them
CHANNELS = [2, 1, 0]  # the dominant channel of each class
# ONNX is an optional extra: without tf2onnx the export records it as skipped.
HAS_ONNX_TOOLS = all(importlib.util.find_spec(name) for name in ("tf2onnx", "onnx", "onnxruntime"))


def _colour_images(count: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose dominant channel is the label, with noise and a random shade."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASS_NAMES)
    images = rng.uniform(0, 90, (count, size, size, 3))
    shade = rng.uniform(150, 255, count)
    images[np.arange(count), :, :, np.array(CHANNELS)[labels]] = shade[:, None, None] - rng.uniform(
        0, 40, (count, size, size)
    )
    return images.clip(0, 255).astype("uint8"), labels.astype("int32")


def _build(weights=None, augmentation="natural"):
    keras.utils.set_random_seed(0)
    return tlkit.build_classifier(
        "mobilenet_v2",
        3,
        image_size=SIZE,
        augmentation=augmentation,
        weights=weights,
        class_names=CLASS_NAMES,
    )


@pytest.fixture(scope="module")
def untrained():
    """A classifier with a random base and augmentation (fast to build; not changed)."""
    return _build()


@pytest.fixture(scope="module")
def trained(tlkit_cache_dir):
    """A pretrained mobilenet_v2 whose head learned the colour classes in a few steps."""
    model = _build("imagenet")
    images, labels = _colour_images(96, seed=1)
    # Train the head on features of the frozen base, as tlkit.train_head does: seconds.
    features = find_base(model).predict(images.astype("float32"), verbose=0)
    head = model.get_layer("head")
    head.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    head.fit(features, labels, epochs=20, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def check_split():
    images, labels = _colour_images(64, seed=2)
    return ImageSplit("validation", CLASS_NAMES, labels, images=images)


@pytest.fixture(scope="module")
def exported(trained, check_split, tmp_path_factory):
    """One export in every format, shared by the slow tests."""
    dataset = check_split.to_dataset(image_size=SIZE, batch_size=64)
    images, labels = next(iter(dataset))
    representative = _colour_images(48, seed=3)[0].astype("float32")
    out = tmp_path_factory.mktemp("export") / "exported"
    report = export.export_model(
        trained, out, representative_data=representative, check_data=(images, labels)
    )
    print(report)
    return out, report, images.numpy(), labels.numpy()


# ---------------------------------------------------------------------------
# The inference model (fast: random base weights)
# ---------------------------------------------------------------------------


def test_inference_model_strips_augmentation_and_fixes_the_size(untrained):
    model = untrained
    inference = export.inference_model(model)
    layers = list(export._all_layers(inference))
    assert not [layer for layer in layers if type(layer).__name__.startswith("Random")]
    assert "augmentation" not in [layer.name for layer in layers]
    assert any(type(layer).__name__.startswith("Random") for layer in export._all_layers(model))
    assert inference.input_shape == (None, SIZE, SIZE, 3)
    assert inference.get_layer("head") is model.get_layer("head")  # shared, not copied
    images = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(
        inference.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6
    )
    # In training mode the original augments; the inference model never does.
    training = inference(images, training=True).numpy()
    np.testing.assert_allclose(training, model.predict(images, verbose=0), atol=1e-5)


def test_inference_model_without_augmentation_and_after_reloading(tmp_path):
    model = _build(augmentation=None)
    model.save(tmp_path / "model.keras")
    loaded = tlkit.load_classifier(tmp_path / "model.keras")
    inference = export.inference_model(loaded)
    assert [layer.name for layer in inference.layers] == [layer.name for layer in loaded.layers]


def test_inference_model_needs_a_resize_layer():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Flatten()(inputs), name="plain")
    with pytest.raises(ValueError, match="Received: model='plain'"):
        export.inference_model(model)


def test_refuses_an_existing_folder_and_bad_arguments(untrained, tmp_path):
    model = untrained
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_model(model, existing, formats=["tflite"])
    # Not an earlier export: refused even with overwrite=True.
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export.export_model(model, existing, formats=["tflite"], overwrite=True)
    assert (existing / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="Received: formats=\\['coreml'\\]"):
        export.export_model(model, tmp_path / "new", formats=["coreml"])
    with pytest.raises(ValueError, match="representative_data=None"):
        export.export_model(model, tmp_path / "new", formats=["tflite_int8"])
    assert not (tmp_path / "new").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["existing"]


def test_labels_appended_to_a_flatbuffer_read_back(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(export.append_labels(b"TFL3-not-a-real-model", CLASS_NAMES))
    assert export.read_labels(path) == CLASS_NAMES
    assert path.read_bytes().startswith(b"TFL3-not-a-real-model")


# ---------------------------------------------------------------------------
# Real exports (slow: one export in every format, shared)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_export_writes_every_format_and_the_report(exported):
    out, report, images, _ = exported
    names = sorted(path.name for path in out.iterdir())
    expected = [
        "saved_model",
        "model.tflite",
        "model_int8.tflite",
        "labels.txt",
        "export_report.json",
    ]
    assert names == sorted(expected + (["model.onnx"] if HAS_ONNX_TOOLS else []))
    assert not [
        path for path in out.parent.iterdir() if path.name.startswith(".")
    ]  # no staging left
    assert (out / "labels.txt").read_text().splitlines() == CLASS_NAMES
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["class_names"] == CLASS_NAMES
    assert saved["image_size"] == SIZE
    assert saved["check_examples"] == len(images) == 64
    assert saved["representative_examples"] == 48
    assert [result["format"] for result in saved["results"]] == list(export.FORMATS)
    for result in saved["results"]:
        if result["format"] == "onnx" and not HAS_ONNX_TOOLS:
            assert result["status"] == "skipped" and "pip install tf2onnx" in result["reason"]
            assert not (out / "model.onnx").exists()
            continue
        assert result["status"] == "ok", result
        assert result["top1_agreement"] is not None and result["max_abs_diff"] is not None
        assert result["size_bytes"] > 0
    assert "int8" in str(report) and "top-1 agree" in str(report)


@pytest.mark.slow
def test_float_exports_match_keras(exported):
    _, report, _, _ = exported
    for name in ("saved_model", "tflite") + (("onnx",) if HAS_ONNX_TOOLS else ()):
        result = report.result(name)
        assert result.top1_agreement == 1.0, result
        assert result.max_abs_diff < 1e-4, result
        assert result.accuracy_drop == 0.0, result


@pytest.mark.slow
def test_int8_tflite_is_close_and_keeps_the_accuracy(exported):
    out, report, _, _ = exported
    result = report.result("tflite_int8")
    # Measured: agreement 1.0, max difference 0.12-0.13, no accuracy drop.
    assert result.keras_accuracy >= 0.9, result  # the colour task is learned
    assert result.top1_agreement >= 0.9, result
    assert result.accuracy_drop <= 0.05, result
    assert 0 < result.max_abs_diff < 0.2, result  # really quantized, still close
    assert (out / "model_int8.tflite").stat().st_size < 0.5 * (out / "model.tflite").stat().st_size


@pytest.mark.slow
def test_saved_model_carries_class_names_and_predicts(exported, trained):
    out, _, images, _ = exported
    loaded = tf.saved_model.load(str(out / "saved_model"))
    names = [name.decode() for name in loaded.class_names().numpy()]
    assert names == CLASS_NAMES
    signature = loaded.signatures["serving_default"]
    probabilities = list(signature(image=tf.constant(images[:4])).values())[0].numpy()
    np.testing.assert_allclose(probabilities, trained.predict(images[:4], verbose=0), atol=1e-5)


@pytest.mark.slow
def test_tflite_files_load_and_carry_the_labels(exported, trained):
    out, _, images, _ = exported
    for name in ("model.tflite", "model_int8.tflite"):
        assert export.read_labels(out / name) == CLASS_NAMES
        with zipfile.ZipFile(out / name) as archive:
            assert archive.namelist() == ["labels.txt"]
        predict = export._tflite_predictor(out / name)
        probabilities = predict(images[:8])
        assert probabilities.shape == (8, 3)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=0.02)
    np.testing.assert_allclose(
        export._tflite_predictor(out / "model.tflite")(images[:8]),
        trained.predict(images[:8], verbose=0),
        atol=1e-4,
    )


@pytest.mark.slow
def test_export_command_checks_on_a_folder_and_replaces_an_earlier_export(
    trained, tmp_path, capsys
):
    model_path = tmp_path / "model.keras"
    trained.save(model_path)
    images, labels = _colour_images(12, seed=4, size=80)  # resized by the loader
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "data" / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.png")
    # An earlier export, with a file the new one does not write.
    out = tmp_path / "exported"
    out.mkdir()
    (out / "export_report.json").write_text("{}")
    (out / "model_int8.tflite").write_bytes(b"old")
    data = str(tmp_path / "data")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_command(model_path, out, data=data, formats=["saved_model"])
    # Data with other classes is refused before any export.
    (tmp_path / "other" / "crimson").mkdir(parents=True)
    for name in ("blue", "green", "crimson"):
        (tmp_path / "other" / name).mkdir(exist_ok=True)
        Image.fromarray(images[0]).save(tmp_path / "other" / name / "0.png")
        Image.fromarray(images[1]).save(tmp_path / "other" / name / "1.png")
    with pytest.raises(ValueError, match="Received: class_names="):
        export.export_command(model_path, tmp_path / "new", data=str(tmp_path / "other"))
    assert not (tmp_path / "new").exists()

    status = export.export_command(
        model_path, out, data=data, formats=["saved_model"], overwrite=True
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "saved_model" in printed and "Checking on 3 validation images" in printed
    assert sorted(path.name for path in out.iterdir()) == [
        "export_report.json",
        "labels.txt",
        "saved_model",
    ]
    report = json.loads((out / "export_report.json").read_text())
    assert report["check_examples"] == 3
    assert report["results"][0]["top1_agreement"] == 1.0
    assert report["results"][0]["max_abs_diff"] < 1e-5
