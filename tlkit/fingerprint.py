"""What identifies a model's computation: its weight values and its input preprocessing.

The feature cache (`tlkit.features`), the LiteRT conversion cache
(`tlkit.litert`) and the teacher-logit cache (`tlkit.distill`) key their files
on these, so a fine-tuned base or another preprocessing never reuses stale
results.
"""

from __future__ import annotations

import hashlib

import keras
import numpy as np

from tlkit.backbones.preprocessing import ImagePreprocessing


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 over a model's weight values (hex)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def preprocessing_modes(model: keras.Model) -> list[str]:
    """The modes of the `ImagePreprocessing` layers inside a model, outermost first.

    Preprocessing has no weights, so `weights_fingerprint` cannot tell a base
    built with `build_backbone(..., preprocessing="tf")` from the original; the
    feature cache key includes these modes as well.

    Args:
        model: A Keras model, possibly with nested models.

    Returns:
        A list of mode names, e.g. `["torch"]`; empty when there is none.

    Example:
        >>> preprocessing_modes(tlkit.build_backbone("mobilenet_v2", weights=None))
        ['torch']
    """
    modes = []
    for layer in model.layers:
        if isinstance(layer, ImagePreprocessing):
            modes.append(layer.mode)
        elif isinstance(layer, keras.Model):
            modes.extend(preprocessing_modes(layer))
    return modes
