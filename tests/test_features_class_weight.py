"""`train_head(class_weight=...)` for imbalanced classes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from tlkit.features import FeatureSet
from tlkit.heads import build_head, resolve_class_weight, train_head


def _imbalanced_features(seed: int = 0) -> FeatureSet:
    # 90 % class 0, 10 % class 1, overlapping Gaussians in 4 dimensions.
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=600) < 0.1).astype(np.int32)
    features = rng.normal(size=(600, 4)).astype(np.float32) + labels[:, None] * 1.0
    return FeatureSet(features, labels, views=1)


def test_balanced_matches_sklearn():
    labels = np.array([0, 0, 0, 1, 2, 2])
    weights = resolve_class_weight("balanced", labels, 3)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose([weights[i] for i in range(3)], expected)
    assert resolve_class_weight(None, labels, 3) is None
    assert resolve_class_weight({0: 1, 1: 2, 2: 3}, labels, 3) == {0: 1.0, 1: 2.0, 2: 3.0}


def test_class_weight_raises_minority_recall():
    features = _imbalanced_features()
    recalls = {}
    for setting in (None, "balanced"):
        keras.utils.set_random_seed(0)
        head = build_head(4, 2, dropout_rate=0.0)
        train_head(head, features, epochs=20, learning_rate=0.05, class_weight=setting)
        predicted = head.predict(features.features, verbose=0).argmax(axis=1)
        recalls[setting] = float(np.mean(predicted[features.labels == 1] == 1))
    assert recalls["balanced"] > recalls[None] + 0.2, recalls


@pytest.mark.parametrize(
    "class_weight, message",
    [
        ("inverse", "'balanced'"),
        ({0: 1.0}, "one entry per class"),
        ({0: 1.0, 1: 1.0, 2: 1.0}, "one entry per class"),
        ({0: 1.0, 1: -2.0}, "non-negative"),
        ([1.0, 2.0], "dict"),
    ],
)
def test_class_weight_rejects_bad_values(class_weight, message):
    with pytest.raises(ValueError, match=message):
        resolve_class_weight(class_weight, np.array([0, 1]), 2)


def test_balanced_needs_every_class():
    with pytest.raises(ValueError, match="every class"):
        resolve_class_weight("balanced", np.array([0, 0]), 2)
