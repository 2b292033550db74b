"""Tests of tlkit.corruptions: graded ImageNet-C-style corruptions."""

import numpy as np
import pytest

from tlkit.corruptions import CORRUPTIONS, corrupt


@pytest.fixture(scope="module")
def images():
    # A smooth scene with an edge: blur, JPEG and fog all have something to change.
    rng = np.random.default_rng(0)
    base = rng.uniform(30, 220, (4, 48, 48, 3)).astype("float32")
    base[:, :, 24:] = 250.0
    return base


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_shape_range_and_growing_damage(kind, images):
    damage = []
    for severity in (1, 3, 5):
        out = corrupt(images, kind, severity)
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 255.0
        damage.append(float(np.abs(out - images).mean()))
    assert 0 < damage[0] < damage[1] < damage[2], damage


def test_seeded_and_specific(images):
    np.testing.assert_array_equal(
        corrupt(images, "gaussian_noise", 2, seed=1), corrupt(images, "gaussian_noise", 2, seed=1)
    )
    assert not np.array_equal(
        corrupt(images, "gaussian_noise", 2, seed=1), corrupt(images, "gaussian_noise", 2, seed=2)
    )
    dark = corrupt(images, "darkness", 4)
    assert dark.mean() < 0.3 * images.mean()
    # Motion blur is horizontal: rows are smeared, a vertical stripe pattern is kept per column.
    stripes = np.zeros((1, 32, 32, 3), dtype="float32")
    stripes[:, ::2] = 255.0  # Horizontal lines: blurring along x leaves them intact.
    np.testing.assert_allclose(corrupt(stripes, "motion_blur", 5), stripes, atol=1e-3)


def test_errors_are_clear(images):
    with pytest.raises(ValueError, match="Unknown corruption.*kind='snow'"):
        corrupt(images, "snow", 1)
    with pytest.raises(ValueError, match="severity=6"):
        corrupt(images, "fog", 6)
    with pytest.raises(ValueError, match=r"images.shape=\(48, 48, 3\)"):
        corrupt(images[0], "fog", 1)
