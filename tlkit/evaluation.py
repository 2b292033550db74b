"""Evaluation: classification metrics, confusion analysis and plots.

Metrics come from scikit-learn and are returned as plain Python numbers, so the
result can be written with `json.dump`. Plots are built on
`matplotlib.figure.Figure` objects directly, without pyplot, so they neither
need nor change a display backend: they render inline in Jupyter (a `Figure` as
the last expression of a cell) and save to files on a headless machine.

Example:

```python
probabilities = model.predict(test_images)
metrics = classification_metrics(test_labels, probabilities, class_names)
print(format_summary(metrics))
plot_confusion_matrix(metrics["confusion_matrix"], class_names, path="confusion.png")
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as sklearn_metrics

from tlkit._io import atomic_path

# Metric names Keras may record for accuracy, most common first.
_ACCURACY_KEYS = (
    "accuracy",
    "sparse_categorical_accuracy",
    "categorical_accuracy",
    "binary_accuracy",
    "acc",
)

# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def classification_metrics(
    y_true: Any, probabilities: Any, class_names: Sequence[str]
) -> dict[str, Any]:
    """Computes classification metrics from true labels and predicted scores.

    The predicted class is the arg-max of `probabilities`, so logits work as
    well as softmax outputs (ROC AUC and top-k only use the ranking).

    Args:
        y_true: True class indices, shape `(num_samples,)`, or one-hot labels of
            shape `(num_samples, num_classes)`.
        probabilities: Predicted scores of shape `(num_samples, num_classes)`.
            For two classes a single sigmoid column, shape `(num_samples,)` or
            `(num_samples, 1)`, is read as the probability of class 1.
        class_names: Names of the classes, in label-index order.

    Returns:
        A JSON-serialisable dict with:
        `num_samples`, `class_names`, `accuracy`, `balanced_accuracy`,
        `macro_precision`, `macro_recall`, `macro_f1`, `per_class` (class name ->
        `{"precision", "recall", "f1", "support"}`), `confusion_matrix` (list of
        lists, rows are true classes, columns predicted), for more than two
        classes `top_k` and `top_k_accuracy` (k = min(5, num_classes - 1)), and
        for two classes `roc_auc` and `pr_auc` (average precision; class 1 is
        positive; `None` when only one class occurs in `y_true`, where they
        are undefined).

    Raises:
        ValueError: If shapes disagree with each other or with `class_names`,
            labels are out of range, or scores are not finite.

    Example:

    >>> metrics = classification_metrics([0, 1, 1], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]],
    ...                                  ["cat", "dog"])
    >>> round(metrics["accuracy"], 3), metrics["confusion_matrix"]
    (0.667, [[1, 0], [1, 1]])
    """
    class_names = [str(name) for name in class_names]
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(
            f"`class_names` must name at least two classes. Received: class_names={class_names!r}"
        )
    labels = _as_label_indices(y_true, num_classes)
    scores = _as_score_matrix(probabilities, num_classes)
    if len(labels) != len(scores):
        raise ValueError(
            "`y_true` and `probabilities` must have one row per sample, the same "
            f"number of rows. Received: len(y_true)={len(labels)}, "
            f"probabilities.shape={np.shape(probabilities)}"
        )
    if len(labels) == 0:
        raise ValueError("Cannot compute metrics for zero samples. Received: len(y_true)=0")

    class_indices = list(range(num_classes))
    predictions = scores.argmax(axis=1)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=class_indices, zero_division=0
    )
    confusion = sklearn_metrics.confusion_matrix(labels, predictions, labels=class_indices)
    # Balanced accuracy is the mean recall over the classes that occur in y_true
    # (sklearn's definition), computed here to avoid its warning for absent classes.
    present = support > 0
    result: dict[str, Any] = {
        "num_samples": int(len(labels)),
        "class_names": class_names,
        "accuracy": float(sklearn_metrics.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": float(precision[index]),
                "recall": float(recall[index]),
                "f1": float(f1[index]),
                "support": int(support[index]),
            }
            for index, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.astype(int).tolist(),
    }
    if num_classes > 2:
        top_k = min(5, num_classes - 1)
        result["top_k"] = top_k
        result["top_k_accuracy"] = float(
            sklearn_metrics.top_k_accuracy_score(labels, scores, k=top_k, labels=class_indices)
        )
    else:
        both = len(np.unique(labels)) == 2
        result["roc_auc"] = (
            float(sklearn_metrics.roc_auc_score(labels, scores[:, 1])) if both else None
        )
        result["pr_auc"] = (
            float(sklearn_metrics.average_precision_score(labels, scores[:, 1])) if both else None
        )
    return result


# How `choose_threshold` picks a binary decision threshold, as recorded in metrics.json.
THRESHOLD_RULE = "Youden's J on the validation split (max sensitivity + specificity - 1)"


def choose_threshold(y_true: Any, positive_scores: Any) -> float:
    """A binary decision threshold chosen by Youden's J statistic.

    Picks the threshold that maximises sensitivity + specificity - 1
    (equivalently balanced accuracy) on the given labels. The candidates are
    0.5 and the midpoints between consecutive distinct scores, so a chosen
    threshold sits in the gap between two classes' scores rather than on a
    training example; ties go to the threshold closest to 0.5 (written by
    hand: `sklearn.metrics.roc_curve` only returns thresholds at the
    scores themselves). Call it on validation data, never on the test split.

    Args:
        y_true: True labels, 0 or 1, shape `(num_samples,)`.
        positive_scores: Scores or probabilities of class 1, same shape.

    Returns:
        The threshold: predict class 1 when the score is at least this.
        0.5 when `y_true` holds only one class (J is undefined).

    Raises:
        ValueError: If the shapes differ or a label is not 0 or 1.

    Example:

    >>> round(choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.8]), 3)
    0.325
    """
    labels = np.asarray(y_true).reshape(-1)
    scores = np.asarray(positive_scores, dtype=float).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(
            "`y_true` and `positive_scores` must have the same length. "
            f"Received: {labels.shape} and {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"`y_true` must hold 0 and 1. Received: {np.unique(labels)[:5]}")
    if len(np.unique(labels)) < 2:
        return 0.5
    distinct = np.unique(scores)
    candidates = np.concatenate([[0.5], (distinct[:-1] + distinct[1:]) / 2])
    positives = np.sort(scores[labels == 1])
    negatives = np.sort(scores[labels == 0])
    # Share of each class at or above each candidate threshold.
    sensitivity = 1 - np.searchsorted(positives, candidates, side="left") / len(positives)
    false_positive_rate = 1 - np.searchsorted(negatives, candidates, side="left") / len(negatives)
    statistic = sensitivity - false_positive_rate
    best = np.flatnonzero(np.isclose(statistic, statistic.max()))
    return float(min(candidates[best], key=lambda value: (abs(value - 0.5), value)))


def binary_metrics_at_threshold(
    y_true: Any, positive_scores: Any, threshold: float
) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity and specificity at a threshold.

    Args:
        y_true: True labels, 0 or 1 (1 is the positive class).
        positive_scores: Scores or probabilities of class 1.
        threshold: Class 1 is predicted when the score is at least this.

    Returns:
        A dict with `threshold`, `accuracy`, `balanced_accuracy`,
        `sensitivity` (recall of class 1) and `specificity` (recall of
        class 0); a recall is None when its class does not occur.

    Example:

    >>> binary_metrics_at_threshold([0, 1, 1], [0.2, 0.4, 0.9], 0.3)["sensitivity"]
    1.0
    """
    labels = np.asarray(y_true).reshape(-1).astype(int)
    predictions = (np.asarray(positive_scores, dtype=float).reshape(-1) >= threshold).astype(int)
    recalls = sklearn_metrics.recall_score(
        labels, predictions, labels=[0, 1], average=None, zero_division=np.nan
    )
    present = [bool((labels == index).any()) for index in (0, 1)]
    specificity = float(recalls[0]) if present[0] else None
    sensitivity = float(recalls[1]) if present[1] else None
    known = [value for value in (specificity, sensitivity) if value is not None]
    return {
        "threshold": float(threshold),
        "accuracy": float(sklearn_metrics.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(np.mean(known)) if known else None,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def images_per_second(
    model: Any,
    image_size: int,
    batch_size: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Measures how many images per second a model processes on this machine.

    Runs `model(images, training=False)` on a batch of random 0..255 images
    inside a `tf.function`: once to trace and warm up, then `repeats` timed
    times. Decoding and resizing files are not included, so the number
    compares networks, not input pipelines.

    Args:
        model: A Keras model that takes `(batch, image_size, image_size, 3)`.
        image_size: Square input size in pixels.
        batch_size: Images per timed call. Defaults to 32.
        repeats: Timed calls; the median is reported. Defaults to 3.
        seed: Seed of the random images. Defaults to 0.

    Returns:
        Images per second (median over the timed calls).

    Raises:
        ValueError: If `image_size`, `batch_size` or `repeats` is not a
            positive int.

    Example:

    >>> base = tlkit.build_feature_extractor("mobilenet_v2", image_size=160)
    >>> speed = images_per_second(base, 160)  # e.g. about 100 on 2 CPU cores
    """
    import time

    import tensorflow as tf

    for name, value in (
        ("image_size", image_size),
        ("batch_size", batch_size),
        ("repeats", repeats),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    images = (
        np.random.default_rng(seed)
        .uniform(0.0, 255.0, (batch_size, image_size, image_size, 3))
        .astype(np.float32)
    )
    images = tf.constant(images)
    infer = tf.function(lambda batch: model(batch, training=False))
    infer(images)  # trace and warm up
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        _ = np.asarray(infer(images))
        durations.append(time.perf_counter() - start)
    return float(batch_size / np.median(durations))


def most_confused_pairs(
    confusion_matrix: Any, class_names: Sequence[str], top: int = 5
) -> list[tuple[str, str, int]]:
    """Lists the most frequent mistakes in a confusion matrix.

    Args:
        confusion_matrix: Square matrix of counts, rows are true classes and
            columns predicted classes (as `classification_metrics` returns).
        class_names: Names of the classes, in index order.
        top: How many pairs to return at most. Defaults to 5.

    Returns:
        Up to `top` tuples `(true_class, predicted_class, count)`, largest count
        first (ties in row-major order). Pairs with a zero count are left out.

    Raises:
        ValueError: If the matrix is not square, does not match `class_names`,
            or `top` is negative.

    Example:

    >>> most_confused_pairs([[5, 2], [0, 3]], ["cat", "dog"])
    [('cat', 'dog', 2)]
    """
    matrix = np.asarray(confusion_matrix)
    class_names = [str(name) for name in class_names]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            "`confusion_matrix` must be a square 2-D matrix. "
            f"Received: confusion_matrix.shape={matrix.shape}"
        )
    if matrix.shape[0] != len(class_names):
        raise ValueError(
            "`confusion_matrix` must have one row and column per class name. "
            f"Received: confusion_matrix.shape={matrix.shape}, "
            f"len(class_names)={len(class_names)}"
        )
    if top < 0:
        raise ValueError(f"`top` must be zero or more. Received: top={top}")
    mistakes = [
        (
            class_names[true_index],
            class_names[predicted_index],
            int(matrix[true_index, predicted_index]),
        )
        for true_index in range(matrix.shape[0])
        for predicted_index in range(matrix.shape[1])
        if true_index != predicted_index and matrix[true_index, predicted_index] > 0
    ]
    # sorted() is stable, so equal counts keep their row-major order.
    return sorted(mistakes, key=lambda mistake: -mistake[2])[:top]


def format_summary(metrics: Mapping[str, Any]) -> str:
    """Formats metrics from `classification_metrics` as short text for a terminal.

    Args:
        metrics: The dict `classification_metrics` returns.

    Returns:
        A few lines: accuracy, balanced accuracy, top-k accuracy or ROC AUC,
        recall per class and the most confused pairs.

    Raises:
        ValueError: If `metrics` lacks the keys `classification_metrics` writes.

    Example:

    >>> metrics = classification_metrics([0, 1], [[0.9, 0.1], [0.2, 0.8]], ["cat", "dog"])
    >>> print(format_summary(metrics).splitlines()[0])
    Accuracy: 100.0% on 2 images (balanced accuracy 100.0%)
    """
    required = ("accuracy", "balanced_accuracy", "num_samples", "per_class")
    missing = [key for key in required if key not in metrics]
    if missing:
        raise ValueError(
            f"`metrics` must be the dict `classification_metrics` returns; it lacks "
            f"{missing}. Received: keys={sorted(metrics)}"
        )
    lines = [
        f"Accuracy: {metrics['accuracy']:.1%} on {metrics['num_samples']} images "
        f"(balanced accuracy {metrics['balanced_accuracy']:.1%})"
    ]
    if "top_k_accuracy" in metrics:
        lines.append(f"Top-{metrics['top_k']} accuracy: {metrics['top_k_accuracy']:.1%}")
    if metrics.get("roc_auc") is not None:
        lines.append(
            f"ROC AUC: {metrics['roc_auc']:.3f}"
            + (f", PR AUC: {metrics['pr_auc']:.3f}" if metrics.get("pr_auc") is not None else "")
        )
    at = metrics.get("at_threshold")
    if at:
        described = ", ".join(
            f"{key.replace('_', ' ')} {at[key]:.1%}"
            for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity")
            if at.get(key) is not None
        )
        lines.append(f"At the validation threshold {at['threshold']:.3f}: {described}")
    lines.append("Recall per class:")
    width = max(len(name) for name in metrics["per_class"])
    for name, values in metrics["per_class"].items():
        lines.append(f"  {name:<{width}}  {values['recall']:6.1%}  (n={values['support']})")
    if "confusion_matrix" in metrics:
        pairs = most_confused_pairs(metrics["confusion_matrix"], list(metrics["per_class"]), top=3)
        if pairs:
            lines.append(
                "Most confused (true -> predicted): "
                + ", ".join(f"{true} -> {predicted} ({count})" for true, predicted, count in pairs)
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def plot_training_curves(
    histories: Mapping[str, Any], path: str | os.PathLike | None = None
) -> Figure:
    """Plots loss and accuracy over the epochs of one or more training phases.

    Phases are drawn one after another on a shared epoch axis (e.g. epochs 1-5
    for `"head"`, then 6-10 for `"fine-tune"`), each in its own colour, with a
    dotted line where a phase starts. Training curves are solid, validation
    curves dashed.

    Args:
        histories: Phase name -> history, in training order. A history is the
            dict `keras.callbacks.History.history` holds (metric name -> one
            value per epoch, e.g. `loss`, `accuracy`, `val_loss`,
            `val_accuracy`) or the `History` object `model.fit` returns.
        path: If given, the figure is also saved there (format from the suffix,
            e.g. `.png`). Defaults to `None`.

    Returns:
        A `matplotlib.figure.Figure` with a loss panel and an accuracy panel.

    Raises:
        ValueError: If `histories` is empty or a phase records no loss.

    Example:

    >>> figure = plot_training_curves({
    ...     "head": {"loss": [1.0, 0.6], "val_loss": [0.9, 0.7],
    ...              "accuracy": [0.5, 0.7], "val_accuracy": [0.6, 0.65]},
    ...     "fine-tune": {"loss": [0.4], "val_loss": [0.5],
    ...                   "accuracy": [0.8], "val_accuracy": [0.75]},
    ... })
    >>> [axes.get_xlabel() for axes in figure.axes]
    ['Epoch', 'Epoch']
    """
    if not histories:
        raise ValueError(
            "`histories` must hold at least one phase, e.g. {'head': history.history}. "
            f"Received: histories={histories!r}"
        )
    phases = {name: _as_history_dict(name, history) for name, history in histories.items()}

    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    first_epoch = 1
    any_accuracy = False
    for phase_index, (phase, history) in enumerate(phases.items()):
        color = f"C{phase_index % 10}"
        num_epochs = max(len(values) for values in history.values())
        epochs = np.arange(first_epoch, first_epoch + num_epochs)
        accuracy_key = next((key for key in _ACCURACY_KEYS if key in history), None)
        panels = [(loss_axes, "loss")]
        if accuracy_key is not None:
            panels.append((accuracy_axes, accuracy_key))
            any_accuracy = True
        for axes, key in panels:
            for prefix, style, split in (("", "-", "train"), ("val_", "--", "validation")):
                values = history.get(prefix + key)
                if values:
                    axes.plot(
                        epochs[: len(values)],
                        values,
                        linestyle=style,
                        color=color,
                        marker="o" if num_epochs == 1 else None,
                        label=f"{phase} ({split})",
                    )
            if phase_index > 0:
                axes.axvline(first_epoch - 0.5, color="0.6", linestyle=":", linewidth=1)
        first_epoch += num_epochs

    loss_axes.set_title("Loss")
    loss_axes.set_ylabel("Loss")
    accuracy_axes.set_title("Accuracy")
    accuracy_axes.set_ylabel("Accuracy")
    if not any_accuracy:
        accuracy_axes.text(
            0.5,
            0.5,
            "no accuracy recorded",
            ha="center",
            va="center",
            transform=accuracy_axes.transAxes,
            color="0.5",
        )
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("Epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    figure.suptitle("Training curves (solid: train, dashed: validation)")
    if path is not None:
        _save_figure(figure, path)
    return figure


def plot_confusion_matrix(
    confusion_matrix: Any,
    class_names: Sequence[str],
    path: str | os.PathLike | None = None,
    normalize: bool = True,
) -> Figure:
    """Plots a confusion matrix as a heat map.

    Args:
        confusion_matrix: Square matrix of counts, rows are true classes and
            columns predicted classes (as `classification_metrics` returns).
        class_names: Names of the classes, in index order.
        path: If given, the figure is also saved there (format from the suffix,
            e.g. `.png`). Defaults to `None`.
        normalize: Divide each row by its total, so cells show the fraction of
            each true class (the diagonal is the recall). Rows with no samples
            stay zero. Defaults to `True`.

    Returns:
        A `matplotlib.figure.Figure` with labelled axes and a colour bar. Cell
        values are written when there are at most 20 classes.

    Raises:
        ValueError: If the matrix is not square or does not match `class_names`.

    Example:

    >>> figure = plot_confusion_matrix([[5, 1], [2, 4]], ["cat", "dog"])
    >>> figure.axes[0].get_ylabel()
    'True class'
    """
    matrix = np.asarray(confusion_matrix, dtype=float)
    class_names = [str(name) for name in class_names]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or len(matrix) != len(class_names):
        raise ValueError(
            "`confusion_matrix` must be square with one row and column per class name. "
            f"Received: confusion_matrix.shape={matrix.shape}, "
            f"len(class_names)={len(class_names)}"
        )
    # Imported here: sklearn's display module imports matplotlib at import time.
    from sklearn.metrics import ConfusionMatrixDisplay

    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
        values_format = ".2f"
    else:
        values_format = "d"
        matrix = matrix.astype(int)

    num_classes = len(class_names)
    side = min(4 + 0.5 * num_classes, 20)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    axes = figure.subplots()
    display = ConfusionMatrixDisplay(matrix, display_labels=class_names)
    display.plot(
        ax=axes,
        cmap="Blues",
        include_values=num_classes <= 20,
        values_format=values_format,
        xticks_rotation="vertical" if num_classes > 6 else "horizontal",
        colorbar=True,
        # A fixed 0..1 scale makes normalised plots comparable between models.
        im_kw={"vmin": 0.0, "vmax": 1.0} if normalize else None,
    )
    if normalize and display.text_ is not None:
        # sklearn picks text colours from the data range, not the fixed 0..1
        # scale, which leaves white text on pale cells; pick them from the scale.
        for (row, column), text in np.ndenumerate(display.text_):
            text.set_color("white" if matrix[row, column] > 0.5 else "black")
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    axes.set_title(
        "Confusion matrix (fraction of each true class)" if normalize else "Confusion matrix"
    )
    if path is not None:
        _save_figure(figure, path)
    return figure


# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


def _as_label_indices(y_true: Any, num_classes: int) -> np.ndarray:
    labels = np.asarray(y_true)
    if labels.ndim == 2 and labels.shape[1] == num_classes and num_classes > 1:
        labels = labels.argmax(axis=1)
    elif labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            "`y_true` must hold class indices of shape (num_samples,) or one-hot rows "
            f"of shape (num_samples, {num_classes}). Received: y_true.shape={labels.shape}"
        )
    if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise ValueError(
            f"`y_true` must hold integer class indices. Received: y_true[:5]={labels[:5].tolist()}"
        )
    labels = labels.astype(int)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`y_true` must hold class indices in [0, {num_classes - 1}] for "
            f"{num_classes} class names. Received: y_true range=[{labels.min()}, {labels.max()}]"
        )
    return labels


def _as_score_matrix(probabilities: Any, num_classes: int) -> np.ndarray:
    scores = np.asarray(probabilities, dtype=float)
    if num_classes == 2 and (scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1)):
        positive = scores.reshape(-1)
        scores = np.stack([1.0 - positive, positive], axis=1)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(
            f"`probabilities` must have shape (num_samples, {num_classes}): one column "
            f"per class name. Received: probabilities.shape={scores.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            "`probabilities` must be finite; found NaN or infinity. Check the model "
            "output for a diverged training run. "
            f"Received: non-finite count={int(np.sum(~np.isfinite(scores)))}"
        )
    return scores


def _as_history_dict(phase: str, history: Any) -> dict[str, list[float]]:
    # Accepts a History object (from model.fit) as well as its .history dict.
    values = getattr(history, "history", history)
    if not isinstance(values, Mapping) or not values.get("loss"):
        raise ValueError(
            f"Each history must be a dict of per-epoch metrics with a 'loss' entry "
            f"(`model.fit(...).history`). Received: histories[{phase!r}]={history!r}"
        )
    return {str(key): [float(value) for value in series] for key, series in values.items()}


def _save_figure(figure: Figure, path: str | os.PathLike) -> None:
    path = Path(path)
    file_format = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=file_format, dpi=120, bbox_inches="tight")
