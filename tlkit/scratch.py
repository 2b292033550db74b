"""A small CNN trained from scratch: the baseline transfer learning must beat."""

from __future__ import annotations

import time
from collections.abc import Sequence

import keras
import numpy as np

from tlkit.training import predict_split


class TimeBudget(keras.callbacks.Callback):
    """Stops training once a wall-time budget is spent (checked after each batch).

    Keras has no time-limit callback; this one is a few lines.

    Args:
        seconds: The budget in seconds.
    """

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.started = None

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() - self.started > self.seconds:
            self.model.stop_training = True


def build_scratch_cnn(
    num_classes: int,
    image_size: int = 96,
    seed: int = 0,
    filters: Sequence[int] = (32, 64, 128, 256),
    batch_norm_momentum: float = 0.99,
    flip: str | None = "horizontal",
) -> keras.Model:
    """A small VGG-style CNN with no pretrained weights, compiled.

    Args:
        num_classes: Number of classes.
        image_size: Square input size. Defaults to 96.
        seed: Seed of the augmentation. Defaults to 0.
        filters: Filters of each conv-BatchNorm-ReLU-pool stage; halving them
            all makes the model about 4x smaller (e.g. `(16, 32, 64, 128)`,
            about 99k parameters for 5 classes, as a distillation student).
            Defaults to `(32, 64, 128, 256)`.
        batch_norm_momentum: Momentum of the BatchNorm moving statistics,
            which `predict` uses. With Keras' 0.99 they need several hundred
            steps to catch up with the training statistics; a short run
            (a few hundred steps, as on a CPU with few labels) then predicts
            nearly one class for every image. 0.9 catches up within tens of
            steps. Defaults to 0.99 (the Keras default).
        flip: The `keras.layers.RandomFlip` mode of the built-in augmentation,
            or None for no flips (traffic signs, text: a flip changes the
            class). Defaults to `"horizontal"`.

    Returns:
        A compiled `keras.Model` taking raw 0..255 RGB images of any size.

    Raises:
        ValueError: If `filters` is empty or holds a non-positive int, or
            `batch_norm_momentum` is not in [0, 1).
    """
    filters = tuple(filters)
    if not filters or any(
        isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1 for f in filters
    ):
        raise ValueError(
            f"filters must be a non-empty sequence of positive ints, e.g. (16, 32, 64, 128). "
            f"Received: filters={filters!r}"
        )
    if (
        isinstance(batch_norm_momentum, bool)
        or not isinstance(batch_norm_momentum, (int, float))
        or not (0.0 <= batch_norm_momentum < 1.0)
    ):
        raise ValueError(
            "batch_norm_momentum must be a number in [0, 1), e.g. 0.9 for a short run. "
            f"Received: batch_norm_momentum={batch_norm_momentum!r}"
        )
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = keras.layers.Resizing(image_size, image_size, name="resize")(inputs)
    if flip is not None:
        x = keras.layers.RandomFlip(flip, seed=seed)(x)
    x = keras.layers.Rescaling(1.0 / 255)(x)
    for width in filters:
        x = keras.layers.Conv2D(int(width), 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=batch_norm_momentum)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="scratch_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def compare_with_scratch(
    dataset,
    transfer_metrics: dict,
    seconds: float,
    image_size: int = 96,
    seed: int = 42,
    batch_size: int = 32,
    log=print,
) -> dict:
    """Trains `build_scratch_cnn` for the same wall time and prints both results.

    Args:
        dataset: The `ImageDataset` the transfer model was trained on.
        transfer_metrics: The transfer run's metrics (needs "accuracy").
        seconds: Wall-time budget, normally the transfer run's total time.
        image_size: The scratch CNN's input size. Defaults to 96.
        seed: Seed. Defaults to 42.
        batch_size: Batch size. Defaults to 32.
        log: Where to print. Defaults to `print`.

    Returns:
        {"scratch_accuracy", "transfer_accuracy", "seconds", "scratch_epochs"}.
    """
    keras.utils.set_random_seed(seed)
    model = build_scratch_cnn(dataset.num_classes, image_size, seed)
    train = dataset.train.to_dataset(image_size, batch_size=batch_size, shuffle=True, seed=seed)
    budget = TimeBudget(seconds)
    history = model.fit(train, epochs=1000, callbacks=[budget], verbose=0, shuffle=False)
    split = dataset.test if dataset.test is not None else dataset.validation
    probabilities, labels = predict_split(model, split, image_size)
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == labels))
    result = {
        "scratch_accuracy": accuracy,
        "transfer_accuracy": float(transfer_metrics["accuracy"]),
        "seconds": float(seconds),
        "scratch_epochs": len(history.history.get("loss", [])),
    }
    log(
        f"Same wall time ({seconds:.0f} s) on {split.name}: "
        f"transfer {result['transfer_accuracy']:.3f} "
        f"vs. small CNN from scratch {accuracy:.3f} ({result['scratch_epochs']} epochs)."
    )
    return result
