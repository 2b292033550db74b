"""Classifiers on a frozen pretrained base, and unfreezing without the traps.

The traps these helpers avoid (keras.io "Transfer learning & fine-tuning"):
- the base is called with `training=False`, so its BatchNorm layers stay in
  inference mode even after unfreezing (updating their statistics on a small
  dataset wrecks the pretrained features);
- preprocessing lives inside the model, so inputs are always raw 0..255 RGB;
- changing `trainable` only takes effect after `compile`, so `unfreeze`
  recompiles, with a lower learning rate.

The head is built and trained in `tlkit.heads`; the fine-tuning recipes that
use `unfreeze` are in `tlkit.fine_tuning`.
"""

from __future__ import annotations

import os

import keras

from tlkit.augment import build_augmentation
from tlkit.backbones import build_backbone, get_backbone
from tlkit.backbones.preprocessing import ImagePreprocessing
from tlkit.heads import build_head, check_num_classes, compile_classifier
from tlkit.input_config import resolve_input_config
from tlkit.metadata import ModelMetadata, find_metadata

# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="tlkit")
class ClassNames(ModelMetadata):
    """An identity layer that carries the class names inside a saved classifier.

    Args:
        class_names: The class names, in label order.
        decision_threshold: For two classes: the probability of class 1 from
            which class 1 is predicted (chosen on validation by
            `tlkit.train_run`), or None for the arg-max. Defaults to None.
        **kwargs: Passed to `keras.layers.Layer`.
    """

    def __init__(self, class_names, decision_threshold: float | None = None, **kwargs):
        super().__init__(class_names, **kwargs)
        self.decision_threshold = None if decision_threshold is None else float(decision_threshold)

    def get_config(self):
        config = super().get_config()
        if self.decision_threshold is not None:  # Files without one stay as before.
            config["decision_threshold"] = self.decision_threshold
        return config


def get_class_names(model: keras.Model) -> list[str] | None:
    """The class names stored in a tlkit classifier or detector, or None if it has none."""
    metadata = find_metadata(model)
    return list(metadata.class_names) if metadata is not None else None


def get_decision_threshold(model: keras.Model) -> float | None:
    """The decision threshold stored in a two-class tlkit classifier, or None.

    Returns:
        The probability of class 1 from which class 1 is predicted, or None
        when the model has none (predict the arg-max).
    """
    metadata = find_metadata(model)
    return getattr(metadata, "decision_threshold", None)


def set_decision_threshold(model: keras.Model, threshold: float | None) -> None:
    """Stores a decision threshold in a two-class classifier (saved with the model).

    Args:
        model: A classifier built with `class_names` (it has a `ClassNames` layer).
        threshold: The probability of class 1 from which class 1 is
            predicted, in [0, 1], or None for the arg-max.

    Raises:
        ValueError: If the model has no `ClassNames` layer or not two classes,
            or the threshold is outside [0, 1].
    """
    metadata = find_metadata(model)
    if not isinstance(metadata, ClassNames) or len(metadata.class_names) != 2:
        raise ValueError(
            "A decision threshold needs a two-class classifier built with class_names. "
            f"Received: model={model.name}"
        )
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]. Received: threshold={threshold!r}")
    metadata.decision_threshold = None if threshold is None else float(threshold)


def build_feature_extractor(
    backbone: str = "efficientnet_lite0",
    image_size: int | None = None,
    weights: str | os.PathLike | None = "imagenet",
) -> keras.Model:
    """A frozen pretrained base that maps raw 0..255 RGB images to feature vectors.

    Args:
        backbone: A registry name (see `tlkit.backbones.list_backbones()`).
            Defaults to `"efficientnet_lite0"`.
        image_size: Square input size. Defaults to the backbone's own.
        weights: `"imagenet"`, None or a `.weights.h5` path. Defaults to
            `"imagenet"`.

    Returns:
        A non-trainable `keras.Model` of output shape (batch, feature_width).
    """
    image_size = resolve_input_config(image_size, backbone=backbone).image_size
    base = build_backbone(backbone, image_size=image_size, weights=weights)
    base.trainable = False
    return base


def build_classifier(
    backbone: str = "efficientnet_lite0",
    num_classes: int = 2,
    image_size: int | None = None,
    dropout_rate: float = 0.2,
    augmentation: str | keras.Layer | None = None,
    weights: str | os.PathLike | None = "imagenet",
    learning_rate: float = 1e-3,
    base: keras.Model | None = None,
    head: keras.Model | None = None,
    class_names: list[str] | None = None,
) -> keras.Model:
    """A frozen pretrained base with a new head, compiled and ready to fit.

    The model takes raw 0..255 RGB images of any size: it resizes them to
    `image_size`, augments them (training only), runs the base with
    `training=False` and classifies the pooled features.

    Args:
        backbone: A registry name. Defaults to `"efficientnet_lite0"`.
        num_classes: Number of classes. Defaults to 2.
        image_size: Square size the base sees. Defaults to the backbone's own.
        dropout_rate: Dropout before the classifier. Defaults to 0.2.
        augmentation: A `tlkit.augment` preset name, a Keras layer, or None.
            Active only in training; `tlkit.export` strips it. Defaults to None.
        weights: Base weights: `"imagenet"`, None or a path. Defaults to
            `"imagenet"`.
        learning_rate: Adam learning rate for the head. Defaults to 1e-3.
        base: An already built base to reuse (e.g. the one that filled a
            feature cache). Defaults to None (build it).
        head: An already trained head from `build_head` to reuse. Defaults to
            None (build a new one).
        class_names: Names of the classes, stored in the model (see
            `get_class_names`) so a saved model predicts labels by name.
            Defaults to None.

    Returns:
        A compiled `keras.Model` with integer-label sparse categorical loss.

    Raises:
        ValueError: On invalid arguments.

    Example:
        >>> model = build_classifier("mobilenet_v2", num_classes=5, image_size=160)
        >>> model.fit(train_dataset, validation_data=validation_dataset, epochs=5)
    """
    spec = get_backbone(backbone)
    check_num_classes(num_classes)
    image_size = resolve_input_config(image_size, backbone=backbone).image_size
    if base is None:
        base = build_feature_extractor(backbone, image_size, weights)
    base.trainable = False
    if head is None:
        head = build_head(spec.feature_width, num_classes, dropout_rate)
    elif head.output_shape[-1] != num_classes:
        raise ValueError(
            f"The head has {head.output_shape[-1]} outputs but num_classes={num_classes}."
        )

    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = keras.layers.Resizing(image_size, image_size, name="resize")(inputs)
    if augmentation is not None:
        if isinstance(augmentation, str):
            augmentation = build_augmentation(augmentation)
        x = augmentation(x)
    x = base(x, training=False)
    outputs = head(x)
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(
                f"Got {len(class_names)} class names for num_classes={num_classes}. "
                f"Received: class_names={list(class_names)[:10]}"
            )
        outputs = ClassNames(list(class_names), name="class_names")(outputs)
    model = keras.Model(inputs, outputs, name=f"{backbone}_classifier")
    compile_classifier(model, learning_rate=learning_rate)
    return model


# ---------------------------------------------------------------------------
# Finding the base, unfreezing and freezing
# ---------------------------------------------------------------------------


def find_base(model: keras.Model) -> keras.Model:
    """The nested pretrained base of a tlkit classifier.

    Raises:
        ValueError: If the model has no nested base with built-in preprocessing.
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model) and any(
            isinstance(inner, ImagePreprocessing) for inner in layer.layers
        ):
            return layer
    raise ValueError(
        "Could not find a tlkit backbone inside this model; build it with "
        f"`tlkit.build_classifier`. Received: model={model.name!r}"
    )


def block_names(base: keras.Model) -> list[str]:
    """The base's blocks in input-to-output order, as `unfreeze` counts them."""
    spec = get_backbone(base.name)
    names: list[str] = []
    for layer in _all_layers(base):
        block = spec.block_of(layer.name)
        if block and block not in names:
            names.append(block)
    return names


def unfreeze(
    model: keras.Model,
    blocks: int | str | list[str] = 2,
    learning_rate: float = 1e-5,
    recompile: bool = True,
) -> list[str]:
    """Makes the top blocks of the base trainable, keeping BatchNorm frozen.

    BatchNormalization layers stay non-trainable and the base keeps running
    with `training=False`, so their statistics are never updated on the new
    data. The model is recompiled (changing `trainable` has no effect until
    then) with a lower learning rate.

    Args:
        model: A classifier from `build_classifier`.
        blocks: How many blocks to unfreeze counted from the output, a block
            name (that block and all after it), or a list of block names.
            `"all"` unfreezes every block. Defaults to 2.
        learning_rate: Adam learning rate after unfreezing. Defaults to 1e-5.
        recompile: Whether to recompile. Defaults to True.

    Returns:
        The names of the unfrozen blocks.

    Raises:
        ValueError: On an unknown block name or a bad count.
    """
    base = find_base(model)
    names = block_names(base)
    if blocks == "all":
        chosen = names
    elif isinstance(blocks, int):
        if not 0 <= blocks <= len(names):
            raise ValueError(
                f"blocks must be between 0 and {len(names)} for {base.name}. "
                f"Received: blocks={blocks}"
            )
        chosen = names[len(names) - blocks :]
    elif isinstance(blocks, str):
        if blocks not in names:
            raise ValueError(f"Unknown block. Expected one of {names}. Received: blocks={blocks!r}")
        chosen = names[names.index(blocks) :]
    else:
        unknown = [b for b in blocks if b not in names]
        if unknown:
            raise ValueError(f"Unknown blocks. Expected names from {names}. Received: {unknown}")
        chosen = list(blocks)
    spec = get_backbone(base.name)
    base.trainable = True
    for layer in _all_layers(base):
        if isinstance(layer, keras.Model):
            continue
        trainable = spec.block_of(layer.name) in chosen
        if isinstance(layer, keras.layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable
    if recompile:
        compile_classifier(model, learning_rate=learning_rate)
    return chosen


def freeze(model: keras.Model, learning_rate: float = 1e-3) -> None:
    """Freezes the whole base again and recompiles."""
    find_base(model).trainable = False
    compile_classifier(model, learning_rate=learning_rate)


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
