"""The new classification head: build it, compile it, train it on cached features.

A head maps a base's pooled features to class probabilities. The same head
model is trained on cached features here (seconds on a CPU) and then nested in
the full classifier (`tlkit.models.build_classifier`), so no weights are
copied between the two.
"""

from __future__ import annotations

import keras
import numpy as np

from tlkit.features import FeatureSet

# ---------------------------------------------------------------------------
# Building and compiling
# ---------------------------------------------------------------------------


def build_head(
    feature_width: int, num_classes: int, dropout_rate: float = 0.2, name: str = "head"
) -> keras.Model:
    """The new classification head: dropout and a softmax `predictions` layer.

    The same head model is trained on cached features and then nested in the
    full classifier, so no weights are copied between the two.

    Args:
        feature_width: Length of the backbone's pooled feature vector.
        num_classes: Number of classes.
        dropout_rate: Dropout before the classifier. Defaults to 0.2.
        name: Model name. Defaults to `"head"`.

    Returns:
        A `keras.Model` from features to class probabilities.
    """
    check_num_classes(num_classes)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1). Received: dropout_rate={dropout_rate}")
    inputs = keras.Input(shape=(feature_width,), name="features")
    x = keras.layers.Dropout(dropout_rate, name="dropout")(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def compile_classifier(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Compiles a classifier with Adam, sparse categorical loss and accuracy.

    Args:
        model: A model with softmax outputs and integer labels.
        learning_rate: Adam learning rate. Defaults to 1e-3.

    Returns:
        The same model, compiled.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def check_num_classes(num_classes) -> None:
    """Raises a ValueError unless `num_classes` is an int of at least 2."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            "num_classes must be an integer of at least 2 (a classifier needs two classes). "
            f"Received: num_classes={num_classes!r}"
        )


# ---------------------------------------------------------------------------
# Training on cached features
# ---------------------------------------------------------------------------


def train_head(
    head: keras.Model,
    train_features: FeatureSet,
    validation_features: FeatureSet | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    callbacks=None,
    verbose: int | str = 0,
    class_weight: dict[int, float] | str | None = None,
) -> dict[str, list[float]]:
    """Trains a head (`tlkit.heads.build_head`) on cached features.

    With imbalanced classes, `class_weight` scales each example's loss by the
    weight of its class, so errors on the rare class cost more (Keras
    `fit(class_weight=...)`). Validation metrics are not weighted.

    Args:
        head: The head model; it is compiled here.
        train_features: Training features.
        validation_features: Validation features (un-augmented), or None.
        epochs: Epochs. Defaults to 20.
        batch_size: Batch size. Defaults to 64.
        learning_rate: Adam learning rate. Defaults to 1e-3.
        seed: Shuffle seed. Defaults to 0.
        callbacks: Keras callbacks. Defaults to None.
        verbose: Keras verbosity. Defaults to 0.
        class_weight: None (every example counts once), `"balanced"`
            (weights `n_samples / (n_classes * count)` from the training
            labels, as `sklearn.utils.class_weight.compute_class_weight`), or
            a dict `class index -> weight` covering every class. Defaults to
            None.

    Returns:
        The Keras history dict.

    Raises:
        ValueError: If `class_weight` is another string, misses a class,
            names a class the head does not have, or has a negative weight.

    Example:
        >>> history = train_head(head, train_features, class_weight="balanced")
    """
    compile_classifier(head, learning_rate=learning_rate)
    return fit_on_features(
        head,
        train_features,
        validation_features,
        epochs,
        batch_size,
        seed,
        callbacks,
        verbose,
        class_weight,
    )


def fit_on_features(
    model: keras.Model,
    train_features: FeatureSet,
    validation_features: FeatureSet | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    callbacks=None,
    verbose: int | str = 0,
    class_weight: dict[int, float] | str | None = None,
) -> dict[str, list[float]]:
    """Fits a compiled model on cached features or activations, shuffled by `seed`.

    Args:
        model: A compiled model taking the rows of `train_features`.
        train_features: Training rows and labels.
        validation_features: Validation rows, or None.
        epochs: Epochs. Defaults to 20.
        batch_size: Batch size (validation uses 4x). Defaults to 64.
        seed: Shuffle seed. Defaults to 0.
        callbacks: Keras callbacks. Defaults to None.
        verbose: Keras verbosity. Defaults to 0.
        class_weight: As in `train_head`. Defaults to None.

    Returns:
        The Keras history dict.
    """
    num_classes = int(model.output_shape[-1])
    class_weight = resolve_class_weight(class_weight, train_features.labels, num_classes)
    validation = validation_features.to_dataset(batch_size * 4) if validation_features else None
    history = model.fit(
        train_features.to_dataset(batch_size, shuffle=True, seed=seed),
        validation_data=validation,
        epochs=epochs,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # The dataset shuffles itself.
        class_weight=class_weight,
    )
    return history.history


# What `choose_class_weight` accepts, and the imbalance from which "auto" turns weights on.
CLASS_WEIGHT_MODES = ("auto", "balanced", "none")
IMBALANCE_RATIO = 1.5


def class_imbalance(labels: np.ndarray, num_classes: int) -> float:
    """The count of the largest class over that of the smallest (inf if one is empty)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")


def choose_class_weight(
    mode: str, labels: np.ndarray, num_classes: int
) -> tuple[dict[int, float] | None, float]:
    """Class weights for a run: `"balanced"` ones when asked or when classes are imbalanced.

    Args:
        mode: `"auto"` (balanced weights when the largest class has more than
            `IMBALANCE_RATIO` (1.5) times the examples of the smallest),
            `"balanced"` (always) or `"none"` (never).
        labels: Integer training labels.
        num_classes: Number of classes.

    Returns:
        `(weights, ratio)`: a dict `class index -> weight` or None, and the
        largest/smallest class count ratio.

    Raises:
        ValueError: On another mode.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(
            f"class_weight must be one of {list(CLASS_WEIGHT_MODES)}. "
            f"Received: class_weight={mode!r}"
        )
    ratio = class_imbalance(labels, num_classes)
    wanted = mode == "balanced" or (mode == "auto" and ratio > IMBALANCE_RATIO)
    if not wanted or not np.isfinite(ratio):
        return None, ratio
    return resolve_class_weight("balanced", labels, num_classes), ratio


def resolve_class_weight(
    class_weight: dict[int, float] | str | None, labels: np.ndarray, num_classes: int
) -> dict[int, float] | None:
    """Checks a `class_weight` argument and turns `"balanced"` into a dict.

    Args:
        class_weight: None, `"balanced"` or a dict `class index -> weight`.
        labels: Integer training labels (for `"balanced"`).
        num_classes: Number of classes of the model.

    Returns:
        None, or a dict with one float weight per class index.

    Raises:
        ValueError: On another string, missing or unknown classes, or a
            negative or non-finite weight.
    """
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(
                "class_weight must be None, 'balanced' or a dict {class index: weight}. "
                f"Received: class_weight={class_weight!r}"
            )
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
        if np.any(counts == 0):
            raise ValueError(
                "class_weight='balanced' needs at least one training example of every class; "
                f"pass a dict instead. Received: class counts={counts.tolist()}"
            )
        return {
            index: float(len(labels) / (num_classes * count)) for index, count in enumerate(counts)
        }
    if not isinstance(class_weight, dict):
        raise ValueError(
            "class_weight must be None, 'balanced' or a dict {class index: weight}. "
            f"Received: class_weight={class_weight!r}"
        )
    weights = {int(key): float(value) for key, value in class_weight.items()}
    if sorted(weights) != list(range(num_classes)):
        raise ValueError(
            f"class_weight must have one entry per class index 0..{num_classes - 1}. "
            f"Received: class_weight={class_weight!r}"
        )
    if any(not np.isfinite(value) or value < 0 for value in weights.values()):
        raise ValueError(
            "class_weight values must be finite and non-negative. "
            f"Received: class_weight={class_weight!r}"
        )
    return weights
