"""`build_backbone(..., preprocessing=...)` and the feature cache key that must see it."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tlkit.backbones import ImagePreprocessing, build_backbone
from tlkit.data import ImageSplit
from tlkit.features import cache_key
from tlkit.fingerprint import preprocessing_modes


def _mode(model) -> str:
    return next(layer.mode for layer in model.layers if isinstance(layer, ImagePreprocessing))


def test_default_keeps_the_backbone_preprocessing():
    model = build_backbone("mobilenet_v2", image_size=32, weights=None)
    assert _mode(model) == "torch"
    assert preprocessing_modes(model) == ["torch"]


@pytest.mark.parametrize("mode", ["tf", "none", "caffe"])
def test_override_changes_only_the_preprocessing(mode):
    reference = build_backbone("mobilenet_v2", image_size=32, weights=None)
    model = build_backbone("mobilenet_v2", image_size=32, weights=None, preprocessing=mode)
    assert _mode(model) == mode
    assert model.name == reference.name
    assert [w.shape for w in model.weights] == [w.shape for w in reference.weights]


def test_override_changes_what_the_network_sees():
    images = np.full((1, 32, 32, 3), 255.0, dtype="float32")
    seen = {}
    for mode in ("torch", "tf", "none"):
        model = build_backbone("mobilenet_v2", image_size=32, weights=None, preprocessing=mode)
        normalised = keras.Model(model.input, model.get_layer("preprocessing").output)
        seen[mode] = float(np.max(normalised(images)))
    assert seen["tf"] == pytest.approx(1.0)
    assert seen["none"] == pytest.approx(255.0)
    assert seen["torch"] == pytest.approx((1 - 0.406) / 0.225, rel=1e-5)


def test_unknown_preprocessing_raises():
    with pytest.raises(ValueError, match="Received: preprocessing='bgr'"):
        build_backbone("mobilenet_v2", image_size=32, weights=None, preprocessing="bgr")


def test_cache_key_differs_by_preprocessing():
    split = ImageSplit(
        "train", ["a", "b"], np.array([0, 1]), images=np.zeros((2, 32, 32, 3), dtype="uint8")
    )
    reference = build_backbone("mobilenet_v2", image_size=32, weights=None)
    model = build_backbone("mobilenet_v2", image_size=32, weights=None, preprocessing="tf")
    model.set_weights(reference.get_weights())
    keys = {cache_key(base, split, 32, 1, None, 0) for base in (reference, model)}
    assert len(keys) == 2
