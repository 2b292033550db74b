"""Imbalanced and binary data: automatic class weights, AUCs, a validation threshold."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sklearn_metrics

import tlkit
from tlkit import evaluation
from tlkit.data import ImageDataset, ImageSplit
from tlkit.heads import choose_class_weight
from tlkit.models import ClassNames, get_decision_threshold, set_decision_threshold
from tlkit.predict import load_classifier, predict_files
from tlkit.training import predict_split

SIZE = 48


def test_youden_threshold_maximises_balanced_accuracy_over_every_cut():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = np.clip(0.25 + 0.3 * labels + rng.normal(0, 0.15, 200), 0, 1)
    threshold = evaluation.choose_threshold(labels, scores)

    def balanced(cut):
        return evaluation.binary_metrics_at_threshold(labels, scores, cut)["balanced_accuracy"]

    best = max(balanced(cut) for cut in np.unique(scores))
    assert balanced(threshold) == pytest.approx(best)
    # On these skewed scores the 0.5 cut is worse than the chosen one.
    assert balanced(0.5) < balanced(threshold)


def test_sensitivity_and_specificity_agree_with_the_confusion_matrix():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.3, 0.7, 0.2, 0.9, 0.55])
    at = evaluation.binary_metrics_at_threshold(labels, scores, 0.5)
    (tn, fp), (fn, tp) = sklearn_metrics.confusion_matrix(labels, scores >= 0.5)
    assert at["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert at["specificity"] == pytest.approx(tn / (tn + fp))
    metrics = evaluation.classification_metrics(labels, scores, ["no", "yes"])
    assert metrics["pr_auc"] == pytest.approx(
        sklearn_metrics.average_precision_score(labels, scores)
    )


def test_class_weights_turn_on_above_one_and_a_half_times():
    imbalanced = np.array([0] * 29 + [1] * 10)
    weights, ratio = choose_class_weight("auto", imbalanced, 2)
    assert ratio == pytest.approx(2.9)
    assert weights[1] > weights[0]
    assert choose_class_weight("auto", np.array([0] * 12 + [1] * 10), 2)[0] is None
    assert choose_class_weight("none", imbalanced, 2)[0] is None
    assert choose_class_weight("balanced", np.array([0, 1, 1]), 2)[0] is not None
    with pytest.raises(ValueError, match="class_weight must be one of"):
        choose_class_weight("sometimes", imbalanced, 2)


def _tiny_classifier(threshold):
    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    # p(class 1) = softmax([0, -0.85]) ~ 0.30 for any image: class 0 by the arg-max.
    logits = keras.layers.Dense(2, kernel_initializer="zeros", bias_initializer="zeros")(pooled)
    probabilities = keras.layers.Softmax()(logits)
    model = keras.Model(inputs, ClassNames(["healthy", "sick"])(probabilities))
    model.layers[2].bias.assign([0.0, -0.85])
    set_decision_threshold(model, threshold)
    return model


def test_predict_uses_the_threshold_saved_in_the_model(tmp_path):
    image = tmp_path / "scan.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(image)
    for threshold, expected in ((None, "healthy"), (0.2, "sick"), (0.4, "healthy")):
        path = tmp_path / f"model-{threshold}.keras"
        _tiny_classifier(threshold).save(path)
        model = load_classifier(path)
        assert get_decision_threshold(model) == threshold
        [(_, ranked)] = predict_files(model, [image], top_k=2)
        assert ranked[0][0] == expected
        assert dict(ranked)["sick"] == pytest.approx(0.2994, abs=1e-3)
    with pytest.raises(ValueError, match="threshold must be in"):
        set_decision_threshold(_tiny_classifier(None), 1.5)


def _split(name, counts, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], counts)
    colours = np.array([[170, 110, 90], [110, 130, 170]])[labels]
    images = np.clip(
        colours[:, None, None, :] + rng.normal(0, 60, (len(labels), SIZE, SIZE, 3)), 0, 255
    )
    return ImageSplit(name, ["normal", "pneumonia"], labels, images=images.astype(np.uint8))


@pytest.mark.usefixtures("tlkit_cache_dir")
def test_an_imbalanced_binary_run_weights_classes_and_saves_a_validation_threshold(tmp_path):
    dataset = ImageDataset(
        "imbalanced",
        ["normal", "pneumonia"],
        _split("train", (8, 24), 0),
        _split("validation", (6, 10), 1),
        _split("test", (10, 10), 2),
    )
    config = tlkit.TrainConfig(backbone="mobilenet_v2", image_size=SIZE, epochs=3, backend="keras")
    lines = []
    result = tlkit.train_run(
        dataset, config, out=tmp_path / "run", progress=False, log=lines.append
    )
    assert "class weights: on, largest/smallest = 3.0" in lines
    metrics = result.metrics
    assert metrics["class_weight"]["on"] is True
    for key in ("roc_auc", "pr_auc", "balanced_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    at = metrics["at_threshold"]
    # The threshold is the one Youden's J picks on validation, never on test.
    probabilities, labels = predict_split(result.model, dataset.validation, SIZE)
    assert at["threshold"] == pytest.approx(
        evaluation.choose_threshold(labels, probabilities[:, 1]), abs=1e-5
    )
    test_probabilities, test_labels = predict_split(result.model, dataset.test, SIZE)
    expected = evaluation.binary_metrics_at_threshold(
        test_labels, test_probabilities[:, 1], at["threshold"]
    )
    assert at["sensitivity"] == pytest.approx(expected["sensitivity"])
    assert at["specificity"] == pytest.approx(expected["specificity"])
    saved = load_classifier(tmp_path / "run" / "model.keras")
    assert get_decision_threshold(saved) == pytest.approx(at["threshold"])

    unweighted = tlkit.train_run(
        dataset,
        tlkit.TrainConfig(
            backbone="mobilenet_v2", image_size=SIZE, epochs=3, backend="keras", class_weight="none"
        ),
        progress=False,
        log=lines.append,
    )
    assert unweighted.metrics["class_weight"]["on"] is False
    assert "class weights: off, largest/smallest = 3.0 (class_weight=none)" in lines
