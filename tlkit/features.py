"""The feature cache: run the frozen base over a dataset once, keep the features.

With the base frozen, every epoch of ordinary training recomputes the same base
outputs. On a 2-core CPU that recomputation is nearly all of the time, so tlkit
computes the pooled features once (optionally for K augmented views of each
image), stores them on disk, and `tlkit.heads.train_head` trains the head on
them in seconds.

The cache key covers everything that changes the features: the base's actual
weight values (so a fine-tuned base never reuses stale features), its name,
its input preprocessing mode (which has no weights), the image size, the
dataset split's content (a hash of every file's bytes), the augmentation config,
the number of views, the seed and the stored dtype (float32, or float16 for
half the memory and disk). What runs the base (`backend`) is chosen in
`tlkit.inference` and is not part of the key: every backend computes the same
features within float32 round-off (LiteRT is checked against Keras).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit._io import atomic_path, cache_dir, progress_bar
from tlkit.augment import build_augmentation
from tlkit.data.images import load_image_batches
from tlkit.fingerprint import preprocessing_modes, weights_fingerprint
from tlkit.inference import BACKENDS, forward_function
from tlkit.input_config import resolve_input_config

_FORMAT_VERSION = 1
DTYPES = ("float32", "float16")


@dataclass
class FeatureSet:
    """Pooled features of one split.

    Attributes:
        features: float32 (or float16, `extract_features(dtype="float16")`)
            array (N * views, feature_width); view-major order (all images of
            view 0, then view 1, ...).
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


def select_images(features: FeatureSet, indices: Any) -> FeatureSet:
    """The rows of some images, with all their views, as a new `FeatureSet`.

    Args:
        features: A `FeatureSet` (view-major: all images of view 0, then view 1...).
        indices: Image positions in `0..len(features) // features.views - 1`.

    Returns:
        A `FeatureSet` with `len(indices)` images and the same number of views.

    Raises:
        ValueError: If an index is out of range.
    """
    count = len(features) // features.views
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= count):
        raise ValueError(
            f"Image indices must be in 0..{count - 1}. "
            f"Received: indices in {indices.min()}..{indices.max()}"
        )
    rows = (indices[None, :] + count * np.arange(features.views)[:, None]).reshape(-1)
    return FeatureSet(features.features[rows], features.labels[rows], features.views)


def cache_key(
    base: keras.Model,
    split,
    image_size: int,
    views: int,
    augmentation,
    seed: int,
    dtype: str = "float32",
) -> str:
    """The cache key (hex sha256) for the features of `split` under `base`.

    `dtype` enters the key only when it is not float32, so caches written
    before it existed stay valid.
    """
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
    if dtype != "float32":
        parts["dtype"] = dtype
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
    dtype: str = "float32",
) -> FeatureSet:
    """Runs the frozen base over a split once, with a disk cache.

    Any model works as `base`, also one whose output is a feature map (such as
    the `lower` part from `split_at_block`): the stored array then has that
    shape per row.

    Files of a file-based split are decoded by a thread pool ahead of the model
    (`tlkit.data.images.load_image_batches`, a few batches at a time, so memory
    does not grow with the number of images beyond the features themselves);
    augmented views and in-memory splits go through `split.to_dataset`.

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
            base that does not convert falls back to `"keras"` with a warning. LiteRT's
            thread, batch and interpreter counts are measured on the first images
            of a long run and kept per machine (`tlkit.inference.LiteRTRunner`).
            Every backend
            gives the same features within float32 round-off (LiteRT is
            checked against Keras when converted), so the cache key ignores
            it. Defaults to `"auto"`.
        dtype: How the features are stored, in memory and in the cache:
            `"float32"` or `"float16"` (half the memory and disk; rounding
            error at most 2**-11 relative, ~5e-4, far above the backends'
            differences). Keras casts float16 inputs to a float32 model's
            dtype. Defaults to `"float32"`.

    Returns:
        A `FeatureSet`.

    Raises:
        ValueError: On views < 1, views > 1 without an augmentation, an
            unknown backend or dtype, or with `dtype="float16"` features
            beyond its range (|x| > 65504).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}. Received: backend={backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}. Received: dtype={dtype!r}")
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be a positive integer. Received: views={views!r}")
    if views > 1 and augmentation is None:
        raise ValueError(
            "views > 1 needs an augmentation to make the extra views differ, e.g. "
            f"augmentation='natural'. Received: views={views}, augmentation=None"
        )
    if isinstance(augmentation, str):
        augmentation = build_augmentation(augmentation, seed=seed)
    image_size = resolve_input_config(image_size, model=base).image_size
    path = None
    if cache is not False:
        folder = Path(cache) if not isinstance(cache, bool) else cache_dir() / "features"
        key = cache_key(base, split, image_size, views, augmentation, seed, dtype)
        path = folder / f"{base.name}-{image_size}px-{key[:24]}.npz"
        cached = read_cached_features(path, split, views)
        if cached is not None and cached.features.dtype == dtype:
            return cached

    infer = forward_function(base, image_size, backend, images=len(split) * views)
    steps = math.ceil(len(split) / batch_size) * views
    bar = progress_bar(steps, f"features {base.name} {split.name}", progress)
    rows = _Rows(len(split) * views, dtype)
    for view in range(views):
        for images, targets in _batches(split, image_size, batch_size, view, augmentation):
            rows.add(np.asarray(infer(images)), targets)
            bar.update(1)
    bar.close()
    result = FeatureSet(*rows.arrays(), views, path)
    if path is not None:
        with atomic_path(path) as temporary:
            np.savez(temporary, features=result.features, labels=result.labels)
    return result


def _batches(split, image_size: int, batch_size: int, view: int, augmentation):
    """(images, labels) batches of one view: numpy from files, tf tensors otherwise.

    Files of the plain view are decoded by `load_image_batches` (a thread pool
    ahead of the model, no tf.data); the same `load_image` decodes them in
    `split.to_dataset`, so the pixels are the same either way. Augmented views
    and in-memory splits go through `split.to_dataset`.
    """
    if split.paths is not None and view == 0:
        labels = np.asarray(split.labels, np.int32)
        batches = load_image_batches(split.paths, image_size, batch_size, dtype="uint8")
        for images, kept, failures in batches:
            for position, reason in failures:
                split._record_skip(split.paths[position], f"failed to decode at run time: {reason}")
            if len(kept):
                yield images.astype(np.float32), labels[kept]
        return
    dataset = split.to_dataset(image_size, batch_size=batch_size, shuffle=False)
    if view > 0:
        dataset = dataset.map(
            lambda images, targets: (augmentation(images, training=True), targets),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    for images, targets in dataset:
        yield images, targets.numpy()


class _Rows:
    """Features and labels written into arrays allocated once (no list + concatenate copy)."""

    def __init__(self, capacity: int, dtype: str = "float32"):
        self.capacity, self.count, self.dtype = capacity, 0, np.dtype(dtype)
        self.features: np.ndarray | None = None
        self.labels = np.empty(capacity, np.int32)

    def add(self, features: np.ndarray, labels) -> None:
        if self.features is None:
            self.features = np.empty((self.capacity, *features.shape[1:]), self.dtype)
        if self.dtype == np.float16:
            largest = float(np.max(np.abs(features))) if features.size else 0.0
            if largest > float(np.finfo(np.float16).max):
                raise ValueError(
                    "These features exceed the float16 range (65504); store them with "
                    f"dtype='float32'. Received: max |feature|={largest:.4g}"
                )
        self.features[self.count : self.count + len(features)] = features
        self.labels[self.count : self.count + len(features)] = labels
        self.count += len(features)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.features is None:  # Nothing decoded: no rows, width unknown.
            return np.zeros((0,), self.dtype), self.labels[:0]
        if self.count == self.capacity:
            return self.features, self.labels
        return self.features[: self.count].copy(), self.labels[: self.count].copy()


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


def _augmentation_config(augmentation) -> object:
    if augmentation is None:
        return None
    if isinstance(augmentation, str):
        return augmentation
    return keras.saving.serialize_keras_object(augmentation)
