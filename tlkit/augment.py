"""Data augmentation: Keras preprocessing-layer pipelines, MixUp and CutMix.

Every pipeline works on raw RGB images with values in 0..255 (float32, shape
`(batch, height, width, 3)`), the same input the tlkit models take, and keeps
its outputs inside that range. `model.fit` runs the layers in training mode and
`model.predict` / `model.evaluate` with `training=False`, where they return their
input unchanged, so a pipeline can sit inside a model. Note that Keras
preprocessing layers default to `training=True` when called directly without a
`training` argument (`pipeline(images)` or `model(images)` augment), so pass
`training=False` explicitly outside `fit`, `predict` and `evaluate`.

Example:

```python
augmentation = build_augmentation("natural", seed=42)
augmented = augmentation(images, training=True)
train = mix_batches(train, method="mixup", num_classes=5, seed=42)
```
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

# A preset is a plain dict: a description and one setting per layer. A setting
# of None leaves that layer out. Factors follow the Keras layers: rotation is a
# fraction of a full turn (0.1 = up to +/-36 degrees), zoom and translation a
# fraction of the image size, contrast and brightness a fraction of the range.
PRESETS: dict[str, dict[str, Any]] = {
    "natural": {
        "description": (
            "Photographs of everyday scenes: horizontal flip, rotation, zoom, shift, "
            "contrast and brightness."
        ),
        "flip": "horizontal",
        "rotation": 0.1,
        "zoom": 0.1,
        "translation": 0.1,
        "contrast": 0.2,
        "brightness": 0.2,
        "blur": None,
        "fill_mode": "reflect",
    },
    "light": {
        "description": "A gentle start: horizontal flip and up to +/-18 degrees of rotation.",
        "flip": "horizontal",
        "rotation": 0.05,
        "zoom": None,
        "translation": None,
        "contrast": None,
        "brightness": None,
        "blur": None,
        "fill_mode": "reflect",
    },
    "tutorial": {
        "description": (
            "Exactly the TensorFlow transfer-learning tutorial: RandomFlip('horizontal') "
            "and RandomRotation(0.2)."
        ),
        "flip": "horizontal",
        "rotation": 0.2,
        "zoom": None,
        "translation": None,
        "contrast": None,
        "brightness": None,
        "blur": None,
        "fill_mode": "reflect",
    },
    "medical": {
        "description": (
            "Radiographs such as chest X-rays: no flips (left and right carry meaning), "
            "rotation up to +/-5 degrees, small zoom and shift, mild contrast and "
            "brightness, black fill at the borders."
        ),
        "flip": None,
        "rotation": 5 / 360,
        "zoom": 0.05,
        "translation": 0.05,
        "contrast": 0.1,
        "brightness": 0.1,
        "blur": None,
        # Reflecting ribs and collarbones into the border would draw anatomy that
        # cannot exist; a black border looks like the edge of the film.
        "fill_mode": "constant",
    },
    "signs": {
        "description": (
            "Traffic signs: no flips (a flip turns keep_left into keep_right), rotation "
            "up to +/-9 degrees, zoom and shift up to 10 %, strong brightness and contrast "
            "(dusk, glare), mild Gaussian blur (motion, focus), nearest fill at the borders."
        ),
        "flip": None,
        "rotation": 0.025,
        "zoom": 0.1,
        "translation": 0.1,
        "contrast": 0.3,
        "brightness": 0.3,
        # keras.layers.RandomGaussianBlur (3x3, sigma up to 1): per image, a blur chance
        # drawn from [0, 0.5], so about a quarter of the images are blurred.
        "blur": 0.5,
        # Signs are cropped tightly; repeating the edge pixels keeps the border plain
        # instead of reflecting half a sign (a second, mirrored symbol) into the frame.
        "fill_mode": "nearest",
    },
    "none": {
        "description": "No augmentation: the pipeline passes images through unchanged.",
        "flip": None,
        "rotation": None,
        "zoom": None,
        "translation": None,
        "contrast": None,
        "brightness": None,
        "blur": None,
        "fill_mode": "reflect",
    },
}

# The settings a preset holds and `build_augmentation` accepts as overrides, in
# the order their layers run. Each layer's seed is `seed + offset` with a fixed
# offset, so switching one layer off does not change the others' random draws.
_LAYER_SETTINGS = ("flip", "rotation", "zoom", "translation", "contrast", "brightness", "blur")
_SETTINGS = (*_LAYER_SETTINGS, "fill_mode")
_FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
_FILL_MODES = ("reflect", "wrap", "constant", "nearest")
_VALUE_RANGE = (0, 255)

_MIX_METHODS = ("mixup", "cutmix")
_DEFAULT_ALPHA = {"mixup": 0.2, "cutmix": 1.0}


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def list_presets() -> dict[str, str]:
    """Lists the augmentation presets.

    Returns:
        A dict from preset name to its one-line description.

    Example:

    >>> sorted(list_presets())
    ['light', 'medical', 'natural', 'none', 'tutorial']
    """
    return {name: preset["description"] for name, preset in PRESETS.items()}


def build_augmentation(
    preset: str = "natural", seed: int | None = None, **overrides: Any
) -> keras.Sequential:
    """Builds an augmentation pipeline of Keras preprocessing layers.

    The pipeline takes raw RGB images with values in 0..255 and returns images
    in the same range (brightness and contrast clip to it; rotation, zoom and
    shift interpolate between pixels). With `training=False` (as in
    `model.predict`) it returns its input unchanged. Called directly without a
    `training` argument it augments, as Keras preprocessing layers default to
    training mode, so pass `training=False` for inference outside `predict`.

    Args:
        preset: One of `list_presets()`: `"natural"`, `"light"`, `"tutorial"`,
            `"medical"`, `"signs"` or `"none"`. Defaults to `"natural"`.
        seed: Integer seed. Each layer gets its own seed derived from it, so two
            pipelines built with the same seed produce the same sequence of
            augmentations. `None` draws a random seed (affected by
            `keras.utils.set_random_seed`). Defaults to `None`.
        **overrides: Settings that replace the preset's values: `flip` (one of
            `"horizontal"`, `"vertical"`, `"horizontal_and_vertical"`),
            `rotation`, `zoom`, `translation`, `contrast`, `brightness`, `blur`
            (a factor or a `(lower, upper)` pair as the Keras layers take it) and
            `fill_mode` (`"reflect"`, `"wrap"`, `"constant"`, `"nearest"`).
            Pass `None` to leave a layer out, e.g. `flip=None`.

    Returns:
        A `keras.Sequential` named `"augmentation"`. For the `"none"` preset (or
        when every layer is switched off) it holds a single
        `keras.layers.Identity` and returns its input unchanged.

    Raises:
        ValueError: If `preset` or an override name is unknown, or a setting
            has an invalid value.

    Example:

    >>> augmentation = build_augmentation("medical", seed=0, rotation=0.02)
    >>> [layer.__class__.__name__ for layer in augmentation.layers][:2]
    ['RandomRotation', 'RandomZoom']
    """
    if preset not in PRESETS:
        raise ValueError(
            f"Unknown augmentation preset. Expected one of {sorted(PRESETS)} "
            f"(see `tlkit.augment.list_presets()`). Received: preset={preset!r}"
        )
    unknown = sorted(set(overrides) - set(_SETTINGS))
    if unknown:
        raise ValueError(
            f"Unknown augmentation setting(s) {unknown}. Valid settings to override are "
            f"{list(_SETTINGS)}. Received: overrides={overrides!r}"
        )
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an integer or None. Received: seed={seed!r}")
    settings = {**PRESETS[preset], **overrides}
    _validate_settings(settings)

    layers = []
    for offset, name in enumerate(_LAYER_SETTINGS):
        value = settings[name]
        if value is None:
            continue
        layer_seed = None if seed is None else int(seed) + offset
        layers.append(_make_layer(name, value, settings["fill_mode"], layer_seed))
    if not layers:
        # An empty Sequential cannot be called; an Identity layer keeps "none"
        # usable wherever a pipeline is expected.
        layers.append(keras.layers.Identity(name="identity"))
    return keras.Sequential(layers, name="augmentation")


def mix_batches(
    dataset: tf.data.Dataset,
    method: str = "mixup",
    alpha: float | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Mixes the images and labels of each batch with MixUp or CutMix.

    Uses `keras.layers.MixUp` (Zhang et al., 2018, https://arxiv.org/abs/1710.09412)
    or `keras.layers.CutMix` (Yun et al., 2019, https://arxiv.org/abs/1905.04899).
    Each image is mixed with another image of the same batch and its label becomes
    the matching soft one-hot vector, so train with `categorical_crossentropy`
    (not the sparse version). Apply it to the training set only, after batching.

    Args:
        dataset: A batched `tf.data.Dataset` of `(images, labels)` with images of
            shape `(batch, height, width, channels)` and integer labels of shape
            `(batch,)` or `(batch, 1)`. One-hot float labels of shape
            `(batch, num_classes)` are also accepted.
        method: `"mixup"` (blend whole images) or `"cutmix"` (paste a rectangle of
            the other image). Defaults to `"mixup"`.
        alpha: The mixing weight is drawn from Beta(alpha, alpha). Small values
            mix little. For CutMix it must lie in (0, 1]; 1.0 draws the pasted
            area uniformly, as in the paper. `None` uses 0.2 for MixUp and 1.0
            for CutMix. Defaults to `None`.
        num_classes: Number of classes, used to one-hot encode integer labels.
            Required for integer labels. Defaults to `None`.
        seed: Integer seed for the mixing layer. Defaults to `None`.

    Returns:
        A dataset of `(mixed_images, soft_labels)` with float32 images and float32
        labels of shape `(batch, num_classes)` whose rows sum to 1.

    Raises:
        ValueError: If `method` is unknown, `alpha` is out of range, the dataset
            elements are not `(images, labels)` batches, or `num_classes` is
            missing or does not match one-hot labels.

    Example:

    >>> images = tf.random.uniform((8, 32, 32, 3), 0, 255)
    >>> labels = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    >>> dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    >>> mixed = mix_batches(dataset, "cutmix", num_classes=3, seed=1)
    >>> [tuple(spec.shape) for spec in mixed.element_spec]
    [(None, 32, 32, 3), (None, 3)]
    """
    if method not in _MIX_METHODS:
        raise ValueError(
            f"Unknown mixing method. Expected one of {list(_MIX_METHODS)}. "
            f"Received: method={method!r}"
        )
    if alpha is None:
        alpha = _DEFAULT_ALPHA[method]
    upper = 1.0 if method == "cutmix" else float("inf")
    if not isinstance(alpha, (int, float)) or not 0 < alpha <= upper:
        expected = "in (0, 1] for CutMix" if method == "cutmix" else "a positive number"
        raise ValueError(f"`alpha` must be {expected}. Received: alpha={alpha!r}")

    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError(
            "`mix_batches` expects a dataset of `(images, labels)` tuples. "
            f"Received: dataset.element_spec={spec}"
        )
    image_spec, label_spec = spec
    if image_spec.shape.rank != 4:
        raise ValueError(
            "`mix_batches` expects batched images of shape (batch, height, width, "
            "channels); call `dataset.batch(batch_size)` first. "
            f"Received: images shape={image_spec.shape}"
        )
    integer_labels = label_spec.dtype.is_integer
    if integer_labels:
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(
                "`num_classes` (at least 2) is needed to one-hot encode integer labels. "
                f"Received: num_classes={num_classes!r}"
            )
        if label_spec.shape.rank not in (1, 2) or (
            label_spec.shape.rank == 2 and label_spec.shape[-1] not in (1, None)
        ):
            raise ValueError(
                "Integer labels must have shape (batch,) or (batch, 1). "
                f"Received: labels shape={label_spec.shape}"
            )
    else:
        width = label_spec.shape[-1] if label_spec.shape.rank == 2 else None
        if label_spec.shape.rank != 2 or (num_classes is not None and width != num_classes):
            raise ValueError(
                "Float labels must be one-hot with shape (batch, num_classes). "
                f"Received: labels shape={label_spec.shape}, num_classes={num_classes!r}"
            )

    if method == "mixup":
        layer = keras.layers.MixUp(alpha=float(alpha), seed=seed)
    else:
        # Keras draws the Beta parameter uniformly from `factor`; a pair of equal
        # values fixes it at `alpha`, as in the paper.
        layer = keras.layers.CutMix(factor=(float(alpha), float(alpha)), seed=seed)

    def _mix(images, labels):
        if integer_labels:
            labels = tf.one_hot(tf.reshape(labels, [-1]), int(num_classes), dtype=tf.float32)
        else:
            labels = tf.cast(labels, tf.float32)
        mixed = layer({"images": tf.cast(images, tf.float32), "labels": labels}, training=True)
        return mixed["images"], tf.cast(mixed["labels"], tf.float32)

    return dataset.map(_mix, num_parallel_calls=None)


def mixup_features(
    features: Any,
    one_hot_labels: Any,
    alpha: float = 0.2,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Applies MixUp to a batch of pooled feature vectors (the feature-cache path).

    Each row is blended with a randomly chosen other row, with a weight drawn
    from Beta(alpha, alpha), and the labels are blended the same way. CutMix has
    no equivalent here: it pastes image rectangles, and pooled features have no
    spatial layout left to cut.

    Args:
        features: Array of shape `(batch, feature_size)` (numpy or tensor).
        one_hot_labels: Array of shape `(batch, num_classes)`.
        alpha: Beta distribution parameter, a positive number. Defaults to 0.2.
        seed: Seed for `numpy.random.default_rng`. Defaults to `None`.

    Returns:
        A tuple `(mixed_features, mixed_labels)` of float32 numpy arrays with the
        input shapes.

    Raises:
        ValueError: If the arrays are not 2-D with the same number of rows, or
            `alpha` is not positive.

    Example:

    >>> features = np.eye(4, dtype="float32")
    >>> mixed, labels = mixup_features(features, np.eye(4, dtype="float32"), seed=0)
    >>> np.allclose(labels.sum(axis=1), 1.0)
    True
    """
    features = np.asarray(features, dtype=np.float32)
    one_hot_labels = np.asarray(one_hot_labels, dtype=np.float32)
    if features.ndim != 2 or one_hot_labels.ndim != 2:
        raise ValueError(
            "`features` and `one_hot_labels` must be 2-D: (batch, feature_size) and "
            f"(batch, num_classes). Received: features.shape={features.shape}, "
            f"one_hot_labels.shape={one_hot_labels.shape}"
        )
    if len(features) != len(one_hot_labels):
        raise ValueError(
            "`features` and `one_hot_labels` must have the same number of rows. "
            f"Received: features.shape={features.shape}, "
            f"one_hot_labels.shape={one_hot_labels.shape}"
        )
    if not alpha > 0:
        raise ValueError(f"`alpha` must be a positive number. Received: alpha={alpha!r}")
    generator = np.random.default_rng(seed)
    weights = generator.beta(alpha, alpha, size=(len(features), 1)).astype(np.float32)
    order = generator.permutation(len(features))
    mixed_features = weights * features + (1.0 - weights) * features[order]
    mixed_labels = weights * one_hot_labels + (1.0 - weights) * one_hot_labels[order]
    return mixed_features, mixed_labels


# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


def _validate_settings(settings: dict[str, Any]) -> None:
    flip = settings["flip"]
    if flip is not None and flip not in _FLIP_MODES:
        raise ValueError(
            f"`flip` must be one of {list(_FLIP_MODES)} or None. Received: flip={flip!r}"
        )
    fill_mode = settings["fill_mode"]
    if fill_mode not in _FILL_MODES:
        raise ValueError(
            f"`fill_mode` must be one of {list(_FILL_MODES)}. Received: fill_mode={fill_mode!r}"
        )
    for name in _LAYER_SETTINGS[1:]:
        value = settings[name]
        if value is None:
            continue
        numbers = value if isinstance(value, (tuple, list)) else (value,)
        if not numbers or not all(
            isinstance(number, (int, float)) and not isinstance(number, bool) for number in numbers
        ):
            raise ValueError(
                f"`{name}` must be a number, a (lower, upper) pair or None. "
                f"Received: {name}={value!r}"
            )


def _make_layer(name: str, value: Any, fill_mode: str, seed: int | None) -> keras.layers.Layer:
    if name == "flip":
        return keras.layers.RandomFlip(mode=value, seed=seed, name="random_flip")
    if name == "rotation":
        return keras.layers.RandomRotation(
            value, fill_mode=fill_mode, seed=seed, name="random_rotation"
        )
    if name == "zoom":
        return keras.layers.RandomZoom(value, fill_mode=fill_mode, seed=seed, name="random_zoom")
    if name == "translation":
        return keras.layers.RandomTranslation(
            value, value, fill_mode=fill_mode, seed=seed, name="random_translation"
        )
    if name == "contrast":
        return keras.layers.RandomContrast(
            value, value_range=_VALUE_RANGE, seed=seed, name="random_contrast"
        )
    if name == "brightness":
        return keras.layers.RandomBrightness(
            value, value_range=_VALUE_RANGE, seed=seed, name="random_brightness"
        )
    if name == "blur":
        return keras.layers.RandomGaussianBlur(
            value, kernel_size=3, sigma=1.0, value_range=_VALUE_RANGE, seed=seed, name="random_blur"
        )
    raise ValueError(f"Unknown layer setting. Received: name={name!r}")  # pragma: no cover
