"""Classifiers and detectors carry their metadata one way: a ModelMetadata layer."""

from __future__ import annotations

import keras
import numpy as np

from tlkit.detect import DetectionOutput
from tlkit.metadata import ModelMetadata, find_metadata
from tlkit.models import ClassNames, get_class_names


def _tiny(layer: keras.Layer) -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, layer(keras.layers.Dense(2)(inputs)), name="tiny")


def test_classifiers_and_detectors_share_one_metadata_layer(tmp_path):
    for layer in (ClassNames(["cat", "dog"]), DetectionOutput(["cat", "dog"])):
        assert isinstance(layer, ModelMetadata)
        model = _tiny(layer)
        assert find_metadata(model) is model.layers[-1]
        assert get_class_names(model) == ["cat", "dog"]
        path = tmp_path / f"{type(layer).__name__}.keras"
        model.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
        assert type(loaded.layers[-1]) is type(layer)
        assert get_class_names(loaded) == ["cat", "dog"]
        np.testing.assert_allclose(loaded(np.ones((1, 3))), model(np.ones((1, 3))))


def test_a_model_without_metadata_has_no_class_names():
    model = _tiny(keras.layers.Activation("softmax"))
    assert find_metadata(model) is None
    assert get_class_names(model) is None


def test_configs_written_before_the_shared_base_class_still_load():
    # What ClassNames.get_config and DetectionOutput.get_config wrote before
    # both became ModelMetadata subclasses (tlkit 0.1.0 files).
    base = {"name": "class_names", "trainable": True, "dtype": "float32"}
    names = ClassNames.from_config({**base, "class_names": ["a", "b"]})
    assert names.class_names == ["a", "b"]
    output = DetectionOutput.from_config(
        {
            **base,
            "name": "detections",
            "class_names": ["rbc", "wbc"],
            "strides": [8, 16, 32],
            "anchor_scale": 2.5,
            "scales": [1.0, 1.26, 1.587],
            "aspect_ratios": [1.0],
            "pyramid_layers": ["a", "b", "c"],
        }
    )
    assert output.class_names == ["rbc", "wbc"]
    assert output.strides == (8, 16, 32) and output.pyramid_layers == ["a", "b", "c"]
    assert output.get_config()["class_names"] == ["rbc", "wbc"]
