"""Object detection: box formats, mAP, the detector's shapes, NMS and a tiny overfit."""

from __future__ import annotations

import math

import keras
import matplotlib
import numpy as np
import pytest
from PIL import Image

from tlkit import detect
from tlkit.data import DetectionExample

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

TRUTH = [
    (np.array([[10, 10, 50, 50], [60, 60, 100, 100]], "float32"), np.array([0, 1])),
    (np.array([[20, 30, 80, 90]], "float32"), np.array([0])),
]


def _perfect():
    return [(boxes, np.full(len(boxes), 0.9, "float32"), labels) for boxes, labels in TRUTH]


# ---------------------------------------------------------------------------
# Box formats and mAP against hand-worked examples
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["xywh", "center_xywh", "yxyx", "center_yxhw"])
def test_convert_boxes_round_trip(target):
    boxes = np.array([[10, 20, 30, 60], [0, 0, 5, 7]], "float32")
    converted = detect.convert_boxes(boxes, "xyxy", target)
    np.testing.assert_allclose(detect.convert_boxes(converted, target, "xyxy"), boxes, atol=1e-5)


def test_convert_boxes_to_xywh_by_hand():
    np.testing.assert_allclose(
        detect.convert_boxes([[10, 20, 30, 60]], "xyxy", "xywh"), [[10, 20, 20, 40]]
    )


def test_perfect_predictions_give_map_one():
    result = detect.mean_average_precision(_perfect(), TRUTH, class_names=["a", "b"])
    assert result == pytest.approx({"a": 1.0, "b": 1.0, "mAP": 1.0})


def test_box_shifted_below_iou_threshold_scores_zero():
    # Shifted by half its width: IoU = 20*40 / (2*1600 - 800) = 1/3 < 0.5.
    truth = [(np.array([[10, 10, 50, 50]], "float32"), np.array([0]))]
    shifted = [(np.array([[30, 10, 70, 50]], "float32"), np.array([0.9]), np.array([0]))]
    assert detect.mean_average_precision(shifted, truth)["mAP"] == 0.0
    assert detect.mean_average_precision(shifted, truth, iou_threshold=0.3)["mAP"] == pytest.approx(
        1.0
    )


def test_duplicate_detections_are_false_positives():
    truth = [(np.array([[10, 10, 50, 50], [60, 60, 100, 100]], "float32"), np.array([0, 0]))]
    boxes = np.array([[10, 10, 50, 50], [11, 11, 51, 51], [60, 60, 100, 100]], "float32")
    predictions = [(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]))]
    # TP, FP (duplicate), TP: precision 1 up to recall 0.5, then 2/3; COCO's 101
    # recall points give (51 * 1 + 50 * 2/3) / 101.
    expected = (51 + 50 * 2 / 3) / 101
    assert detect.mean_average_precision(predictions, truth)["mAP"] == pytest.approx(expected)


def test_wrong_class_and_missing_detections():
    wrong_class = [(boxes, scores, 1 - labels) for boxes, scores, labels in _perfect()]
    assert detect.mean_average_precision(wrong_class, TRUTH)["mAP"] == 0.0
    empty = [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, "int32")) for _ in TRUTH]
    assert detect.mean_average_precision(empty, TRUTH) == {"0": 0.0, "1": 0.0, "mAP": 0.0}


def test_class_without_true_boxes_is_nan_and_left_out():
    result = detect.mean_average_precision(_perfect(), TRUTH, class_names=["a", "b", "c"])
    assert math.isnan(result["c"]) and result["mAP"] == 1.0


def test_map_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per image"):
        detect.mean_average_precision(_perfect()[:1], TRUTH)


# ---------------------------------------------------------------------------
# Anchors, targets, the detector and prediction
# ---------------------------------------------------------------------------


def test_anchor_count_and_target_matching():
    anchors = detect.make_anchors((64, 96))
    assert anchors.shape == ((8 * 12 + 4 * 6 + 2 * 3) * 3, 4)
    small = np.array([[5, 5, 12, 12]], "float32")  # smaller than any anchor
    targets = detect.encode_targets(anchors, small, np.array([2]))
    assert (targets[:, 4] == 2).sum() >= 1  # the best anchor always matches
    assert set(np.unique(targets[:, 4])) <= {-2.0, -1.0, 2.0}
    empty = detect.encode_targets(anchors, np.zeros((0, 4)), np.zeros(0))
    assert (empty[:, 4] == -1).all()


@pytest.fixture(scope="module")
def tiny_detector():
    keras.utils.set_random_seed(0)
    return detect.build_detector("mobilenet_v2", num_classes=2, image_size=(64, 96), weights=None)


def test_detector_output_shape(tiny_detector):
    num_anchors = (8 * 12 + 4 * 6 + 2 * 3) * 3
    assert tiny_detector.output_shape == (None, num_anchors, 4 + 2)
    assert len(tiny_detector.anchors) == num_anchors
    assert not tiny_detector.get_layer("backbone").trainable
    output = tiny_detector(np.zeros((2, 64, 96, 3), "float32"))
    assert tuple(output.shape) == (2, num_anchors, 6)


@pytest.mark.parametrize("image_size", [(60, 96), (64,), 64])
def test_detector_rejects_bad_image_size(image_size):
    with pytest.raises(ValueError, match="multiples of 32"):
        detect.build_detector("mobilenet_v2", image_size=image_size, weights=None)


def test_predict_boxes_returns_valid_boxes_after_nms(tiny_detector):
    images = np.random.default_rng(0).uniform(0, 255, (3, 120, 150, 3)).astype("float32")
    results = detect.predict_boxes(tiny_detector, images, score_threshold=0.0, iou_threshold=0.3)
    assert len(results) == 3
    for boxes, scores, classes in results:
        assert boxes.shape == (len(scores), 4) and len(scores) > 0
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 150 + 1e-3).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 120 + 1e-3).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (np.diff(scores) <= 1e-6).all() and set(classes) <= {0, 1}
        for label in set(classes):
            same = boxes[classes == label]
            iou = keras.ops.convert_to_numpy(
                keras.utils.bounding_boxes.compute_iou(same, same, "xyxy")
            )
            np.fill_diagonal(iou, 0)
            assert iou.max(initial=0) <= 0.3 + 1e-4


def test_predict_boxes_rejects_bad_threshold(tiny_detector):
    with pytest.raises(ValueError, match="score_threshold"):
        detect.predict_boxes(tiny_detector, np.zeros((1, 64, 96, 3)), score_threshold=2)


def test_draw_boxes_returns_a_figure():
    figure = detect.draw_boxes(
        np.zeros((40, 60, 3)), [[5, 5, 20, 30]], [1], [0.8], class_names=["a", "b"]
    )
    assert len(figure.axes[0].patches) == 1
    matplotlib.pyplot.close(figure)


# ---------------------------------------------------------------------------
# A tiny overfit: one coloured square per image
# ---------------------------------------------------------------------------


def _square_images(folder, shape=(128, 128), side=40, placements=None, prefix="square"):
    """One image per placement (colour, (x, y)) with one coloured square on grey."""
    placements = placements or [
        ((230, 30, 30), (10, 20)),
        ((30, 200, 30), (60, 50)),
        ((30, 30, 230), (30, 70)),
    ]
    examples = []
    for label, (colour, (x, y)) in enumerate(placements):
        image = np.full((*shape, 3), 128, "uint8")
        image[y : y + side, x : x + side] = colour
        path = folder / f"{prefix}{label}.png"
        Image.fromarray(image).save(path)
        examples.append(
            DetectionExample(
                str(path),
                np.array([[x, y, x + side, y + side]], "float32"),
                np.array([label], "int32"),
            )
        )
    return examples


@pytest.mark.slow
def test_tiny_overfit_reaches_high_map(tmp_path):
    keras.utils.set_random_seed(0)
    examples = _square_images(tmp_path)
    detector = detect.build_detector("mobilenet_v2", num_classes=3, image_size=(128, 128))
    pyramid = detector.get_layer("backbone")
    before = [w.copy() for w in pyramid.get_weights()[:4]]
    data = detect.prepare_detection_data(detector, examples, views=4)
    assert data.features[0].shape[0] == 12 and data.targets.shape[0] == 12
    detect.train_detector(detector, data, epochs=60, learning_rate=3e-3, batch_size=4)
    for old, new in zip(before, pyramid.get_weights()[:4], strict=True):
        np.testing.assert_array_equal(old, new)  # the base stayed frozen
    predictions = detect.predict_boxes(detector, data, score_threshold=0.05)
    result = detect.mean_average_precision(predictions, examples)
    assert result["mAP"] >= 0.9, result
    confident = detect.predict_boxes(detector, data, score_threshold=0.5)
    assert [list(classes) for _, _, classes in confident] == [[0], [1], [2]]
    # The same answer from image files through the whole detector.
    from_files = detect.predict_boxes(detector, [e.image_path for e in examples])
    assert detect.mean_average_precision(from_files, examples)["mAP"] >= 0.9


# ---------------------------------------------------------------------------
# Saving and loading a trained detector
# ---------------------------------------------------------------------------


def _tiny_square_examples(folder):
    """Two 64x96 images, each with one coloured square."""
    return _square_images(
        folder, (64, 96), 28, [((230, 30, 30), (8, 10)), ((30, 30, 230), (50, 24))], prefix="tiny"
    )


def test_trained_detector_saves_and_loads_with_identical_boxes(tmp_path):
    keras.utils.set_random_seed(0)
    examples = _tiny_square_examples(tmp_path)
    detector = detect.build_detector(
        "mobilenet_v2",
        num_classes=2,
        image_size=(64, 96),
        weights=None,
        head_width=16,
        head_depth=1,
        anchor_scale=3.0,
        class_names=["red", "blue"],
    )
    data = detect.prepare_detection_data(detector, examples)
    head_before = [w.copy() for w in detector.get_layer("detection_head").get_weights()]
    detect.train_detector(detector, data, epochs=3, learning_rate=1e-2, batch_size=2)
    assert any(
        not np.array_equal(before, after)
        for before, after in zip(
            head_before, detector.get_layer("detection_head").get_weights(), strict=True
        )
    )

    path = tmp_path / "models" / "detector.keras"
    detect.save_detector(detector, path)
    assert [p.name for p in path.parent.iterdir()] == ["detector.keras"]  # no temporary left
    loaded = detect.load_detector(path)

    np.testing.assert_array_equal(loaded.anchors, detector.anchors)
    assert loaded.class_names == ["red", "blue"]
    assert loaded.pyramid_layers == detector.pyramid_layers
    assert not loaded.get_layer("backbone").trainable
    for before, after in zip(detector.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    images = np.stack([np.asarray(Image.open(e.image_path), "float32") for e in examples])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(detector(images))
    )
    for source in (data, [e.image_path for e in examples]):
        original = detect.predict_boxes(detector, source, score_threshold=0.0)
        reloaded = detect.predict_boxes(loaded, source, score_threshold=0.0)
        for (boxes, scores, classes), (boxes2, scores2, classes2) in zip(
            original, reloaded, strict=True
        ):
            assert len(scores) > 0
            np.testing.assert_array_equal(boxes, boxes2)
            np.testing.assert_array_equal(scores, scores2)
            np.testing.assert_array_equal(classes, classes2)
    # The loaded detector trains further on the same cached features.
    detect.train_detector(loaded, data, epochs=1, batch_size=2)


def test_load_detector_refuses_code_in_the_file(tmp_path):
    inputs = keras.Input(shape=(4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        detect.load_detector(path)


def test_save_and_load_detector_errors(tiny_detector, tmp_path):
    with pytest.raises(ValueError, match="Received: path="):
        detect.save_detector(tiny_detector, tmp_path / "detector.h5")
    plain = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="build_detector"):
        detect.save_detector(plain, tmp_path / "plain.keras")
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="not a tlkit detector"):
        detect.load_detector(tmp_path / "plain.keras")
    with pytest.raises(FileNotFoundError, match="save_detector"):
        detect.load_detector(tmp_path / "missing.keras")


def test_frozen_backbone_finds_the_base_under_its_old_name_too():
    inputs = keras.Input((8, 8, 3))
    legacy = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs), name="feature_pyramid")
    outer_inputs = keras.Input((8, 8, 3))
    detector = keras.Model(outer_inputs, legacy(outer_inputs))
    assert detect.frozen_backbone(detector) is legacy
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="`backbone` layer"):
        detect.frozen_backbone(plain)
