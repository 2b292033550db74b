"""Fine-tuning: unfreeze the top blocks of the base and train them with the head.

One set of rules (BatchNorm frozen and in inference mode, a low learning
rate, `tlkit.models.unfreeze`'s choice of blocks), three data paths:
- `fine_tune`: the two-phase recipe on a `tf.data` pipeline of images;
- `fine_tune_split`: epoch by epoch on an image split, every epoch seeded
  from `(seed, epoch)` so a run can resume (`tlkit.train_run` uses it);
- `fine_tune_cached`: only the top blocks, trained on cached activations of
  the frozen blocks below (`split_at_block`, `build_upper_classifier`), which
  on a CPU is several times faster.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import keras

from tlkit._keras_compat import flatten_layers, reseed_layers
from tlkit.backbones import get_backbone
from tlkit.features import DTYPES, extract_features, select_images
from tlkit.heads import compile_classifier, fit_on_features, resolve_class_weight
from tlkit.models import block_names, build_classifier, freeze, unfreeze

# ---------------------------------------------------------------------------
# On images
# ---------------------------------------------------------------------------


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


def fine_tune_split(
    model: keras.Model,
    train_split,
    validation_split=None,
    *,
    image_size: int,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    first_epoch: int = 0,
    history: dict[str, list[float]] | None = None,
    on_epoch_end: Callable[[int, dict[str, list[float]]], None] | None = None,
    verbose: int | str = 0,
    class_weight: dict[int, float] | str | None = None,
) -> dict[str, list[float]]:
    """Fits an unfrozen classifier on a split epoch by epoch, reproducibly and resumably.

    Every epoch's shuffle order and random draws (augmentation, dropout)
    derive from `(seed, epoch)` alone, so a run resumed at `first_epoch` in a
    new process does exactly what the uninterrupted run did. `tlkit.train_run`
    fine-tunes with it and checkpoints in `on_epoch_end`.

    Args:
        model: A classifier, already unfrozen (`tlkit.models.unfreeze`) and
            compiled.
        train_split: The training `tlkit.data.ImageSplit`.
        validation_split: The validation split, or None. Defaults to None.
        image_size: Square size the images are resized to.
        epochs: The last epoch (exclusive), counted from 0.
        batch_size: Training batch size (validation uses 2x). Defaults to 32.
        seed: Seed of the shuffles and random draws. Defaults to 0.
        first_epoch: The first epoch to run, e.g. after a checkpoint.
            Defaults to 0.
        history: The history of the epochs before `first_epoch`, extended by
            the new ones (not changed in place). Defaults to None.
        on_epoch_end: Called after each epoch with the epoch index and the
            history so far. Defaults to None.
        verbose: Keras verbosity. Defaults to 0.
        class_weight: None, `"balanced"` or a dict `class index -> weight`,
            as in `tlkit.heads.train_head`. Defaults to None.

    Returns:
        The Keras history dict of all epochs (the given `history` first).
    """
    class_weight = resolve_class_weight(
        class_weight, train_split.labels, int(model.output_shape[-1])
    )
    validation_images = (
        validation_split.to_dataset(image_size, batch_size=batch_size * 2)
        if validation_split is not None
        else None
    )
    history = {key: list(values) for key, values in (history or {}).items()}
    for epoch in range(first_epoch, epochs):
        # Shuffle order and random draws depend on (seed, epoch) only, so a resumed
        # run repeats exactly what the uninterrupted one would have done.
        keras.utils.set_random_seed(seed + 1 + epoch)
        reseed_layers(model, seed * 1000 + epoch)
        train_images = train_split.to_dataset(
            image_size, batch_size=batch_size, shuffle=True, seed=seed + epoch
        )
        result = model.fit(
            train_images,
            validation_data=validation_images,
            initial_epoch=epoch,
            epochs=epoch + 1,
            verbose=verbose,
            shuffle=False,  # The dataset shuffles itself.
            class_weight=class_weight,
        )
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    return history


# ---------------------------------------------------------------------------
# On cached activations
# ---------------------------------------------------------------------------


def split_at_block(base: keras.Model, block: str) -> tuple[keras.Model, keras.Model]:
    """Cuts a backbone in two at the start of a block, for cached-activation fine-tuning.

    When only the top blocks are fine-tuned, everything below them is frozen
    and computes the same activations every epoch. `lower` maps raw images to
    the activations that enter `block`; compute them once (for a fixed number
    of augmented views) with `extract_features(lower, ...)`, then train
    `upper` and a head on them with `build_upper_classifier`. The two parts
    share their layers with `base`, so training `upper` fine-tunes `base`.

    Args:
        base: A tlkit backbone (`build_feature_extractor`) with a fixed input
            size, e.g. `build_feature_extractor("mobilenet_v2", 160)`.
        block: The first block of `upper`, one of
            `tlkit.models.block_names(base)` except `"stem"`, e.g. `"block15"`.

    Returns:
        `(lower, upper)`: `lower` takes raw 0..255 images and returns the
        feature map that enters `block`; `upper` maps that feature map to the
        pooled features. `upper(lower(x))` equals `base(x)`.

    Raises:
        ValueError: On an unknown block, `"stem"`, or a base whose input size
            is not fixed.

    Example:
        >>> lower, upper = split_at_block(base, "block15")
        >>> activations = extract_features(lower, train, views=4, augmentation="natural")
    """
    names = block_names(base)
    if block not in names[1:]:
        raise ValueError(
            f"block must name a block of {base.name} after the stem, one of {names[1:]}. "
            f"Received: block={block!r}"
        )
    if base.input_shape[1] is None:
        raise ValueError(
            "split_at_block needs a base with a fixed input size, e.g. "
            f"build_feature_extractor({base.name!r}, image_size=224). "
            f"Received: input_shape={base.input_shape}"
        )
    spec = get_backbone(base.name)
    first = next(layer for layer in base.layers if spec.block_of(layer.name) == block)
    cut = first.input
    lower = keras.Model(base.input, cut, name=f"{base.name}_below_{block}")
    upper = keras.Model(cut, base.output, name=f"{base.name}_from_{block}")
    return lower, upper


def build_upper_classifier(
    upper: keras.Model, head: keras.Model, learning_rate: float = 1e-5
) -> keras.Model:
    """The `upper` part of a split base with a head, unfrozen and compiled.

    Every layer of `upper` becomes trainable except BatchNormalization, and
    `upper` runs with `training=False`, the same rules as
    `tlkit.models.unfreeze`. The model takes the activations from the
    `lower` part (`split_at_block`).

    Args:
        upper: The `upper` model from `split_at_block`.
        head: A head from `tlkit.heads.build_head` (e.g. trained on features).
        learning_rate: Adam learning rate. Defaults to 1e-5.

    Returns:
        A compiled `keras.Model` from activations to class probabilities.
    """
    upper.trainable = True
    # Set every layer itself: a model cut from the middle of another does not
    # pass `trainable` on to the layers it shares.
    for layer in flatten_layers(upper, include_self=False):
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    inputs = keras.Input(shape=upper.input_shape[1:], name="activations")
    outputs = head(upper(inputs, training=False))
    model = keras.Model(inputs, outputs, name=f"{upper.name}_classifier")
    return compile_classifier(model, learning_rate=learning_rate)


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
    backend: str = "auto",
    cache_dtype: str = "float32",
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Fine-tunes the top blocks of a base on cached lower-block activations.

    With only the top blocks unfrozen, the frozen blocks below compute the
    same activations every epoch, and on a CPU they are nearly all the cost.
    This cuts `base` at `block` (`split_at_block`), computes
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
            as in `tlkit.heads.train_head`. Defaults to None.
        backend: What computes the lower activations, as in
            `extract_features`: `"auto"` (LiteRT on a CPU when the conversion
            pays off or is cached), `"litert"`, `"keras"` or `"xla"`. Every
            backend gives the same activations within float32 round-off, so
            it is not part of the cache key. Defaults to `"auto"`.
        cache_dtype: How the activations are stored, in memory and on disk:
            `"float32"` or `"float16"` (half the memory; the upper blocks
            still train in float32). Part of the cache key. Defaults to
            `"float32"`.

    Returns:
        `(classifier, history)`: the full classifier from raw 0..255 images
        (`build_classifier` with the fine-tuned `base`, `head` and the
        split's class names; its base is frozen again), and the Keras
        history dict of the fine-tuning.

    Raises:
        ValueError: If `head` does not fit the base's features or the
            split's classes, on an unknown `block`, a base without a fixed
            input size, non-positive `views` or `epochs`, or `indices` out
            of range, a bad `class_weight`, an unknown `backend` or
            `cache_dtype`, or float16 activations beyond its range.

    Example:
        >>> base = build_feature_extractor("mobilenet_v2", 160)
        >>> head = build_head(1280, flowers.num_classes)
        >>> train_head(head, extract_features(base, flowers.train))
        >>> model, history = fine_tune_cached(base, head, flowers.train, epochs=5)
    """
    if head.input_shape[-1] != base.output_shape[-1]:
        raise ValueError(
            f"The head takes {head.input_shape[-1]} features but {base.name} gives "
            f"{base.output_shape[-1]}; build it with "
            f"build_head({base.output_shape[-1]}, num_classes). "
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
    if cache_dtype not in DTYPES:
        raise ValueError(
            f"cache_dtype must be one of {list(DTYPES)}. Received: cache_dtype={cache_dtype!r}"
        )
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
            backend=backend,
            dtype=cache_dtype,
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
