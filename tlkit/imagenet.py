"""ImageNet-1k class names, shipped with tlkit so decoding works offline.

The names and WordNet ids come from tensorflow-datasets (Apache-2.0):
`datasets/imagenet2012/labels.txt` and `datasets/siscore/labels.py`, in the
standard class-index order that Keras and torchvision use.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np


@functools.cache
def class_index() -> dict[int, tuple[str, str]]:
    """Maps class index to (WordNet id, human-readable name)."""
    text = resources.files("tlkit").joinpath("resources/imagenet_class_index.json").read_text()
    return {int(k): (v[0], v[1]) for k, v in json.loads(text).items()}


def class_names() -> list[str]:
    """The 1000 class names in index order; the first synonym of each WordNet entry."""
    index = class_index()
    return [index[i][1].split(",")[0] for i in range(len(index))]


def decode_predictions(probabilities, top: int = 5) -> list[list[tuple[str, str, float]]]:
    """Decodes a batch of ImageNet probabilities, like keras.applications' helper.

    Args:
        probabilities: Array of shape (batch, 1000).
        top: How many classes per image. Defaults to 5.

    Returns:
        For each image, a list of (WordNet id, name, score), best first.

    Raises:
        ValueError: If the input is not of shape (batch, 1000).
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != 1000:
        raise ValueError(
            "decode_predictions expects ImageNet scores of shape (batch, 1000). "
            f"Received: shape={probabilities.shape}"
        )
    index = class_index()
    results = []
    for row in probabilities:
        best = np.argsort(-row)[:top]
        results.append([(index[i][0], index[i][1].split(",")[0], float(row[i])) for i in best])
    return results
