"""`ImageSplit.sample_per_class`: seeded few-shot subsets."""

from __future__ import annotations

import numpy as np
import pytest

from tlkit.data import ImageSplit


def _split() -> ImageSplit:
    labels = np.array([0] * 6 + [1] * 4 + [2] * 8)
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(3, axis=-1)
    return ImageSplit("train", ["a", "b", "c"], labels, images=images)


def test_counts_order_and_seed():
    split = _split()
    few = split.sample_per_class(3, seed=1)
    assert few.class_counts() == {"a": 3, "b": 3, "c": 3}
    assert np.all(np.diff(few.images[:, 0, 0, 0].astype(int)) > 0)  # keeps the split's order
    again = split.sample_per_class(3, seed=1)
    np.testing.assert_array_equal(few.images, again.images)
    others = {split.sample_per_class(3, seed=s).images.tobytes() for s in range(5)}
    assert len(others) > 1


@pytest.mark.parametrize("count", [0, -1, 2.5, True])
def test_rejects_bad_counts(count):
    with pytest.raises(ValueError, match="Received: count="):
        _split().sample_per_class(count)


def test_rejects_more_than_the_smallest_class():
    with pytest.raises(ValueError, match="'b' has only 4"):
        _split().sample_per_class(5)
