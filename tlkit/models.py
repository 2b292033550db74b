"""Classifiers on a frozen pretrained base, and fine-tuning without the traps.

The traps these helpers avoid (keras.io "Transfer learning & fine-tuning"):
- the base is called with `training=False`, so its BatchNorm layers stay in
  inference mode even after unfreezing (updating their statistics on a small
  dataset wrecks the pretrained features);
- preprocessing lives inside the model, so inputs are always raw 0..255 RGB;
- changing `trainable` only takes effect after `compile`, so `unfreeze`
  recompiles, with a lower learning rate.
"""

from __future__ import annotations

import os

import keras

from tlkit.backbones import build_backbone, get_backbone
from tlkit.backbones.preprocessing import ImagePreprocessing

# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="tlkit")
class ClassNames(keras.layers.Layer):
    """An identity layer that carries the class names inside a saved model.

    Args:
        class_names: The class names, in label order.
    """

    def __init__(self, class_names: list[str], **kwargs):
        super().__init__(**kwargs)
        self.class_names = [str(name) for name in class_names]

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names}


def get_class_names(model: keras.Model) -> list[str] | None:
    """The class names stored in a tlkit classifier, or None if it has none."""
    for layer in model.layers:
        if isinstance(layer, ClassNames):
            return list(layer.class_names)
    return None


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
    _check_num_classes(num_classes)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1). Received: dropout_rate={dropout_rate}")
    inputs = keras.Input(shape=(feature_width,), name="features")
    x = keras.layers.Dropout(dropout_rate, name="dropout")(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


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
    spec = get_backbone(backbone)
    base = build_backbone(backbone, image_size=image_size or spec.image_size, weights=weights)
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
    _check_num_classes(num_classes)
    image_size = image_size or spec.image_size
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
            from tlkit.augment import build_augmentation

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


# ---------------------------------------------------------------------------
# Unfreezing and fine-tuning
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
                f"blocks must be between 0 and {len(names)} for {base.name}. Received: blocks={blocks}"
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


def fine_tune(
    model: keras.Model,
    train_data,
    validation_data=None,
    epochs: int = 5,
    freeze_epochs: int = 1,
    blocks: int | str | list[str] = 2,
    learning_rate: float = 1e-3,
    fine_tune_learning_rate: float = 1e-5,
    callbacks=None,
    verbose: int | str = "auto",
) -> dict[str, dict[str, list[float]]]:
    """The two-phase recipe: train the head on a frozen base, then unfreeze the top.

    Like fastai's `fine_tune(epochs, freeze_epochs=1)`.

    Args:
        model: A classifier from `build_classifier`.
        train_data: A `tf.data.Dataset` of (images, labels) batches.
        validation_data: Validation batches, or None. Defaults to None.
        epochs: Epochs with the top blocks unfrozen. Defaults to 5.
        freeze_epochs: Epochs with the base frozen first. Defaults to 1.
        blocks: What to unfreeze (see `unfreeze`). Defaults to 2.
        learning_rate: Learning rate of the frozen phase. Defaults to 1e-3.
        fine_tune_learning_rate: Learning rate after unfreezing. Defaults to 1e-5.
        callbacks: Keras callbacks for both phases. Defaults to None.
        verbose: Keras verbosity. Defaults to "auto".

    Returns:
        Histories by phase: {"head": {...}, "fine_tune": {...}}.
    """
    histories = {}
    if freeze_epochs:
        freeze(model, learning_rate)
        history = model.fit(
            train_data,
            validation_data=validation_data,
            epochs=freeze_epochs,
            callbacks=callbacks,
            verbose=verbose,
        )
        histories["head"] = history.history
    if epochs:
        unfreeze(model, blocks=blocks, learning_rate=fine_tune_learning_rate)
        history = model.fit(
            train_data,
            validation_data=validation_data,
            epochs=epochs,
            callbacks=callbacks,
            verbose=verbose,
        )
        histories["fine_tune"] = history.history
    return histories


def fine_tune_cached(
    base: keras.Model,
    head: keras.Model,
    train_split,
    validation_split=None,
    block: str | None = None,
    indices=None,
    views: int = 3,
    augmentation: str | keras.Layer | None = "natural",
    augmentation_seed: int = 0,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 1e-5,
    seed: int = 0,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    callbacks=None,
    verbose: int | str = 0,
    class_weight: dict[int, float] | str | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Fine-tunes the top blocks of a base on cached lower-block activations.

    With only the top blocks unfrozen, the frozen blocks below compute the
    same activations every epoch, and on a CPU they are nearly all the cost.
    This cuts `base` at `block` (`tlkit.features.split_at_block`), computes
    the activations entering `block` once for `views` views of every image
    (`extract_features`, cached on disk like features), then trains the top
    blocks and `head` on them (`build_upper_classifier`: BatchNorm stays
    frozen and in inference mode). The augmentation is therefore fixed to
    `views` draws per image instead of a fresh one every epoch.

    `base` and `head` are changed in place; build a fresh base
    (`build_feature_extractor`) for each independent run. The lower blocks do
    not change, so runs on fresh bases with the same `augmentation`,
    `augmentation_seed` and `views` reuse one cached extraction.

    Args:
        base: A tlkit backbone with a fixed input size
            (`build_feature_extractor(name, image_size)`).
        head: A head from `build_head`, ideally already trained on the
            base's features (fine-tuning with a random head wrecks the
            pretrained top blocks).
        train_split: The training `tlkit.data.ImageSplit`.
        validation_split: Validation split (one plain view), or None.
            Defaults to None.
        block: The first block to fine-tune, one of `block_names(base)`
            after the stem. Defaults to None: the top two blocks, as
            `unfreeze`'s default.
        indices: Positions of the images of `train_split` to train on. The
            activations of the whole split are computed (and cached) once,
            so runs on different subsets share one extraction. Defaults to
            None (all images).
        views: Views per image: view 0 is the plain image, the others are
            augmented. Defaults to 3.
        augmentation: A `tlkit.augment` preset name or a Keras layer for the
            extra views; may be None only when `views` is 1. Defaults to
            `"natural"`.
        augmentation_seed: Seed of the augmented views (part of the cache
            key). Defaults to 0.
        epochs: Passes over the cached activations. Defaults to 5.
        batch_size: Batch size. Defaults to 32.
        learning_rate: Adam learning rate of the top blocks and the head.
            Defaults to 1e-5.
        seed: Shuffle seed. Defaults to 0.
        cache: Where the activations are cached, as in `extract_features`.
            Defaults to True (the tlkit cache folder).
        progress: Show a progress bar while extracting. Defaults to True.
        callbacks: Keras callbacks. Defaults to None.
        verbose: Keras verbosity. Defaults to 0.
        class_weight: None, `"balanced"` or a dict `class index -> weight`,
            as in `tlkit.features.train_head`. Defaults to None.

    Returns:
        `(classifier, history)`: the full classifier from raw 0..255 images
        (`build_classifier` with the fine-tuned `base`, `head` and the
        split's class names; its base is frozen again), and the Keras
        history dict of the fine-tuning.

    Raises:
        ValueError: If `head` does not fit the base's features or the
            split's classes, on an unknown `block`, a base without a fixed
            input size, non-positive `views` or `epochs`, or `indices` out
            of range, or a bad `class_weight`.

    Example:
        >>> base = build_feature_extractor("mobilenet_v2", 160)
        >>> head = build_head(1280, flowers.num_classes)
        >>> train_head(head, extract_features(base, flowers.train))
        >>> model, history = fine_tune_cached(base, head, flowers.train, epochs=5)
    """
    from tlkit.features import (
        build_upper_classifier,
        extract_features,
        fit_on_features,
        resolve_class_weight,
        split_at_block,
    )
    from tlkit.semi import select_images

    if head.input_shape[-1] != base.output_shape[-1]:
        raise ValueError(
            f"The head takes {head.input_shape[-1]} features but {base.name} gives "
            f"{base.output_shape[-1]}; build it with build_head({base.output_shape[-1]}, num_classes). "
            f"Received: head.input_shape={head.input_shape}"
        )
    num_classes = int(head.output_shape[-1])
    if num_classes != train_split.num_classes:
        raise ValueError(
            f"The head has {num_classes} outputs but the split has {train_split.num_classes} "
            f"classes; build it with build_head(feature_width, {train_split.num_classes}). "
            f"Received: head.output_shape={head.output_shape}"
        )
    for name, value in (("views", views), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{name} must be a positive integer, e.g. 3. Received: {name}={value!r}"
            )
    resolve_class_weight(class_weight, train_split.labels, num_classes)  # Fail before extracting.
    if block is None:
        block = block_names(base)[-2]
    lower, upper = split_at_block(base, block)
    image_size = int(base.input_shape[1])

    def activations(split, count):
        return extract_features(
            lower,
            split,
            image_size,
            batch_size=64,
            views=count,
            augmentation=augmentation if count > 1 else None,
            seed=augmentation_seed,
            cache=cache,
            progress=progress,
        )

    train = activations(train_split, views)
    if indices is not None:
        train = select_images(train, indices)
    validation = activations(validation_split, 1) if validation_split is not None else None
    model = build_upper_classifier(upper, head, learning_rate=learning_rate)
    history = fit_on_features(
        model, train, validation, epochs, batch_size, seed, callbacks, verbose, class_weight
    )
    classifier = build_classifier(
        base.name,
        num_classes,
        image_size,
        base=base,
        head=head,
        class_names=train_split.class_names,
        learning_rate=learning_rate,
    )
    return classifier, history


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            "num_classes must be an integer of at least 2 (a classifier needs two classes). "
            f"Received: num_classes={num_classes!r}"
        )
