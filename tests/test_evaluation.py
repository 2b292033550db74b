"""Tests for tlkit.evaluation: metrics against hand-computed examples, and plots."""

import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from tlkit import evaluation

CLASS_NAMES = ["a", "b", "c"]
# Predictions (arg-max): 0, 0, 1 | 1, 0 | 2, 2, 1
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2]
PROBABILITIES = [
    [0.7, 0.2, 0.1],
    [0.6, 0.1, 0.3],
    [0.3, 0.6, 0.1],
    [0.1, 0.8, 0.1],
    [0.5, 0.1, 0.4],  # true b; top-2 is {a, c}: the only top-2 miss
    [0.1, 0.2, 0.7],
    [0.2, 0.1, 0.7],
    [0.1, 0.5, 0.4],
]


@pytest.fixture(scope="module")
def metrics():
    return evaluation.classification_metrics(Y_TRUE, PROBABILITIES, CLASS_NAMES)


# ---------------------------------------------------------------------------
# classification_metrics
# ---------------------------------------------------------------------------


def test_multiclass_metrics_by_hand(metrics):
    assert metrics["num_samples"] == 8
    assert metrics["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 1, 2]]
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    # Mean recall: (2/3 + 1/2 + 2/3) / 3.
    assert metrics["balanced_accuracy"] == pytest.approx(11 / 18)
    per_class = metrics["per_class"]
    assert per_class["a"]["precision"] == pytest.approx(2 / 3)
    assert per_class["b"]["precision"] == pytest.approx(1 / 3)
    assert per_class["c"]["precision"] == pytest.approx(1.0)
    assert per_class["b"]["recall"] == pytest.approx(1 / 2)
    assert per_class["b"]["f1"] == pytest.approx(0.4)
    assert per_class["c"]["f1"] == pytest.approx(0.8)
    assert [per_class[name]["support"] for name in CLASS_NAMES] == [3, 2, 3]
    assert metrics["macro_precision"] == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    assert metrics["macro_recall"] == pytest.approx(11 / 18)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0.8) / 3)
    assert metrics["top_k"] == 2
    assert metrics["top_k_accuracy"] == pytest.approx(7 / 8)
    assert "roc_auc" not in metrics


def test_metrics_are_json_serialisable(metrics):
    restored = json.loads(json.dumps(metrics))
    assert restored == metrics
    assert type(metrics["accuracy"]) is float
    assert type(metrics["per_class"]["a"]["support"]) is int


def test_one_hot_labels_give_the_same_metrics(metrics):
    one_hot = np.eye(3)[Y_TRUE]
    assert evaluation.classification_metrics(one_hot, PROBABILITIES, CLASS_NAMES) == metrics


def test_binary_metrics_include_roc_auc():
    y_true = [0, 0, 1, 1]
    positive = [0.1, 0.4, 0.35, 0.8]
    two_columns = np.stack([1 - np.array(positive), positive], axis=1)
    metrics = evaluation.classification_metrics(y_true, two_columns, ["normal", "pneumonia"])
    # Of the four (negative, positive) pairs, three rank the positive higher.
    assert metrics["roc_auc"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["confusion_matrix"] == [[2, 0], [1, 1]]
    assert "top_k_accuracy" not in metrics
    # A single sigmoid column reads as the probability of class 1.
    sigmoid = evaluation.classification_metrics(y_true, positive, ["normal", "pneumonia"])
    assert sigmoid == metrics
    json.dumps(metrics)


def test_binary_roc_auc_is_none_with_one_class_present():
    metrics = evaluation.classification_metrics([1, 1], [[0.2, 0.8], [0.6, 0.4]], ["n", "p"])
    assert metrics["roc_auc"] is None
    json.dumps(metrics)


def test_class_absent_from_y_true_has_zero_support():
    metrics = evaluation.classification_metrics(
        [0, 0], [[0.9, 0.1, 0.0], [0.1, 0.2, 0.7]], CLASS_NAMES
    )
    assert metrics["per_class"]["b"]["support"] == 0
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "y_true, probabilities, match",
    [
        ([0, 1], PROBABILITIES, "same number of rows"),
        (Y_TRUE, np.ones((8, 2)), r"probabilities.shape=\(8, 2\)"),
        ([0, 1, 3], np.ones((3, 3)), r"\[0, 2\]"),
        ([0, 1, 2], [[0.1, 0.2, np.nan]] * 3, "finite"),
        ([[0, 1]], np.ones((1, 3)), "y_true.shape"),
    ],
)
def test_shape_and_value_errors(y_true, probabilities, match):
    with pytest.raises(ValueError, match=match) as error:
        evaluation.classification_metrics(y_true, probabilities, CLASS_NAMES)
    assert "Received:" in str(error.value)


# ---------------------------------------------------------------------------
# most_confused_pairs, format_summary
# ---------------------------------------------------------------------------


def test_most_confused_pairs():
    confusion = [[5, 3, 0], [1, 4, 2], [0, 3, 6]]
    assert evaluation.most_confused_pairs(confusion, CLASS_NAMES, top=3) == [
        ("a", "b", 3),
        ("c", "b", 3),
        ("b", "c", 2),
    ]
    assert evaluation.most_confused_pairs(np.eye(3), CLASS_NAMES) == []
    with pytest.raises(ValueError, match="len\\(class_names\\)=2"):
        evaluation.most_confused_pairs(confusion, ["a", "b"])


def test_format_summary(metrics):
    text = evaluation.format_summary(metrics)
    assert text.splitlines()[0] == "Accuracy: 62.5% on 8 images (balanced accuracy 61.1%)"
    assert "Top-2 accuracy: 87.5%" in text
    assert "b   50.0%  (n=2)" in text
    assert "Most confused" in text
    with pytest.raises(ValueError, match="Received: keys="):
        evaluation.format_summary({"accuracy": 1.0})


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

HISTORIES = {
    "head": {
        "loss": [1.2, 0.8, 0.6],
        "val_loss": [1.0, 0.8, 0.7],
        "accuracy": [0.5, 0.7, 0.8],
        "val_accuracy": [0.55, 0.65, 0.7],
    },
    "fine-tune": {
        "loss": [0.5, 0.4],
        "val_loss": [0.6, 0.55],
        "accuracy": [0.85, 0.9],
        "val_accuracy": [0.75, 0.78],
    },
}


def _is_png(path):
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_figure(tmp_path):
    path = tmp_path / "plots" / "curves.png"
    figure = evaluation.plot_training_curves(HISTORIES, path=path)
    assert isinstance(figure, Figure)
    assert _is_png(path)
    assert [file.name for file in path.parent.iterdir()] == ["curves.png"]  # no temp file left
    loss_axes, accuracy_axes = figure.axes[:2]
    assert loss_axes.get_xlabel() == "Epoch" and loss_axes.get_ylabel() == "Loss"
    assert accuracy_axes.get_ylabel() == "Accuracy"
    assert figure.get_suptitle()
    # The fine-tune phase continues the epoch axis after the 3 head epochs.
    lines = {line.get_label(): line for line in loss_axes.get_lines()}
    np.testing.assert_array_equal(lines["head (train)"].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(lines["fine-tune (validation)"].get_xdata(), [4, 5])
    assert lines["head (train)"].get_linestyle() == "-"
    assert lines["head (validation)"].get_linestyle() == "--"
    legend_texts = [text.get_text() for text in loss_axes.get_legend().get_texts()]
    assert "fine-tune (train)" in legend_texts


def test_training_curves_accept_history_objects_and_other_accuracy_names():
    class History:
        history = {"loss": [0.5, 0.4], "sparse_categorical_accuracy": [0.6, 0.7]}

    figure = evaluation.plot_training_curves({"head": History()})
    accuracy_lines = figure.axes[1].get_lines()
    assert [line.get_label() for line in accuracy_lines] == ["head (train)"]


def test_training_curves_errors():
    with pytest.raises(ValueError, match="Received: histories"):
        evaluation.plot_training_curves({})
    with pytest.raises(ValueError, match="'loss'"):
        evaluation.plot_training_curves({"head": {"accuracy": [0.5]}})


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_figure(tmp_path, metrics, normalize):
    path = tmp_path / "confusion.png"
    figure = evaluation.plot_confusion_matrix(
        metrics["confusion_matrix"], CLASS_NAMES, path=path, normalize=normalize
    )
    assert isinstance(figure, Figure)
    assert _is_png(path)
    axes = figure.axes[0]
    assert axes.get_xlabel() == "Predicted class"
    assert axes.get_ylabel() == "True class"
    assert [label.get_text() for label in axes.get_yticklabels()] == CLASS_NAMES
    cell_texts = [text.get_text() for text in axes.texts]
    # Row a is [2, 1, 0] out of 3.
    assert ("0.67" if normalize else "2") in cell_texts


def test_confusion_matrix_errors():
    with pytest.raises(ValueError, match="Received: confusion_matrix.shape"):
        evaluation.plot_confusion_matrix([[1, 2]], CLASS_NAMES)
