"""`FeatureSet.first_view` and `evaluation.images_per_second`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tlkit.evaluation import images_per_second
from tlkit.features import FeatureSet


def test_first_view_keeps_the_plain_rows():
    features = np.arange(12, dtype=np.float32).reshape(6, 2)  # 2 images x 3 views
    labels = np.array([0, 1, 0, 1, 0, 1], dtype=np.int32)
    first = FeatureSet(features, labels, views=3).first_view()
    assert first.views == 1 and len(first) == 2
    np.testing.assert_array_equal(first.features, features[:2])
    np.testing.assert_array_equal(first.labels, [0, 1])


def test_images_per_second_is_positive():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
    speed = images_per_second(model, 8, batch_size=4, repeats=2)
    assert np.isfinite(speed) and speed > 0


@pytest.mark.parametrize("arguments", [{"image_size": 0}, {"batch_size": 1.5}, {"repeats": True}])
def test_images_per_second_rejects_bad_arguments(arguments):
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
    settings = {"image_size": 8, **arguments}
    with pytest.raises(ValueError, match="Received:"):
        images_per_second(model, **settings)
