"""Detection transfer: cached fine-tuning of the base, box-aware augmentation, COCO metrics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image

from tlkit import detect
from tlkit.backbones import get_backbone
from tlkit.data import DetectionExample

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")


def _square_examples(folder, shape=(64, 96), side=28):
    placements = [((230, 30, 30), (8, 10)), ((30, 30, 230), (50, 24))]
    examples = []
    for label, (colour, (x, y)) in enumerate(placements):
        image = np.full((*shape, 3), 128, "uint8")
        image[y : y + side, x : x + side] = colour
        path = folder / f"square{label}.png"
        Image.fromarray(image).save(path)
        examples.append(
            DetectionExample(
                str(path),
                np.array([[x, y, x + side, y + side]], "float32"),
                np.array([label], "int32"),
            )
        )
    return examples


# ---------------------------------------------------------------------------
# Fine-tuning the top blocks on cached activations
# ---------------------------------------------------------------------------


def _weights_by_kind(detector, first_tuned):
    """Copies of the base's weights: {(in a tuned block, "bn" or "other", path): array}."""
    base = detect.frozen_backbone(detector)
    names = detect.detector_block_names(detector)
    spec = get_backbone(detector.backbone_name)
    result = {}
    for layer in base.layers:
        block = spec.block_of(layer.name)
        if block is None:
            continue
        for weight in layer.weights:
            kind = "bn" if isinstance(layer, keras.layers.BatchNormalization) else "other"
            top = names.index(block) >= names.index(first_tuned)
            result[(top, kind, weight.path)] = keras.ops.convert_to_numpy(weight).copy()
    return result


def test_fine_tune_detector_changes_top_blocks_only(tmp_path):
    keras.utils.set_random_seed(0)
    examples = _square_examples(tmp_path)
    detector = detect.build_detector("mobilenet_v2", num_classes=2, image_size=(64, 96))
    block = "block16"
    data = detect.prepare_detection_data(detector, examples, fine_tune_from=block)
    head_before = [w.copy() for w in detector.get_layer("detection_head").get_weights()]
    before = _weights_by_kind(detector, block)
    detect.fine_tune_detector(detector, data, epochs=3, learning_rate=1e-3, batch_size=2)
    after = _weights_by_kind(detector, block)
    moved = {key for key in before if not np.array_equal(before[key], after[key])}
    top_other = {key for key in before if key[0] and key[1] == "other"}
    assert top_other and moved <= top_other, sorted(moved - top_other)[:3]
    # Every top convolution kernel moved; BatchNorm statistics and lower blocks did not.
    kernels = {key for key in top_other if key[2].endswith("kernel")}
    assert kernels and kernels <= moved
    assert not any(key[1] == "bn" for key in moved)
    assert not any(not key[0] for key in moved)
    head_after = detector.get_layer("detection_head").get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(head_before, head_after, strict=True))
    assert not detect.frozen_backbone(detector).trainable  # frozen again afterwards
    # The fine-tuned weights are the detector's: the cached path and raw images agree.
    cached = detect.predict_boxes(detector, data, score_threshold=0.0, max_detections=5)
    direct = detect.predict_boxes(
        detector, [e.image_path for e in examples], score_threshold=0.0, max_detections=5
    )
    for (_, cached_scores, _), (_, direct_scores, _) in zip(cached, direct, strict=True):
        np.testing.assert_allclose(cached_scores, direct_scores, atol=0.02)


def test_split_backbone_parts_compose_to_the_base():
    keras.utils.set_random_seed(0)
    detector = detect.build_detector("mobilenet_v2", num_classes=2, image_size=(64, 96))
    lower, upper = detect.split_backbone(detector, "block14")
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    whole = detect.frozen_backbone(detector)(images, training=False)
    cached = lower(images, training=False)
    # Strides 8 and 16 lie below block14 and come from the cache; stride 32 from `upper`.
    assert len(cached) == 3
    parts = [*cached[:2], upper(cached[-1], training=False)]
    for expected, got in zip(whole, parts, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(expected), keras.ops.convert_to_numpy(got), atol=1e-4
        )


def test_fine_tune_detector_needs_cut_data_and_known_block(tmp_path):
    detector = detect.build_detector(
        "mobilenet_v2", num_classes=2, image_size=(64, 96), weights=None
    )
    examples = _square_examples(tmp_path)
    plain = detect.prepare_detection_data(detector, examples)
    with pytest.raises(ValueError, match="fine_tune_from"):
        detect.fine_tune_detector(detector, plain, epochs=1)
    with pytest.raises(ValueError, match="block must name a block"):
        detect.split_backbone(detector, "block99")
    with pytest.raises(ValueError, match="block must name a block"):
        detect.split_backbone(detector, "stem")


# ---------------------------------------------------------------------------
# Box-aware augmentation
# ---------------------------------------------------------------------------


def _bright_extent(image):
    ys, xs = np.nonzero(image[..., 0] > 128)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], "float32")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_box_moves_with_the_image(seed):
    images = np.zeros((1, 96, 128, 3), "float32")
    images[0, 30:50, 40:70] = 255.0
    box = np.array([[40, 30, 70, 50]], "float32")
    augmentation = detect.build_box_augmentation(
        zoom=0.3, translation=0.1, brightness=0, contrast=0
    )
    out_images, out_boxes, out_labels = detect.augment_with_boxes(
        augmentation, images, [box], [np.array([1])], seed=seed
    )
    assert out_labels[0].tolist() == [1]
    np.testing.assert_allclose(out_boxes[0][0], _bright_extent(out_images[0]), atol=1.5)
    assert not np.allclose(out_boxes[0][0], box[0])  # it did move


def test_boxes_that_leave_the_image_are_dropped_and_others_shift():
    images = np.zeros((1, 64, 100, 3), "float32")
    boxes = np.array([[10, 10, 30, 30], [70, 20, 90, 40]], "float32")
    # Half the width to the right, exactly: the right-hand box leaves the image.
    shift = keras.layers.RandomTranslation(
        (0.0, 0.0), (0.5, 0.5), bounding_box_format="xyxy", fill_mode="constant"
    )
    _, out_boxes, out_labels = detect.augment_with_boxes(shift, images, [boxes], [np.array([0, 1])])
    assert out_labels[0].tolist() == [0]
    np.testing.assert_allclose(out_boxes[0], [[60, 10, 80, 30]], atol=1e-3)


def test_default_box_augmentation_has_no_flip():
    assert not any(
        isinstance(layer, keras.layers.RandomFlip)
        for layer in detect.build_box_augmentation().layers
    )
    assert any(
        isinstance(layer, keras.layers.RandomFlip)
        for layer in detect.build_box_augmentation(horizontal_flip=True).layers
    )


def test_augmented_views_are_cached_after_the_plain_one(tmp_path):
    detector = detect.build_detector(
        "mobilenet_v2", num_classes=2, image_size=(64, 96), weights=None
    )
    examples = _square_examples(tmp_path)
    plain = detect.prepare_detection_data(detector, examples)
    augmentation = detect.build_box_augmentation(seed=0)
    views = detect.prepare_detection_data(detector, examples, views=3, augmentation=augmentation)
    assert views.targets.shape[0] == 3 * len(examples)
    np.testing.assert_array_equal(views.features[0][:2], plain.features[0])
    assert not np.array_equal(views.features[0][2:4], plain.features[0])
    again = detect.prepare_detection_data(detector, examples, views=3, augmentation=augmentation)
    np.testing.assert_array_equal(again.targets, views.targets)  # seeded: same draws


# ---------------------------------------------------------------------------
# COCO metrics
# ---------------------------------------------------------------------------

TRUTH = [
    (np.array([[10, 10, 50, 50], [60, 60, 100, 100], [0, 0, 20, 20]], "float32"), [0, 1, 0]),
    (np.array([[20, 30, 80, 90], [5, 5, 25, 30]], "float32"), [0, 1]),
]


def test_coco_metrics_perfect_and_small_recall():
    perfect = [(b, np.full(len(b), 0.9, "float32"), np.array(v)) for b, v in TRUTH]
    result = detect.coco_metrics(perfect, TRUTH, class_names=["a", "b"])
    assert result["mAP@0.5"] == pytest.approx(1.0)
    assert result["mAP@[.5:.95]"] == pytest.approx(1.0)
    assert result["small_boxes"] == 2 and result["recall_small@0.5"] == pytest.approx(1.0)
    # Drop the 20x20 box of image 0: one of the two small boxes is missed.
    missing = [(b[:2], s[:2], c[:2]) for b, s, c in perfect[:1]] + perfect[1:]
    assert detect.coco_metrics(missing, TRUTH)["recall_small@0.5"] == pytest.approx(0.5)


def test_coco_metrics_agree_with_mean_average_precision_at_one_half():
    rng = np.random.default_rng(0)
    predictions = []
    for boxes, labels in TRUTH:
        noisy = boxes + rng.normal(0, 6, boxes.shape).astype("float32")
        extra = np.array([[30, 30, 70, 70]], "float32")
        predictions.append(
            (
                np.concatenate([noisy, extra]),
                rng.uniform(0.1, 1.0, len(boxes) + 1).astype("float32"),
                np.array([*labels, 1]),
            )
        )
    coco = detect.coco_metrics(predictions, TRUTH, class_names=["a", "b"])
    reference = detect.mean_average_precision(predictions, TRUTH, class_names=["a", "b"])
    assert 0.0 < coco["mAP@0.5"] < 1.0
    assert coco["mAP@0.5"] == pytest.approx(reference["mAP"], abs=1e-9)
    assert coco["mAP@[.5:.95]"] < coco["mAP@0.5"]


def test_first_views_keeps_the_plain_images(tmp_path):
    detector = detect.build_detector(
        "mobilenet_v2", num_classes=2, image_size=(64, 96), weights=None
    )
    examples = _square_examples(tmp_path)
    augmentation = detect.build_box_augmentation(seed=0)
    views = detect.prepare_detection_data(detector, examples, views=2, augmentation=augmentation)
    plain = views.first_views(1)
    assert plain.views == 1 and plain.targets.shape[0] == len(examples)
    np.testing.assert_array_equal(plain.targets, views.targets[: len(examples)])
    with pytest.raises(ValueError, match="between 1 and 2"):
        views.first_views(3)
