"""Loading a trained classifier safely and predicting labels for image files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import keras
import numpy as np

import tlkit.backbones  # noqa: F401  (registers ImagePreprocessing for loading)
from tlkit.data import load_image
from tlkit.models import get_class_names, get_decision_threshold


def load_classifier(path: str | os.PathLike) -> keras.Model:
    """Loads a `.keras` classifier in Keras' safe mode (no code from the file runs).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a `.keras` file, is corrupt, or names a
            class (layer) that is not registered.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No model file at {path}. Pass the model.keras of a run. Received: model={path}"
        )
    if path.suffix != ".keras":
        raise ValueError(
            f"Expected a .keras model file written by `tlkit train`. Received: model={path}"
        )
    check_keras_archive(path)
    try:
        with warnings.catch_warnings():
            # A model saved before its optimizer was built reloads fine, but Keras warns
            # that it skipped the (empty) optimizer state.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return keras.models.load_model(path, safe_mode=True)
    except (TypeError, ValueError, KeyError, OSError) as error:
        # Keras reports an unknown class as a TypeError and some broken archives as
        # "File not found"; say which file failed and why, in one line.
        reason = " ".join(str(error).split())[:300]
        raise ValueError(
            f"Cannot load the model {path}: {type(error).__name__}: {reason}. Pass a "
            f"model.keras written by `tlkit train` (with tlkit installed). Received: model={path}"
        ) from error


def check_keras_archive(path: str | os.PathLike) -> None:
    """Refuses a `.keras` file that is not a readable zip with a model config, in one line.

    Keras itself says "File not found" for a corrupt archive that exists.

    Raises:
        ValueError: If the file is not a zip archive or lacks `config.json`.
    """
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(
            f"The model file {path} is corrupt or truncated (not a readable .keras zip "
            f"archive: {error}). Train again or copy the file again. Received: model={path}"
        ) from error
    if broken is not None or "config.json" not in names:
        what = f"member {broken} is damaged" if broken else "it has no config.json"
        raise ValueError(
            f"The model file {path} is not a complete .keras archive ({what}). Train again "
            f"or copy the file again. Received: model={path}"
        )


def predict_files(model: keras.Model, paths, top_k: int = 3):
    """Top-k (class name, probability) for each image file.

    The first entry is the predicted class: the most probable one, or, for a
    two-class model with a decision threshold (chosen on validation by
    `tlkit.train_run` and saved in the model), class 1 when its probability
    is at least the threshold, else class 0.

    Args:
        model: A tlkit classifier (takes raw 0..255 RGB of any size).
        paths: Image file paths.
        top_k: How many classes to report. Defaults to 3.

    Returns:
        A list of (path, [(name, probability), ...]) in input order.

    Raises:
        ValueError: If `top_k` is not a positive integer, or an image cannot
            be read (`tlkit.data.ImageDecodeError`).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, e.g. 3. Received: top_k={top_k!r}")
    names = get_class_names(model)
    threshold = get_decision_threshold(model)
    size = model.get_layer("resize").get_config()["height"] if _has_layer(model, "resize") else None
    results = []
    for path in paths:
        image = load_image(path, size)
        probabilities = np.asarray(model.predict_on_batch(image[None]))[0]
        best = _ranked(probabilities, threshold)[:top_k]
        labels = [names[i] if names else str(i) for i in best]
        results.append(
            (
                str(path),
                [(label, float(probabilities[i])) for label, i in zip(labels, best, strict=True)],
            )
        )
    return results


def _ranked(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class indices, the predicted one first (by the threshold, if any), then by probability."""
    ranked = np.argsort(-probabilities, kind="stable")
    if threshold is not None and len(probabilities) == 2:
        predicted = int(probabilities[1] >= threshold)
        ranked = np.asarray([predicted, 1 - predicted])
    return ranked


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)
