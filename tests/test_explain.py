"""Grad-CAM on tlkit classifiers (nested base) and the heat-map overlay."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tlkit
from tlkit.explain import default_layer_name, grad_cam, overlay_heatmap
from tlkit.models import find_base

# ImageNet indices: tabby, tiger cat, Egyptian cat; then goldfish, airliner, pizza.
_CAT_CLASSES = (281, 282, 285)
_OTHER_CLASSES = (1, 404, 963)


def _random_classifier(backbone="mobilenet_v2", image_size=64, **kwargs):
    return tlkit.build_classifier(
        backbone, num_classes=3, image_size=image_size, weights=None, **kwargs
    )


@pytest.fixture(scope="module")
def imagenet_subset_classifier() -> keras.Model:
    """A tlkit classifier whose head is six columns of MobileNetV2's ImageNet classifier.

    A real tlkit classifier (nested base, Resizing, `head` model) whose first
    three classes are cats, so Grad-CAM has something true to find.
    """
    try:
        full = tlkit.build_backbone("mobilenet_v2", include_top=True)
    except FileNotFoundError as error:  # WeightsNotAvailableError
        pytest.skip(f"MobileNetV2 ImageNet weights not installed: {error}")
    kernel, bias = full.get_layer("predictions").get_weights()
    columns = list(_CAT_CLASSES + _OTHER_CLASSES)
    head = tlkit.build_head(1280, len(columns))
    head.get_layer("predictions").set_weights([kernel[:, columns], bias[columns]])
    return tlkit.build_classifier(
        "mobilenet_v2", num_classes=len(columns), image_size=224, head=head
    )


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return data.chelsea().astype(np.float32)  # (300, 451, 3), a tabby cat


# ---------------------------------------------------------------------------
# Shapes, range, arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_grad_cam_shape_and_range(backbone):
    model = _random_classifier(backbone, image_size=64)
    images = np.random.default_rng(0).uniform(0, 255, (2, 80, 100, 3)).astype(np.float32)
    heatmaps = grad_cam(model, images)
    assert default_layer_name(find_base(model)) == "head_relu"
    assert heatmaps.shape == (2, 2, 2)  # 64 px / stride 32
    assert heatmaps.dtype == np.float32
    assert np.all(np.isfinite(heatmaps))
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0


def test_grad_cam_skips_augmentation_and_takes_class_lists():
    model = _random_classifier(image_size=64, augmentation="natural")
    images = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    first = grad_cam(model, images, class_index=[0, 2])
    second = grad_cam(model, images, class_index=[0, 2])
    np.testing.assert_allclose(first, second, atol=1e-6)  # No random augmentation.


def test_grad_cam_earlier_layer_has_larger_map():
    model = _random_classifier(image_size=64)
    images = np.full((1, 64, 64, 3), 128.0, dtype=np.float32)
    heatmaps = grad_cam(model, images, class_index=0, layer_name="block13_expand_relu")
    assert heatmaps.shape == (1, 4, 4)


def test_grad_cam_keras_applications_base():
    model = tlkit.build_classifier("mobilenet_v2_keras", num_classes=2, image_size=64, weights=None)
    images = np.random.default_rng(2).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    heatmaps = grad_cam(model, images)
    assert heatmaps.shape == (1, 2, 2)
    assert np.all(np.isfinite(heatmaps))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_index": 3}, "class_index"),
        ({"class_index": [0]}, "one per image"),
        ({"layer_name": "no_such_layer"}, "No layer named"),
        ({"layer_name": "avg_pool"}, "4-D"),
    ],
)
def test_grad_cam_rejects_bad_arguments(kwargs, message):
    model = _random_classifier(image_size=64)
    images = np.zeros((2, 64, 64, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        grad_cam(model, images, **kwargs)


def test_grad_cam_rejects_a_single_image_and_non_tlkit_models():
    model = _random_classifier(image_size=64)
    with pytest.raises(ValueError, match=r"images\[None\]"):
        grad_cam(model, np.zeros((64, 64, 3)))
    plain = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="build_classifier"):
        grad_cam(plain, np.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------------------
# Overlay
# ---------------------------------------------------------------------------


def test_overlay_heatmap_shape_and_blend():
    image = np.full((30, 40, 3), 100, dtype=np.uint8)
    overlay = overlay_heatmap(image, np.zeros((5, 5)), alpha=0.0)
    assert overlay.shape == (30, 40, 3) and overlay.dtype == np.uint8
    np.testing.assert_array_equal(overlay, image)
    hot = overlay_heatmap(image, np.ones((5, 5)), alpha=1.0)  # jet(1.0) is dark red
    assert hot[..., 0].mean() > 100 and hot[..., 2].mean() < 10
    grey = overlay_heatmap(np.zeros((28, 28)), np.ones((2, 2)))
    assert grey.shape == (28, 28, 3)


@pytest.mark.parametrize(
    "image, heatmap, kwargs, message",
    [
        (np.zeros((2, 8, 8, 3)), np.zeros((2, 2)), {}, "one image"),
        (np.zeros((8, 8, 3)), np.zeros((1, 2, 2)), {}, "2-D"),
        (np.zeros((8, 8, 3)), np.zeros((2, 2)), {"alpha": 1.5}, "alpha"),
        (np.zeros((8, 8, 3)), np.zeros((2, 2)), {"colormap": "nope"}, "colormap"),
    ],
)
def test_overlay_heatmap_rejects_bad_arguments(image, heatmap, kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlay_heatmap(image, heatmap, **kwargs)


# ---------------------------------------------------------------------------
# A real photo with pretrained weights
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_grad_cam_on_chelsea_depends_on_the_class(imagenet_subset_classifier, chelsea):
    model = imagenet_subset_classifier
    probabilities = model.predict(chelsea[None], verbose=0)[0]
    predicted = int(np.argmax(probabilities))
    assert predicted in range(len(_CAT_CLASSES)), probabilities  # A cat class wins.
    cat_map = grad_cam(model, chelsea[None])[0]
    other_map = grad_cam(model, chelsea[None], class_index=len(_CAT_CLASSES) + 1)[0]
    assert np.all(np.isfinite(cat_map)) and np.all(np.isfinite(other_map))
    assert cat_map.max() == pytest.approx(1.0)
    assert np.abs(cat_map - other_map).mean() > 0.05


@pytest.mark.slow
def test_grad_cam_finds_the_cat_in_the_left_half(imagenet_subset_classifier, chelsea):
    """Left half: the cat photo; right half: flat grey. The cat evidence must be on the left."""
    model = imagenet_subset_classifier
    cat = keras.ops.convert_to_numpy(keras.ops.image.resize(chelsea[None], (224, 224)))[0]
    canvas = np.full((224, 448, 3), 128.0, dtype=np.float32)
    canvas[:, :224] = cat
    # The model's Resizing squeezes the canvas to 224 x 224: left half = left 3.5 of 7 columns.
    heatmap = grad_cam(model, canvas[None], class_index=0)[0]
    width = heatmap.shape[1]
    left = heatmap[:, : width // 2].sum()
    right = heatmap[:, (width + 1) // 2 :].sum()
    assert left > 0
    assert left > 3 * right, heatmap.round(2)
