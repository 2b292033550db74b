"""The small from-scratch CNN baseline."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from tlkit.scratch import build_scratch_cnn


def _norms(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_scratch_cnn_takes_raw_images_of_any_size():
    model = build_scratch_cnn(3, image_size=32, filters=(8, 16))
    probabilities = model.predict(np.zeros((2, 50, 40, 3), "float32"), verbose=0)
    assert probabilities.shape == (2, 3)
    assert [layer.momentum for layer in _norms(model)] == [0.99, 0.99]


def test_batch_norm_momentum_reaches_every_norm_layer():
    model = build_scratch_cnn(3, image_size=32, filters=(8, 16, 32), batch_norm_momentum=0.9)
    assert [layer.momentum for layer in _norms(model)] == [0.9, 0.9, 0.9]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"filters": ()}, "Received: filters=()"),
        ({"filters": (8, 0)}, "Received: filters=(8, 0)"),
        ({"batch_norm_momentum": 1.0}, "Received: batch_norm_momentum=1.0"),
        ({"batch_norm_momentum": -0.1}, "Received: batch_norm_momentum=-0.1"),
        ({"batch_norm_momentum": "0.9"}, "Received: batch_norm_momentum='0.9'"),
    ],
)
def test_scratch_cnn_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_scratch_cnn(3, **arguments)


def test_scratch_cnn_without_flip_for_sided_classes():
    flipping = build_scratch_cnn(3, image_size=32, filters=(8,))
    plain = build_scratch_cnn(3, image_size=32, filters=(8,), flip=None)
    assert any(isinstance(layer, keras.layers.RandomFlip) for layer in flipping.layers)
    assert not any(isinstance(layer, keras.layers.RandomFlip) for layer in plain.layers)
