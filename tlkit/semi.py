"""Semi-supervised transfer on cached features: pseudo-labelling and FixMatch.

With a few labelled photos and many unlabelled ones, the unlabelled photos can
still teach the head where the classes lie. Both methods here work on the
feature cache (`tlkit.extract_features`), so the frozen base runs once and
every round of training takes seconds on a CPU:

- `pseudo_label`: self-training (Lee 2013, "Pseudo-Label"). Train the head on
  the labels, label the unlabelled examples it is confident about, retrain on
  both, repeat.
- `fixmatch`: consistency training (Sohn et al. 2020, "FixMatch",
  https://arxiv.org/abs/2001.07685). The head's confident prediction on a
  weak view of an unlabelled image becomes the target for a strongly
  augmented view of the same image. Here the weak view is the plain image and
  the strong views are precomputed augmented views from
  `extract_features(..., views=K, augmentation=strong_augmentation())`.

Example:
    >>> train = tlkit.extract_features(base, flowers.train, views=3,
    ...                                augmentation=strong_augmentation(seed=0))
    >>> labelled, unlabelled = split_labelled(train, labels_per_class=10, seed=0)
    >>> head = tlkit.build_head(train.features.shape[1], 5)
    >>> head, report = pseudo_label(head, labelled.first_view(), unlabelled)
    >>> print(report)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.augment import build_augmentation
from tlkit.features import FeatureSet, select_images
from tlkit.heads import train_head

# ---------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------


def strong_augmentation(seed: int | None = None) -> keras.Sequential:
    """The strong augmentation for FixMatch's strong views: `"natural"`, turned up.

    FixMatch uses RandAugment on images; this is the strongest pipeline the
    `tlkit.augment` layers make without distorting a photo beyond recognition:
    flips, up to +/-54 degrees of rotation, 25 % zoom and shift, and large
    contrast and brightness changes.

    Args:
        seed: Seed of the pipeline. Defaults to None.

    Returns:
        A `keras.Sequential` from `tlkit.augment.build_augmentation`.

    Example:
        >>> features = extract_features(base, split, views=3,
        ...                             augmentation=strong_augmentation(seed=0))
    """
    return build_augmentation(
        "natural",
        seed=seed,
        rotation=0.15,
        zoom=0.25,
        translation=0.25,
        contrast=0.5,
        brightness=0.4,
    )


def choose_labelled(labels: Any, labels_per_class: int, seed: int = 0) -> np.ndarray:
    """Seeded positions of `labels_per_class` examples of every class.

    The draw depends only on the labels and the seed, so the same images are
    chosen for cached features, for image arrays and for every method compared.

    Args:
        labels: Integer labels of all the images (one per image).
        labels_per_class: Images per class to choose.
        seed: Seed of the draw. Defaults to 0.

    Returns:
        Sorted int64 positions, `labels_per_class * num_classes` of them.

    Raises:
        ValueError: If `labels_per_class` is not a positive int or a class
            has no more images than that (some must stay unlabelled).

    Example:
        >>> choose_labelled([0, 0, 0, 1, 1, 1], 1, seed=0).tolist()
        [1, 5]
    """
    if (
        isinstance(labels_per_class, bool)
        or not isinstance(labels_per_class, (int, np.integer))
        or labels_per_class < 1
    ):
        raise ValueError(
            "labels_per_class must be a positive int, e.g. 10. "
            f"Received: labels_per_class={labels_per_class!r}"
        )
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    counts = np.bincount(labels)
    if counts.min() <= labels_per_class:
        raise ValueError(
            f"Every class needs more than {labels_per_class} images to leave some unlabelled; "
            f"the smallest has {int(counts.min())}. Received: labels_per_class={labels_per_class}"
        )
    generator = np.random.default_rng(int(seed))
    chosen = [
        generator.choice(np.flatnonzero(labels == index), labels_per_class, replace=False)
        for index in range(len(counts))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_labelled(
    features: FeatureSet, labels_per_class: int, seed: int = 0
) -> tuple[FeatureSet, FeatureSet]:
    """Keeps the labels of a few images per class and treats the rest as unlabelled.

    The standard semi-supervised benchmark: the labels of the "unlabelled"
    images stay in the returned set only to measure how good pseudo-labels
    are; the methods here never train on them. The images are chosen by
    `choose_labelled(labels of view 0, labels_per_class, seed)`.

    Args:
        features: Features of a labelled split, one or more views.
        labels_per_class: Images per class that keep their label.
        seed: Seed of the draw. Defaults to 0.

    Returns:
        `(labelled, unlabelled)`, two `FeatureSet`s with all views of their images.

    Raises:
        ValueError: If `labels_per_class` is not a positive int or a class
            has no more images than that.

    Example:
        >>> labelled, unlabelled = split_labelled(train_features, 10, seed=0)
    """
    plain = features.first_view().labels
    chosen = choose_labelled(plain, labels_per_class, seed)
    rest = np.setdiff1d(np.arange(len(plain)), chosen)
    return select_images(features, chosen), select_images(features, rest)


def evaluate_head(head: keras.Model, features: FeatureSet, batch_size: int = 256) -> float:
    """Accuracy of a head on a `FeatureSet` (all its rows).

    Args:
        head: A head from `tlkit.build_head`.
        features: Features with true labels.
        batch_size: Batch size. Defaults to 256.

    Returns:
        The accuracy, a float in [0, 1].
    """
    probabilities = head.predict(features.features, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=1) == features.labels))


# ---------------------------------------------------------------------------
# Pseudo-labelling (self-training)
# ---------------------------------------------------------------------------


@dataclass
class SelfTrainingReport:
    """What each round of `pseudo_label` did.

    Attributes:
        threshold: The confidence threshold.
        rounds: One dict per round: `round` (0 = labels only), `pseudo_labels`
            (images added), `indices` (their positions among the unlabelled
            images), `pseudo_label_accuracy` (share of them labelled
            correctly, None when the true labels are unknown), `per_class`
            (pseudo-labels per class) and `validation_accuracy` (None without
            validation features).
    """

    threshold: float
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'round':>5}  {'pseudo-labels':>13}  {'their accuracy':>14}  {'validation':>10}"]
        for entry in self.rounds:
            accuracy = entry["pseudo_label_accuracy"]
            validation = entry["validation_accuracy"]
            lines.append(
                f"{entry['round']:>5}  {entry['pseudo_labels']:>13}  "
                f"{'-' if accuracy is None else f'{accuracy:.1%}':>14}  "
                f"{'-' if validation is None else f'{validation:.1%}':>10}"
            )
        return "\n".join(lines)


def select_confident(
    head: keras.Model, features: FeatureSet, threshold: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """The rows a head is confident about, and the classes it gives them.

    Args:
        head: A trained head.
        features: Features to label (every row is scored).
        threshold: Minimum top-class probability, in (0, 1]. Defaults to 0.9.

    Returns:
        `(indices, labels)`: int64 positions of the rows whose top probability
        is at least `threshold`, and their int32 predicted classes.

    Raises:
        ValueError: On a threshold outside (0, 1].

    Example:
        >>> indices, labels = select_confident(head, unlabelled.first_view(), 0.9)
    """
    _check_threshold(threshold)
    probabilities = head.predict(features.features, batch_size=256, verbose=0)
    indices = np.flatnonzero(probabilities.max(axis=1) >= threshold).astype(np.int64)
    return indices, probabilities.argmax(axis=1).astype(np.int32)[indices]


def pseudo_label(
    head: keras.Model,
    labelled: FeatureSet,
    unlabelled: FeatureSet,
    threshold: float = 0.9,
    rounds: int = 3,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    validation: FeatureSet | None = None,
    true_labels_known: bool = True,
    balance: bool = True,
    seed: int = 0,
) -> tuple[keras.Model, SelfTrainingReport]:
    """Self-training on cached features: labels, then confident pseudo-labels.

    Round 0 trains the head on the labelled features. Each later round
    predicts the plain view (view 0) of every unlabelled image, keeps the
    images whose top probability is at least `threshold`, gives them their
    predicted class as label (all their views, if the unlabelled set has
    augmented views) and retrains the head from its initial weights on labels
    plus pseudo-labels. Restarting from the initial weights keeps early
    mistakes from compounding through training momentum; the new pseudo-labels
    are chosen afresh every round, so a wrong one can be dropped later.

    Args:
        head: A head from `tlkit.build_head`; trained in place.
        labelled: Labelled training features.
        unlabelled: Features of the unlabelled images. Their labels are used
            only to report pseudo-label accuracy (see `true_labels_known`).
        threshold: Minimum top-class probability for a pseudo-label, in
            (0, 1]. Defaults to 0.9.
        rounds: Pseudo-labelling rounds after round 0, at least 1. Defaults to 3.
        epochs: Epochs per round. Defaults to 30.
        batch_size: Batch size. Defaults to 64.
        learning_rate: Adam learning rate. Defaults to 1e-3.
        validation: Plain validation features to score each round, or None.
            Defaults to None.
        true_labels_known: Whether `unlabelled.labels` are the true labels (a
            benchmark that hides them). False when they are placeholders.
            Defaults to True.
        balance: Keep the same number of pseudo-labels for every class that
            has any: the most confident ones, as many as the class with the
            fewest (but at least one) confident images has. Without it the head's favourite classes
            flood the training set and the head drifts towards them.
            Defaults to True.
        seed: Shuffle seed. Defaults to 0.

    Returns:
        `(head, report)`: the trained head and a `SelfTrainingReport`.

    Raises:
        ValueError: On a threshold outside (0, 1], rounds < 1, empty sets, or
            feature widths that do not match the head.

    Example:
        >>> head = tlkit.build_head(1280, 5)
        >>> head, report = pseudo_label(head, labelled, unlabelled, threshold=0.9)
        >>> [entry["pseudo_labels"] for entry in report.rounds]
        [0, 812, 1024, 1080]
    """
    _check_threshold(threshold)
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, e.g. 3. Received: rounds={rounds!r}")
    _check_sets(head, labelled=labelled, unlabelled=unlabelled)

    initial = head.get_weights()
    plain = unlabelled.first_view()
    count = len(plain)
    report = SelfTrainingReport(float(threshold))
    training = labelled
    selected = np.array([], dtype=np.int64)
    predicted = np.array([], dtype=np.int32)
    for round_index in range(rounds + 1):
        if round_index > 0:
            selected, predicted = select_confident(head, plain, threshold)
            if balance:
                selected, predicted = _balance(head, plain, selected, predicted)
            chosen = select_images(unlabelled, selected)
            pseudo = FeatureSet(
                chosen.features, np.tile(predicted, unlabelled.views), unlabelled.views
            )
            training = _concatenate(labelled, pseudo)
            head.set_weights(initial)
        train_head(
            head,
            training,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed + round_index,
        )
        report.rounds.append(
            {
                "round": round_index,
                "pseudo_labels": int(len(selected)),
                "pseudo_label_accuracy": (
                    float(np.mean(predicted == plain.labels[selected]))
                    if true_labels_known and len(selected)
                    else None
                ),
                "indices": selected,
                "per_class": np.bincount(predicted, minlength=int(head.output_shape[-1])).tolist(),
                "share_of_unlabelled": float(len(selected) / count),
                "validation_accuracy": evaluate_head(head, validation) if validation else None,
            }
        )
    return head, report


# ---------------------------------------------------------------------------
# FixMatch
# ---------------------------------------------------------------------------


def fixmatch_targets(probabilities: Any, threshold: float) -> tuple[tf.Tensor, tf.Tensor]:
    """FixMatch's pseudo-labels and confidence mask for weak-view predictions.

    Args:
        probabilities: Class probabilities of the weak views, shape
            `(batch, num_classes)`.
        threshold: Minimum top-class probability `tau`, in (0, 1].

    Returns:
        `(pseudo_labels, mask)`: int32 arg-max classes and a float32 mask that
        is 1.0 where the top probability is at least `threshold`.

    Example:
        >>> labels, mask = fixmatch_targets([[0.97, 0.03], [0.6, 0.4]], 0.95)
        >>> labels.numpy().tolist(), mask.numpy().tolist()
        ([0, 0], [1.0, 0.0])
    """
    probabilities = tf.convert_to_tensor(probabilities, dtype=tf.float32)
    pseudo_labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    mask = tf.cast(tf.reduce_max(probabilities, axis=-1) >= threshold, tf.float32)
    return pseudo_labels, mask


class FixMatchTrainer(keras.Model):
    """Trains a head with FixMatch's loss on labelled and unlabelled feature batches.

    The loss of a step is

        CE(head(labelled), labels)
        + unlabelled_weight * mean(mask * CE(head(strong), argmax(head(weak))))

    where `mask` is 1 where `max head(weak) >= threshold`. The weak-view
    prediction is made in inference mode and is not differentiated through
    (a fixed target, as in the paper). `call` is the head, so `evaluate` and
    `predict` behave as the head does.

    Each training element is a dict with `"labelled"` (features), `"labels"`,
    `"weak"`, `"strong"` and optionally `"true_labels"` (the hidden labels of
    the unlabelled batch, used only for the `pseudo_label_accuracy` metric).
    `fixmatch()` builds that dataset from two `FeatureSet`s.

    Args:
        head: The head to train (its weights are shared, not copied).
        threshold: Confidence threshold `tau`. Defaults to 0.95.
        unlabelled_weight: Weight `lambda_u` of the unlabelled loss. Defaults to 1.0.
    """

    def __init__(
        self, head: keras.Model, threshold: float = 0.95, unlabelled_weight: float = 1.0, **kwargs
    ):
        super().__init__(**kwargs)
        self.head = head
        self.threshold = float(threshold)
        self.unlabelled_weight = float(unlabelled_weight)
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.supervised_tracker = keras.metrics.Mean(name="supervised_loss")
        self.unlabelled_tracker = keras.metrics.Mean(name="unlabelled_loss")
        self.mask_tracker = keras.metrics.Mean(name="mask_rate")
        self.pseudo_accuracy = keras.metrics.Mean(name="pseudo_label_accuracy")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, inputs, training=False):
        return self.head(inputs, training=training)

    def train_step(self, data):
        if isinstance(data, tuple):  # `train_on_batch(batch)` packs it as (batch,).
            data = data[0]
        weak_probabilities = self.head(data["weak"], training=False)
        pseudo_labels, mask = fixmatch_targets(tf.stop_gradient(weak_probabilities), self.threshold)
        with tf.GradientTape() as tape:
            labelled_probabilities = self.head(data["labelled"], training=True)
            strong_probabilities = self.head(data["strong"], training=True)
            supervised = tf.reduce_mean(self.cross_entropy(data["labels"], labelled_probabilities))
            unlabelled = tf.reduce_mean(
                mask * self.cross_entropy(pseudo_labels, strong_probabilities)
            )
            loss = supervised + self.unlabelled_weight * unlabelled
        variables = self.head.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)

        self.loss_tracker.update_state(loss)
        self.supervised_tracker.update_state(supervised)
        self.unlabelled_tracker.update_state(unlabelled)
        self.mask_tracker.update_state(tf.reduce_mean(mask))
        self.accuracy.update_state(data["labels"], labelled_probabilities)
        if "true_labels" in data:
            correct = tf.cast(
                tf.equal(pseudo_labels, tf.cast(data["true_labels"], tf.int32)), tf.float32
            )
            # Accuracy of the pseudo-labels that pass the mask (weighted by it).
            self.pseudo_accuracy.update_state(correct, sample_weight=mask)
        return {metric.name: metric.result() for metric in self.metrics}

    def test_step(self, data):
        features, labels = data[0], data[1]
        probabilities = self.head(features, training=False)
        self.loss_tracker.update_state(tf.reduce_mean(self.cross_entropy(labels, probabilities)))
        self.accuracy.update_state(labels, probabilities)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.supervised_tracker,
            self.unlabelled_tracker,
            self.mask_tracker,
            self.pseudo_accuracy,
            self.accuracy,
        ]


def fixmatch(
    head: keras.Model,
    labelled: FeatureSet,
    unlabelled: FeatureSet,
    threshold: float = 0.95,
    unlabelled_weight: float = 1.0,
    epochs: int = 30,
    batch_size: int = 32,
    unlabelled_ratio: int = 4,
    learning_rate: float = 1e-3,
    validation: FeatureSet | None = None,
    true_labels_known: bool = True,
    seed: int = 0,
    verbose: int | str = 0,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Trains a head with FixMatch on cached features (plain = weak, augmented = strong).

    Every step draws `batch_size` labelled rows (the labelled set repeats) and
    `unlabelled_ratio * batch_size` unlabelled (weak, strong) pairs: the plain
    view of an image and one of its augmented views. One epoch is one pass
    over all such pairs.

    Args:
        head: A head from `tlkit.build_head`; trained in place.
        labelled: Labelled features (any number of views; every row counts).
        unlabelled: Unlabelled features with at least 2 views: view 0 is the
            weak view, views 1.. the strong ones (see `strong_augmentation`).
        threshold: Confidence threshold `tau` in (0, 1]. Defaults to 0.95, as
            in the paper.
        unlabelled_weight: `lambda_u`, non-negative. Defaults to 1.0.
        epochs: Epochs. Defaults to 30.
        batch_size: Labelled rows per step. Defaults to 32.
        unlabelled_ratio: `mu`, unlabelled pairs per labelled row. Defaults to 4.
        learning_rate: Adam learning rate. Defaults to 1e-3.
        validation: Plain validation features, or None. Defaults to None.
        true_labels_known: Whether `unlabelled.labels` are true labels, to
            report `pseudo_label_accuracy`. Defaults to True.
        seed: Shuffle seed. Defaults to 0.
        verbose: Keras verbosity. Defaults to 0.

    Returns:
        `(head, history)`: the trained head and the Keras history dict with
        `loss`, `supervised_loss`, `unlabelled_loss`, `mask_rate` (share of
        unlabelled pairs above the threshold), `pseudo_label_accuracy`,
        `accuracy` and, with validation, `val_loss` and `val_accuracy`.

    Raises:
        ValueError: On a bad threshold or weight, an unlabelled set with one
            view, empty sets or feature widths that do not match the head.

    Example:
        >>> head, history = fixmatch(tlkit.build_head(1280, 5), labelled.first_view(), unlabelled)
        >>> history["mask_rate"][-1]
        0.83
    """
    _check_threshold(threshold)
    if not isinstance(unlabelled_weight, (int, float)) or not unlabelled_weight >= 0:
        raise ValueError(
            f"unlabelled_weight must be a non-negative number, e.g. 1.0. "
            f"Received: unlabelled_weight={unlabelled_weight!r}"
        )
    if unlabelled.views < 2:
        raise ValueError(
            "FixMatch needs strong views of the unlabelled images: extract them with "
            "`extract_features(base, split, views=3, augmentation=strong_augmentation())`. "
            f"Received: unlabelled.views={unlabelled.views}"
        )
    for name, value in (
        ("batch_size", batch_size),
        ("unlabelled_ratio", unlabelled_ratio),
        ("epochs", epochs),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}")
    _check_sets(head, labelled=labelled, unlabelled=unlabelled)

    count = len(unlabelled) // unlabelled.views
    weak_rows = np.tile(np.arange(count), unlabelled.views - 1)
    strong_rows = np.arange(count, len(unlabelled))
    unlabelled_batch = batch_size * unlabelled_ratio
    steps = int(np.ceil(len(strong_rows) / unlabelled_batch))

    labelled_data = (
        tf.data.Dataset.from_tensor_slices((labelled.features, labelled.labels))
        .shuffle(len(labelled), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size)
    )
    pairs = {
        "weak": unlabelled.features[weak_rows],
        "strong": unlabelled.features[strong_rows],
    }
    if true_labels_known:
        pairs["true_labels"] = unlabelled.labels[strong_rows]
    unlabelled_data = (
        tf.data.Dataset.from_tensor_slices(pairs)
        .shuffle(len(strong_rows), seed=seed + 1, reshuffle_each_iteration=True)
        .repeat()
        .batch(unlabelled_batch)
    )

    def merge(labelled_batch, pair_batch):
        return {"labelled": labelled_batch[0], "labels": labelled_batch[1], **pair_batch}

    data = tf.data.Dataset.zip(labelled_data, unlabelled_data).map(merge).prefetch(tf.data.AUTOTUNE)

    trainer = FixMatchTrainer(head, threshold=threshold, unlabelled_weight=unlabelled_weight)
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
    validation_data = validation.to_dataset(256) if validation else None
    history = trainer.fit(
        data,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=validation_data,
        shuffle=False,  # `data` is shuffled in its tf.data pipeline; Keras would warn.
        verbose=verbose,
    )
    return head, history.history


# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


def _check_threshold(threshold) -> None:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0.0 < threshold <= 1.0
    ):
        raise ValueError(
            "threshold is a probability the top class must reach, in (0, 1], e.g. 0.9. "
            f"Received: threshold={threshold!r}"
        )


def _check_sets(head: keras.Model, **sets: FeatureSet) -> None:
    width = head.input_shape[-1]
    num_classes = int(head.output_shape[-1])
    for name, features in sets.items():
        if not isinstance(features, FeatureSet):
            raise ValueError(
                f"{name} must be a tlkit.FeatureSet (from `tlkit.extract_features`). "
                f"Received: {name}={type(features).__name__}"
            )
        if len(features) == 0:
            raise ValueError(
                f"{name} is empty; it needs at least one example. Received: len({name})=0"
            )
        if width is not None and features.features.shape[1] != width:
            raise ValueError(
                f"{name} has features of width {features.features.shape[1]} "
                f"but the head takes {width}; "
                "build the head with `tlkit.build_head(features.shape[1], num_classes)`. "
                f"Received: {name}.features.shape={features.features.shape}"
            )
        if name == "labelled" and features.labels.max() >= num_classes:
            raise ValueError(
                f"labelled has class index {int(features.labels.max())} but the head has "
                f"{num_classes} outputs. Received: max label={int(features.labels.max())}"
            )


def _balance(head, plain, selected, predicted):
    """The most confident pseudo-labels, the same number for every class."""
    num_classes = int(head.output_shape[-1])
    counts = np.bincount(predicted, minlength=num_classes)
    if not counts.any():
        return selected, predicted
    keep = int(counts[counts > 0].min())
    confidence = head.predict(plain.features[selected], batch_size=256, verbose=0).max(axis=1)
    chosen = np.concatenate(
        [
            np.flatnonzero(predicted == index)[
                np.argsort(-confidence[predicted == index], kind="stable")[:keep]
            ]
            for index in range(num_classes)
        ]
    )
    chosen = np.sort(chosen)
    return selected[chosen], predicted[chosen]


def _concatenate(first: FeatureSet, second: FeatureSet) -> FeatureSet:
    return FeatureSet(
        np.concatenate([first.features, second.features]),
        np.concatenate([first.labels, second.labels]).astype(np.int32),
        1,
    )
