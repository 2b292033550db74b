"""Loading a trained classifier safely and predicting labels for image files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import keras
import numpy as np

import tlkit.backbones  # noqa: F401  (registers ImagePreprocessing for loading)
from tlkit.data import load_image
from tlkit.models import get_class_names


def load_classifier(path: str | os.PathLike) -> keras.Model:
    """Loads a `.keras` classifier in Keras' safe mode (no code from the file runs).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a `.keras` file.
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
    with warnings.catch_warnings():
        # A model saved before its optimizer was built reloads fine, but Keras warns
        # that it skipped the (empty) optimizer state.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return keras.models.load_model(path, safe_mode=True)


def predict_files(model: keras.Model, paths, top_k: int = 3):
    """Top-k (class name, probability) for each image file.

    Args:
        model: A tlkit classifier (takes raw 0..255 RGB of any size).
        paths: Image file paths.
        top_k: How many classes to report. Defaults to 3.

    Returns:
        A list of (path, [(name, probability), ...]) in input order.
    """
    names = get_class_names(model)
    size = model.get_layer("resize").get_config()["height"] if _has_layer(model, "resize") else None
    results = []
    for path in paths:
        image = load_image(path, size)
        probabilities = np.asarray(model.predict_on_batch(image[None]))[0]
        best = np.argsort(-probabilities)[:top_k]
        labels = [names[i] if names else str(i) for i in best]
        results.append(
            (
                str(path),
                [(label, float(probabilities[i])) for label, i in zip(labels, best, strict=True)],
            )
        )
    return results


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)
