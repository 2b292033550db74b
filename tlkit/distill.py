"""Knowledge distillation: train a small student to match a large teacher.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network"
(2015, https://arxiv.org/abs/1503.02531). The student is trained on

    alpha * CE(labels, softmax(s))
    + (1 - alpha) * T**2 * KL(softmax(t / T) || softmax(s / T))

where `s` and `t` are the student's and the teacher's logits and `T` is the
temperature. Dividing by `T > 1` softens both distributions so the student
also learns how the teacher ranks the wrong classes; the `T**2` keeps the
gradient of the soft term on the same scale whatever `T` is. The structure
follows the keras.io example "Knowledge Distillation" (Kenneth Borup).

The teacher is frozen, so its outputs for the training images never change.
As with the feature cache (`tlkit.features`), tlkit runs the teacher over a
split once (`teacher_logits`, cached on disk) and trains the student on
`(images, (labels, teacher_logits))` batches (`distillation_dataset`); a
`Distiller` built with a teacher can also run it on every batch instead.

Unlabelled images. The teacher's soft targets need no label, so the student
can also learn from images nobody labelled (Hinton et al.'s "transfer set").
Give those examples the label `-1` (`distillation_dataset(...,
labelled=mask)` does it): they get only the soft term, and the training
accuracy counts labelled examples only. This is where distillation helps most:
with few labels, a student trained alone sees only the labelled images, while
a distilled student learns from every image the teacher has seen.

Logits from a softmax classifier. tlkit classifiers (and `build_scratch_cnn`)
output probabilities, not logits. tlkit uses `log(p)` as the logits: with
`p = softmax(z)`, `log(p) = z - logsumexp(z)` differs from the pre-softmax
logits `z` only by one constant per example, and `softmax(. / T)` ignores such
a constant, so the loss is the same as with `z`. The only loss is float32
underflow: a probability below ~1e-38 is clipped there (`log` ~ -87), which
for T <= 10 changes any soft target by less than 2e-4. Models that output
logits say so with `student_from_logits` / `teacher_from_logits` /
`from_logits`. The trained student keeps its softmax output, so it stays a
plain Keras classifier that `predict_split`, `model.save` and `tlkit.export`
handle like any other.

Example:

>>> teacher = tlkit.build_classifier("efficientnet_lite0", 5, base=base, head=head)
>>> logits = teacher_logits(teacher, flowers.train, image_size=224)
>>> student = tlkit.scratch.build_scratch_cnn(5, image_size=112)
>>> distiller = Distiller(student)
>>> distiller.compile(keras.optimizers.Adam(1e-3), alpha=0.1, temperature=3)
>>> distiller.fit(distillation_dataset(flowers.train, logits, 112), epochs=10)
>>> student.save("student.keras")
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlkit._io import atomic_path, cache_dir, progress_bar
from tlkit.data import ImageSplit
from tlkit.fingerprint import preprocessing_modes, weights_fingerprint
from tlkit.input_config import resolve_input_config

__all__ = ["Distiller", "distillation_dataset", "distillation_loss", "teacher_logits"]

_FORMAT_VERSION = 1
# The smallest normal float32: log(_TINY) is about -87.3.
_TINY = float(np.finfo(np.float32).tiny)

# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def as_logits(outputs, from_logits: bool = False):
    """Logits from a model's outputs: `log(p)` for probabilities, else unchanged.

    Args:
        outputs: Class probabilities (rows summing to 1) or logits.
        from_logits: Whether `outputs` already are logits. Defaults to False.

    Returns:
        A tensor of the same shape whose softmax is `outputs` (probabilities)
        or that is `outputs` (logits).
    """
    if from_logits:
        return outputs
    return keras.ops.log(keras.ops.maximum(outputs, _TINY))


def distillation_loss(
    labels,
    student_logits,
    teacher_logits,
    alpha: float = 0.1,
    temperature: float = 3.0,
    sample_weight=None,
):
    """The Hinton et al. loss, averaged over the batch.

    `alpha * CE(labels, softmax(s)) + (1 - alpha) * T**2 * KL(softmax(t/T) || softmax(s/T))`,
    computed with `log_softmax`, so it is exact for any logits (no clipping).
    An example labelled `-1` (unlabelled) gets only the soft term,
    `(1 - alpha) * T**2 * KL(...)`; the mean is still over the whole batch.

    Args:
        labels: Integer class labels, shape (batch,); `-1` marks an
            unlabelled example.
        student_logits: Student logits, shape (batch, num_classes).
        teacher_logits: Teacher logits, shape (batch, num_classes).
        alpha: Weight of the hard-label term, in [0, 1]. Defaults to 0.1.
        temperature: Softening temperature T > 0. Defaults to 3.0.
        sample_weight: Optional per-example weights, shape (batch,); the loss
            is the weighted mean. Defaults to None.

    Returns:
        A scalar tensor.

    Example:
        >>> distillation_loss([0], [[2.0, 0.0]], [[1.0, 0.0]], alpha=0.5, temperature=2.0)
    """
    student_logits = keras.ops.convert_to_tensor(student_logits, "float32")
    teacher_logits = keras.ops.convert_to_tensor(teacher_logits, "float32")
    hard = _hard_loss(labels, student_logits)
    teacher_log_soft = keras.ops.log_softmax(teacher_logits / temperature, axis=-1)
    student_log_soft = keras.ops.log_softmax(student_logits / temperature, axis=-1)
    soft = keras.ops.sum(
        keras.ops.exp(teacher_log_soft) * (teacher_log_soft - student_log_soft), axis=-1
    )
    per_example = alpha * hard + (1.0 - alpha) * temperature**2 * soft
    return _weighted_mean(per_example, sample_weight)


def _hard_loss(labels, logits):
    """Per-example sparse categorical cross-entropy from logits; 0 where the label is -1."""
    logits = keras.ops.convert_to_tensor(logits, "float32")
    labels = keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32")
    labelled = keras.ops.cast(labels >= 0, "float32")
    one_hot = keras.ops.one_hot(keras.ops.maximum(labels, 0), keras.ops.shape(logits)[-1])
    return -labelled * keras.ops.sum(one_hot * keras.ops.log_softmax(logits, axis=-1), axis=-1)


def _weighted_mean(values, sample_weight=None):
    if sample_weight is None:
        return keras.ops.mean(values)
    weights = keras.ops.cast(keras.ops.reshape(sample_weight, (-1,)), "float32")
    return keras.ops.sum(values * weights) / keras.ops.maximum(keras.ops.sum(weights), 1e-12)


# ---------------------------------------------------------------------------
# The Distiller
# ---------------------------------------------------------------------------


class Distiller(keras.Model):
    """Trains a student on hard labels and a frozen teacher's softened outputs.

    `fit` takes either `(images, (labels, teacher_logits))` batches (cached
    logits, see `teacher_logits` and `distillation_dataset`: the teacher never
    runs) or `(images, labels)` batches, for which the teacher runs on every
    batch (`training=False`). Examples labelled `-1` are unlabelled: they
    get only the soft loss and the training metrics skip them (see
    `distillation_dataset(..., labelled=...)`). `evaluate` and validation
    measure the student on hard labels only: the reported `loss` there is the student's sparse
    categorical cross-entropy, and the metrics (e.g. accuracy) see the labels.

    Only the student's weights change; the teacher is set non-trainable. The
    wrapper itself is not meant to be saved: save `distiller.student`, a plain
    Keras model.

    Args:
        student: The model to train; it maps images to class probabilities
            (or logits, see `student_from_logits`).
        teacher: The frozen teacher, or None when every training batch brings
            cached teacher logits. Defaults to None.
        student_from_logits: Whether the student outputs logits rather than
            probabilities. Defaults to False (tlkit models output probabilities).
        teacher_from_logits: Whether the teacher outputs logits. Defaults to
            False.

    Raises:
        ValueError: If `student` or `teacher` is not a Keras model.

    Example:
        >>> distiller = Distiller(student)
        >>> distiller.compile(keras.optimizers.Adam(1e-3), alpha=0.1, temperature=3)
        >>> distiller.fit(distillation_dataset(train, logits, 112), epochs=10,
        ...               validation_data=validation.to_dataset(112))
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model | None = None,
        student_from_logits: bool = False,
        teacher_from_logits: bool = False,
        **kwargs,
    ):
        if not isinstance(student, keras.Model):
            raise ValueError(
                f"student must be a keras.Model. Received: student={type(student).__name__}"
            )
        if teacher is not None and not isinstance(teacher, keras.Model):
            raise ValueError(
                "teacher must be a keras.Model, or None when the data brings cached "
                f"teacher logits. Received: teacher={type(teacher).__name__}"
            )
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        self.student_from_logits = bool(student_from_logits)
        self.teacher_from_logits = bool(teacher_from_logits)
        self.alpha = 0.1
        self.temperature = 3.0

    def compile(
        self, optimizer="adam", metrics=None, alpha: float = 0.1, temperature: float = 3.0, **kwargs
    ):
        """Sets the optimizer, the student's metrics and the loss weights.

        Args:
            optimizer: A Keras optimizer or its name. Defaults to `"adam"`.
            metrics: Metrics of the student on hard labels. Defaults to
                sparse categorical accuracy named `"accuracy"`.
            alpha: Weight of the hard-label loss, in [0, 1]; the soft loss
                gets `1 - alpha`. Defaults to 0.1.
            temperature: Softening temperature T > 0. Defaults to 3.
            **kwargs: Passed to `keras.Model.compile` (not `loss`).

        Raises:
            ValueError: If `alpha` is outside [0, 1], `temperature` is not
                positive, or a `loss` is passed.
        """
        if "loss" in kwargs:
            raise ValueError(
                "The Distiller defines its own loss; set `alpha` and `temperature` instead. "
                f"Received: loss={kwargs['loss']!r}"
            )
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], e.g. 0.1. Received: alpha={alpha!r}")
        if not float(temperature) > 0.0:
            raise ValueError(
                f"temperature must be positive, e.g. 3. Received: temperature={temperature!r}"
            )
        if metrics is None:
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True, **kwargs
    ):
        labels, cached = _split_targets(y)
        student_logits = as_logits(y_pred, self.student_from_logits)
        extra = keras.ops.sum(self.losses) if self.losses else 0.0  # e.g. weight decay
        if not training:
            # Evaluation: the student on hard labels only.
            return _weighted_mean(_hard_loss(labels, student_logits), sample_weight) + extra
        if cached is None:
            if self.teacher is None:
                raise ValueError(
                    "This Distiller has no teacher, so every training batch must bring cached "
                    "teacher logits as (images, (labels, teacher_logits)); build them with "
                    "tlkit.distill.distillation_dataset, or pass teacher= to the Distiller. "
                    "Received: y=labels only"
                )
            teacher_outputs = self.teacher(x, training=False)
            teacher_logits_ = as_logits(teacher_outputs, self.teacher_from_logits)
        else:
            teacher_logits_ = cached
        teacher_logits_ = keras.ops.stop_gradient(teacher_logits_)
        loss = distillation_loss(
            labels, student_logits, teacher_logits_, self.alpha, self.temperature, sample_weight
        )
        return loss + extra

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        labels, _ = _split_targets(y)
        # Unlabelled (-1) examples are left out (compile `metrics` ignore sample weights).
        labels = tf.reshape(labels, (-1,))
        labelled = labels >= 0
        if sample_weight is not None:
            sample_weight = tf.boolean_mask(tf.reshape(sample_weight, (-1,)), labelled)
        return super().compute_metrics(
            x,
            tf.boolean_mask(labels, labelled),
            tf.boolean_mask(y_pred, labelled),
            sample_weight=sample_weight,
        )


def _split_targets(y):
    if isinstance(y, (tuple, list)):
        if len(y) != 2:
            raise ValueError(
                "Distiller targets must be labels or (labels, teacher_logits). "
                f"Received: a {type(y).__name__} of length {len(y)}"
            )
        return y[0], y[1]
    return y, None


# ---------------------------------------------------------------------------
# Cached teacher logits
# ---------------------------------------------------------------------------


def teacher_logits(
    teacher: keras.Model,
    split,
    image_size: int | None = None,
    batch_size: int = 64,
    from_logits: bool = False,
    cache: bool | str | Path = True,
    progress: bool = True,
) -> np.ndarray:
    """Runs the frozen teacher over a split once and returns its logits, cached on disk.

    The cache key covers the teacher's name, its weight values (a retrained
    head or fine-tuned base never reuses stale logits), its preprocessing
    modes, the image size and the split's fingerprint.

    Args:
        teacher: The teacher classifier, e.g. from `tlkit.build_classifier`.
        split: A `tlkit.data.ImageSplit`.
        image_size: Size the images are loaded at. Defaults to the teacher's
            input size, or 224 when it takes any size.
        batch_size: Images per forward pass. Defaults to 64.
        from_logits: Whether the teacher outputs logits. Defaults to False
            (probabilities; `log(p)` is returned, see the module docstring).
        cache: True for the default cache folder, a folder path, or False to
            skip the cache. Defaults to True.
        progress: Show a progress bar. Defaults to True.

    Returns:
        A float32 array (len(split), num_classes), row `i` for example `i`
        of the split; rows of images that failed to decode are NaN (those
        images are dropped again by `distillation_dataset`).

    Raises:
        ValueError: If `batch_size` is not a positive int.

    Example:
        >>> logits = teacher_logits(teacher, flowers.train, image_size=224)
        >>> logits.shape
        (2936, 5)
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            f"batch_size must be a positive int, e.g. 64. Received: batch_size={batch_size!r}"
        )
    image_size = resolve_input_config(image_size, model=teacher).image_size
    path = None
    if cache is not False:
        folder = Path(cache) if not isinstance(cache, bool) else cache_dir() / "teacher_logits"
        parts = {
            "format": _FORMAT_VERSION,
            "teacher": teacher.name,
            "weights": weights_fingerprint(teacher),
            "preprocessing": preprocessing_modes(teacher),
            "image_size": int(image_size),
            "data": split.content_fingerprint(),  # Bytes, not names and times.
            "from_logits": bool(from_logits),
        }
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        path = folder / f"{teacher.name}-{image_size}px-{key[:24]}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)

    infer = tf.function(
        lambda images: as_logits(teacher(images, training=False), from_logits),
        reduce_retracing=True,
        autograph=False,
    )
    bar = progress_bar(
        math.ceil(len(split) / batch_size), f"teacher {teacher.name} {split.name}", progress
    )
    result = None
    for images, indices in _indexed(split).to_dataset(image_size, batch_size=batch_size):
        logits = np.asarray(infer(images), dtype=np.float32)
        if result is None:
            result = np.full((len(split), logits.shape[-1]), np.nan, dtype=np.float32)
        result[indices.numpy()] = logits
        bar.update(1)
    bar.close()
    if result is None:
        num_classes = int(teacher.output_shape[-1])
        result = np.full((len(split), num_classes), np.nan, dtype=np.float32)
    if path is not None:
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, result, allow_pickle=False)
    return result


def distillation_dataset(
    split,
    logits: np.ndarray,
    image_size: int | None = None,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int | None = None,
    labelled=None,
):
    """A `tf.data.Dataset` of `(images, (labels, teacher_logits))` for `Distiller.fit`.

    Example `i` of the split is paired with row `i` of `logits`, so the student
    may see the images at another size than the teacher did. The order is
    shuffled before decoding, every epoch, as in `ImageSplit.to_dataset`.

    With `labelled`, only those examples keep their label; the others get
    `-1` and teach the student through the teacher's soft targets alone
    (unlabelled images as a transfer set, see the module docstring).

    Args:
        split: The `tlkit.data.ImageSplit` the logits were computed on (or one
            with the same examples in the same order, e.g. an in-memory copy).
        logits: Teacher logits from `teacher_logits`, (len(split), num_classes).
        image_size: Size the student sees. Defaults to the split's own.
        batch_size: Batch size. Defaults to 32.
        shuffle: Whether to reshuffle every epoch. Defaults to True.
        seed: Shuffle seed. Defaults to None.
        labelled: Which examples the student may see the label of: a
            boolean mask of length `len(split)` or integer positions; None
            keeps every label. Defaults to None.

    Returns:
        A batched, prefetched `tf.data.Dataset`: float32 images 0..255,
        int32 labels (batch,; `-1` for unlabelled examples), float32 logits
        (batch, num_classes).

    Raises:
        ValueError: If `logits` does not have one row per example, or
            `labelled` is a mask of the wrong length or holds positions out
            of range.

    Example:
        >>> train = distillation_dataset(flowers.train, logits, image_size=112, seed=0)
        >>> # 20 labels per class; the teacher's soft targets on all the photos.
        >>> few = np.isin(flowers.train.paths, flowers.train.sample_per_class(20).paths)
        >>> train = distillation_dataset(flowers.train, logits, 112, labelled=few)
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or len(logits) != len(split):
        raise ValueError(
            "logits must have one row per example of the split, "
            f"shape ({len(split)}, num_classes); "
            "compute them with teacher_logits(teacher, split). "
            f"Received: logits.shape={logits.shape}"
        )
    labels = np.asarray(split.labels, dtype=np.int32)
    if labelled is not None:
        labels = np.where(_labelled_mask(labelled, len(split)), labels, -1).astype(np.int32)
    labels = tf.constant(labels, dtype=tf.int32)
    table = tf.constant(logits)
    dataset = _indexed(split).to_dataset(image_size, batch_size=None, shuffle=shuffle, seed=seed)
    dataset = dataset.map(
        lambda image, index: (image, (tf.gather(labels, index), tf.gather(table, index))),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


def _labelled_mask(labelled, count: int) -> np.ndarray:
    """A boolean mask of length `count` from a mask or integer positions."""
    labelled = np.asarray(labelled)
    if labelled.dtype == bool:
        if labelled.shape != (count,):
            raise ValueError(
                f"A boolean `labelled` mask must have one entry per example ({count}). "
                f"Received: labelled.shape={labelled.shape}"
            )
        return labelled
    positions = labelled.astype(np.int64).reshape(-1)
    if len(positions) and (positions.min() < 0 or positions.max() >= count):
        raise ValueError(
            f"`labelled` positions must be in 0..{count - 1}. "
            f"Received: labelled in {positions.min()}..{positions.max()}"
        )
    mask = np.zeros(count, dtype=bool)
    mask[positions] = True
    return mask


def _indexed(split):
    """The same split with each example's position as its label.

    This reuses `ImageSplit.to_dataset` (decoding, shuffling before decoding,
    dropping unreadable files) while keeping track of which example each
    image is; decode failures are recorded in the original split's report.
    """
    count = len(split)
    indexed = ImageSplit(
        split.name,
        [str(index) for index in range(max(count, 1))],
        np.arange(count, dtype=np.int32),
        paths=split.paths,
        images=split.images,
        root=split.root,
        image_size=split.image_size,
    )
    indexed._parent_reports = [split.report, *getattr(split, "_parent_reports", [])]
    return indexed
