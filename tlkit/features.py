"""The feature cache: run the frozen base over a dataset once, train heads on features.

With the base frozen, every epoch of ordinary training recomputes the same base
outputs. On a 2-core CPU that recomputation is nearly all of the time, so tlkit
computes the pooled features once (optionally for K augmented views of each
image), stores them on disk, and trains the head on them in seconds.

The cache key covers everything that changes the features: the base's actual
weight values (so a fine-tuned base never reuses stale features), its name,
its input preprocessing mode (which has no weights), the image size, the dataset split's content (a hash of every file's bytes), the augmentation config, the
number of views and the seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlkit._io import atomic_path, cache_dir

_FORMAT_VERSION = 1


@dataclass
class FeatureSet:
    """Pooled features of one split.

    Attributes:
        features: float32 array (N * views, feature_width); view-major order
            (all images of view 0, then view 1, ...).
        labels: int32 array (N * views,).
        views: Number of views per image (1 = un-augmented only).
        path: Where the cache file is, or None when not cached.
        from_cache: Whether the features were read from the cache.
    """

    features: np.ndarray
    labels: np.ndarray
    views: int
    path: Path | None = None
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def first_view(self) -> FeatureSet:
        """The un-augmented features only (view 0), as a one-view `FeatureSet`.

        View 0 of `extract_features(..., views=K)` is the plain image, so one
        extraction serves both a plain and an augmented head.

        Returns:
            A `FeatureSet` with `len(self) // self.views` rows and `views=1`.

        Example:
            >>> augmented = extract_features(base, few, views=5, augmentation="natural")
            >>> len(augmented.first_view()) == len(few)
            True
        """
        count = len(self.labels) // self.views
        return FeatureSet(self.features[:count], self.labels[:count], 1, self.path, self.from_cache)

    def to_dataset(self, batch_size: int = 64, shuffle: bool = False, seed: int | None = None):
        """A `tf.data.Dataset` of (features, labels) batches."""
        dataset = tf.data.Dataset.from_tensor_slices((self.features, self.labels))
        if shuffle:
            dataset = dataset.shuffle(len(self.labels), seed=seed, reshuffle_each_iteration=True)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 over a model's weight values (hex)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def preprocessing_modes(model: keras.Model) -> list[str]:
    """The modes of the `ImagePreprocessing` layers inside a model, outermost first.

    Preprocessing has no weights, so `weights_fingerprint` cannot tell a base
    built with `build_backbone(..., preprocessing="tf")` from the original; the
    feature cache key includes these modes as well.

    Args:
        model: A Keras model, possibly with nested models.

    Returns:
        A list of mode names, e.g. `["torch"]`; empty when there is none.

    Example:
        >>> preprocessing_modes(tlkit.build_backbone("mobilenet_v2", weights=None))
        ['torch']
    """
    from tlkit.backbones.preprocessing import ImagePreprocessing

    modes = []
    for layer in model.layers:
        if isinstance(layer, ImagePreprocessing):
            modes.append(layer.mode)
        elif isinstance(layer, keras.Model):
            modes.extend(preprocessing_modes(layer))
    return modes


def cache_key(
    base: keras.Model, split, image_size: int, views: int, augmentation, seed: int
) -> str:
    """The cache key (hex sha256) for the features of `split` under `base`."""
    parts = {
        "format": _FORMAT_VERSION,
        "base": base.name,
        "weights": weights_fingerprint(base),
        "preprocessing": preprocessing_modes(base),
        "image_size": int(image_size),
        # Content, not names, sizes and times: a `cp -p` copy with other pixels must miss.
        "data": split.content_fingerprint(),
        "views": int(views),
        "augmentation": _augmentation_config(augmentation) if views > 1 else None,
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def extract_features(
    base: keras.Model,
    split,
    image_size: int | None = None,
    batch_size: int = 64,
    views: int = 1,
    augmentation: keras.Layer | str | None = None,
    seed: int = 0,
    cache: bool | str | Path = True,
    progress: bool = True,
    backend: str = "auto",
) -> FeatureSet:
    """Runs the frozen base over a split once, with a disk cache.

    Any model works as `base`, also one whose output is a feature map (such as
    the `lower` part from `split_at_block`): the stored array then has that
    shape per row.

    Args:
        base: A frozen feature extractor (`tlkit.build_feature_extractor`).
        split: A `tlkit.data.ImageSplit`.
        image_size: Size the images are resized to. Defaults to the base's
            input size, or 224 when the base takes any size.
        batch_size: Images per forward pass. Defaults to 64.
        views: 1 for plain features; K > 1 adds K - 1 augmented views of
            every image. Defaults to 1.
        augmentation: The augmentation for the extra views: a `tlkit.augment`
            preset name or a Keras layer. Required when views > 1.
        seed: Seed of the augmented views. Defaults to 0.
        cache: True for the default cache folder, a folder path, or False to
            skip the cache. Defaults to True.
        progress: Show a progress bar. Defaults to True.
        backend: What runs the base: `"keras"` (a compiled `tf.function`),
            `"xla"` (the same with `jit_compile=True`, for accelerators; many
            times slower than `"keras"` on the CPU of `bench/throughput.py`),
            `"litert"` (the base converted once by `tlkit.litert`, run by
            XNNPACK; ~2.5x faster than Keras `predict` on a CPU), or
            `"auto"`: `"litert"` on a machine without a GPU, outside a
            distribution strategy, when the conversion is cached or pays off
            (at least `LITERT_MIN_IMAGES` images x views), else `"keras"`; a
            base that does not convert falls back to `"keras"` with a warning. Every backend
            gives the same features within float32 round-off (LiteRT is
            checked against Keras when converted), so the cache key ignores
            it. Defaults to `"auto"`.

    Returns:
        A `FeatureSet`.

    Raises:
        ValueError: On views < 1, views > 1 without an augmentation, or an
            unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}. Received: backend={backend!r}")
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be a positive integer. Received: views={views!r}")
    if views > 1 and augmentation is None:
        raise ValueError(
            "views > 1 needs an augmentation to make the extra views differ, e.g. "
            f"augmentation='natural'. Received: views={views}, augmentation=None"
        )
    if isinstance(augmentation, str):
        from tlkit.augment import build_augmentation

        augmentation = build_augmentation(augmentation, seed=seed)
    image_size = image_size or base.input_shape[1] or 224
    path = None
    if cache is not False:
        folder = Path(cache) if not isinstance(cache, bool) else cache_dir() / "features"
        key = cache_key(base, split, image_size, views, augmentation, seed)
        path = folder / f"{base.name}-{image_size}px-{key[:24]}.npz"
        cached = read_cached_features(path, split, views)
        if cached is not None:
            return cached

    infer = forward_function(base, image_size, backend, images=len(split) * views)
    steps = math.ceil(len(split) / batch_size) * views
    bar = _progress_bar(steps, f"features {base.name} {split.name}", progress)
    features, labels = [], []
    for view in range(views):
        dataset = split.to_dataset(image_size, batch_size=batch_size, shuffle=False)
        if view > 0:
            dataset = dataset.map(
                lambda images, targets: (augmentation(images, training=True), targets),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        for images, targets in dataset:
            features.append(np.asarray(infer(images)))
            labels.append(targets.numpy())
            bar.update(1)
    bar.close()
    result = FeatureSet(
        np.concatenate(features).astype(np.float32),
        np.concatenate(labels).astype(np.int32),
        views,
        path,
    )
    if path is not None:
        with atomic_path(path) as temporary:
            np.savez(temporary, features=result.features, labels=result.labels)
    return result


def read_cached_features(path: Path, split, views: int) -> FeatureSet | None:
    """The features stored at `path`, or None when there are none or they are damaged.

    A truncated or otherwise unreadable file, or one whose rows and labels do
    not fit the split, is deleted with a warning that names it, so the caller
    computes and stores the features again instead of crashing on every run.

    Args:
        path: The cache file (`.npz`).
        split: The split the features belong to.
        views: The number of views stored.

    Returns:
        A `FeatureSet` read from the cache, or None.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            features, labels = stored["features"], stored["labels"]
        # Files that fail to decode are dropped while extracting, so there may be fewer rows.
        if len(features) != len(labels) or len(labels) > len(split) * views:
            raise ValueError(f"{len(features)} rows and {len(labels)} labels")
        if len(labels) and not 0 <= labels.min() <= labels.max() < split.num_classes:
            raise ValueError(f"labels outside 0..{split.num_classes - 1}")
    except Exception as error:  # noqa: BLE001 - any damage means: compute again.
        import warnings

        warnings.warn(
            f"The feature cache file {path} is damaged ({type(error).__name__}: {error}); "
            "computing the features again.",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None
    return FeatureSet(features, labels, views, path, True)


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
    """Trains a head (`tlkit.models.build_head`) on cached features.

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
    from tlkit.models import compile_classifier

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
    from tlkit.models import block_names

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
    from tlkit.backbones import get_backbone

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
        head: A head from `tlkit.models.build_head` (e.g. trained on features).
        learning_rate: Adam learning rate. Defaults to 1e-5.

    Returns:
        A compiled `keras.Model` from activations to class probabilities.
    """
    from tlkit.models import compile_classifier

    upper.trainable = True
    # Set every layer itself: a model cut from the middle of another does not
    # pass `trainable` on to the layers it shares.
    for layer in upper._flatten_layers(include_self=False):
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    inputs = keras.Input(shape=upper.input_shape[1:], name="activations")
    outputs = head(upper(inputs, training=False))
    model = keras.Model(inputs, outputs, name=f"{upper.name}_classifier")
    return compile_classifier(model, learning_rate=learning_rate)


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
            f"class_weight values must be finite and non-negative. Received: class_weight={class_weight!r}"
        )
    return weights


_FORWARD_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
BACKENDS = ("auto", "keras", "xla", "litert")
# Converting a base to LiteRT takes ~6 s on 2 cores, the time Keras needs for ~300
# images at 224 px; LiteRT saves ~60 % per image, so "auto" converts from 1000 on.
LITERT_MIN_IMAGES = 1000


def forward_function(
    base: keras.Model, image_size: int, backend: str = "auto", images: int | None = None
):
    """The inference function `extract_features` uses: images in, numpy-convertible out.

    Args:
        base: The frozen model.
        image_size: Square size of the images it will get.
        backend: One of `BACKENDS` (see `extract_features`).
        images: How many images it will get, for `"auto"`'s choice; None
            means many. Defaults to None.

    Returns:
        A callable taking a batch of images (tensor or array).

    Raises:
        ValueError: On an unknown backend, or backend `"litert"` with a model
            whose conversion does not match Keras.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}. Received: backend={backend!r}")
    if backend == "auto":
        backend = _automatic_backend(base, image_size, images)
        if backend == "litert":
            try:
                return _litert_forward(base, image_size)
            except Exception as error:  # noqa: BLE001 - any converter failure means: use Keras.
                import warnings

                warnings.warn(
                    f"LiteRT could not run {base.name} ({type(error).__name__}: {error}); "
                    "using Keras. Pass backend='keras' to skip the attempt.",
                    stacklevel=2,
                )
                backend = "keras"
    if backend == "litert":
        return _litert_forward(base, image_size)
    function = inference_function(base, jit_compile=backend == "xla")
    return lambda images: function(images).numpy()


def _automatic_backend(base: keras.Model, image_size: int, images: int | None) -> str:
    from tlkit import litert

    if (
        tf.distribute.has_strategy()
        or tf.config.list_logical_devices("GPU")
        or not litert.available()
    ):
        return "keras"
    if images is None or images >= LITERT_MIN_IMAGES:
        return "litert"
    return "litert" if litert.cached_path(base, image_size).is_file() else "keras"


def _litert_forward(base: keras.Model, image_size: int):
    from tlkit.litert import LiteRTModel

    model = LiteRTModel(base, image_size)
    return lambda images: model(keras.ops.convert_to_numpy(images))


def inference_function(base: keras.Model, jit_compile: bool):
    """One compiled inference function per base and XLA setting, reused across calls.

    Building a new `tf.function` on every `extract_features` call retraces the
    model each time (and TensorFlow warns about it).
    """
    functions = _FORWARD_FUNCTIONS.setdefault(base, {})
    if jit_compile not in functions:
        functions[jit_compile] = tf.function(
            lambda images: base(images, training=False),
            reduce_retracing=True,
            autograph=False,  # Plain model call; AutoGraph only adds warnings here.
            jit_compile=jit_compile,
        )
    return functions[jit_compile]


def _augmentation_config(augmentation) -> object:
    if augmentation is None:
        return None
    if isinstance(augmentation, str):
        return augmentation
    return keras.saving.serialize_keras_object(augmentation)


def _progress_bar(total: int, description: str, enabled: bool):
    import warnings

    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        # tqdm.auto warns in Jupyter without ipywidgets, then falls back to text bars.
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", disable=not enabled, leave=False)
