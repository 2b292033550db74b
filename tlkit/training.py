"""The main job: feature-cache training, optional fine-tuning, evaluation, a run folder.

`train_run` is what `python -m tlkit train` calls; notebooks can call it too.
A run folder holds `model.keras`, `metrics.json`, `training_curves.png` and
`confusion_matrix.png`. An existing, non-empty run folder is never
overwritten unless `overwrite=True`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlkit import distribute, evaluation
from tlkit._io import atomic_path, write_json
from tlkit._keras_compat import reseed_layers
from tlkit._version import __version__
from tlkit.augment import list_presets
from tlkit.backbones import build_backbone, get_backbone
from tlkit.data.source import resolve_data
from tlkit.features import FeatureSet, extract_features
from tlkit.fine_tuning import fine_tune_cached, fine_tune_split, split_at_block
from tlkit.heads import CLASS_WEIGHT_MODES, build_head, choose_class_weight, train_head
from tlkit.inference import BACKENDS, inference_function
from tlkit.input_config import resolve_input_config
from tlkit.models import (
    block_names,
    build_classifier,
    build_feature_extractor,
    set_decision_threshold,
    unfreeze,
)

# What `TrainConfig.fine_tune_on` accepts: fine-tuning on images or on cached activations.
FINE_TUNE_ON = ("images", "activations")
# What `TrainConfig.fine_tune_schedule` accepts: the fine-tuning learning rate over the steps.
FINE_TUNE_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Settings of a training run; every field has a sensible default.

    Attributes:
        backbone: Registry name of the pretrained base.
        image_size: Square input size; None means the backbone's default.
        epochs: Head epochs on cached features.
        fine_tune_epochs: Epochs with the top blocks unfrozen.
        fine_tune_blocks: How many blocks to unfreeze, counted from the output
            (ignored when `fine_tune_from` names a block).
        fine_tune_from: The first block to unfreeze (that block and all after
            it, e.g. "block3"), or None to count `fine_tune_blocks` instead.
        fine_tune_on: What the top blocks are fine-tuned on. "images": the
            whole classifier on images, a fresh augmentation every epoch
            (`fine_tune_split`). "activations": only the blocks from
            `fine_tune_from` on, trained on the activations that enter them,
            computed once for `views` views per image
            (`tlkit.fine_tuning.fine_tune_cached`); the frozen blocks below
            run once instead of every epoch, several times faster on a CPU.
        views: Feature views per training image (1 plain + views-1 augmented).
        augmentation: `tlkit.augment` preset for the extra views and fine-tuning.
        batch_size: Batch size for images, per replica.
        head_batch_size: Batch size for the head on cached features, per replica.
        learning_rate: Head learning rate.
        fine_tune_learning_rate: Learning rate after unfreezing.
        fine_tune_schedule: "constant" keeps `fine_tune_learning_rate` for
            every fine-tuning step; "cosine" starts there and decays it to 0
            over all fine-tuning steps (`keras.optimizers.schedules.CosineDecay`),
            which lets a short run end converged instead of at a noisy epoch.
        dropout_rate: Dropout before the classifier.
        class_weight: "auto" (balanced class weights when the largest
            training class has more than 1.5x the images of the smallest),
            "balanced" or "none"; used by the head and the fine-tuning.
        seed: Seed for splits, shuffling, augmentation and initialisation.
        backend: What runs the frozen base during feature extraction:
            "auto", "keras", "xla" or "litert" (see
            `tlkit.features.extract_features`); under a distribution
            strategy "auto" means "keras".
        deterministic: Make TensorFlow ops deterministic
            (`tf.config.experimental.enable_op_determinism`): the same seed on
            the same machine gives the same metrics. On a CPU it costs little;
            on a GPU some kernels get slower. It stays on for the process.
    """

    backbone: str = "efficientnet_lite0"
    image_size: int | None = None
    epochs: int = 20
    fine_tune_epochs: int = 0
    fine_tune_blocks: int = 2
    fine_tune_from: str | None = None
    fine_tune_on: str = "images"
    views: int = 1
    augmentation: str = "natural"
    batch_size: int = 32
    head_batch_size: int = 64
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    fine_tune_schedule: str = "constant"
    dropout_rate: float = 0.2
    class_weight: str = "auto"
    seed: int = 42
    backend: str = "auto"
    deterministic: bool = False

    def __post_init__(self):
        get_backbone(self.backbone)  # Raises on an unknown name, listing valid ones.
        for name in ("epochs", "fine_tune_epochs", "fine_tune_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{name} must be a non-negative integer. Received: {name}={value!r}"
                )
        if not isinstance(self.views, int) or self.views < 1:
            raise ValueError(f"views must be at least 1. Received: views={self.views!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {list(BACKENDS)}. Received: backend={self.backend!r}"
            )
        if self.class_weight not in CLASS_WEIGHT_MODES:
            raise ValueError(
                f"class_weight must be one of {list(CLASS_WEIGHT_MODES)}. "
                f"Received: class_weight={self.class_weight!r}"
            )
        if self.fine_tune_on not in FINE_TUNE_ON:
            raise ValueError(
                f"fine_tune_on must be one of {list(FINE_TUNE_ON)}. "
                f"Received: fine_tune_on={self.fine_tune_on!r}"
            )
        if self.fine_tune_schedule not in FINE_TUNE_SCHEDULES:
            raise ValueError(
                f"fine_tune_schedule must be one of {list(FINE_TUNE_SCHEDULES)}. "
                f"Received: fine_tune_schedule={self.fine_tune_schedule!r}"
            )
        if self.epochs == 0 and self.fine_tune_epochs == 0:
            raise ValueError("Nothing to train: epochs and fine_tune_epochs are both 0.")

    def validate(self) -> None:
        """Checks every setting before any work, so a bad one fails in a second.

        `__post_init__` checks the cheap ones; this also checks sizes, rates,
        the augmentation preset and, when fine-tuning, that `fine_tune_blocks`
        is not more than the backbone has (by building it once without
        weights). `train_run` and the command line call it first, before a run
        folder is created or an image is read.

        Raises:
            ValueError: On the first bad setting, naming it and the accepted
                values.
        """
        if self.image_size is not None and (not _is_int(self.image_size) or self.image_size < 32):
            raise ValueError(
                "image_size must be an integer of at least 32, or None for the backbone's "
                f"own ({get_backbone(self.backbone).image_size}). "
                f"Received: image_size={self.image_size!r}"
            )
        for name in ("batch_size", "head_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(
                    f"{name} must be a positive integer, e.g. 32. Received: {name}={value!r}"
                )
        for name in ("learning_rate", "fine_tune_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number. Received: {name}={value!r}")
        if not isinstance(self.dropout_rate, (int, float)) or not 0 <= self.dropout_rate < 1:
            raise ValueError(
                f"dropout_rate must be in [0, 1). Received: dropout_rate={self.dropout_rate!r}"
            )
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer. Received: seed={self.seed!r}")
        presets = sorted(list_presets())
        if self.augmentation is not None and self.augmentation not in presets:
            raise ValueError(
                f"augmentation must be one of {presets} or None. "
                f"Received: augmentation={self.augmentation!r}"
            )
        if self.fine_tune_epochs:
            names = _block_names(self.backbone)
            if self.fine_tune_from is not None and self.fine_tune_from not in names[1:]:
                raise ValueError(
                    f"fine_tune_from must name a block of {self.backbone} after the stem, one "
                    f"of {list(names[1:])}. Received: fine_tune_from={self.fine_tune_from!r}"
                )
            if self.fine_tune_from is None and self.fine_tune_blocks > len(names):
                raise ValueError(
                    f"fine_tune_blocks must be between 0 and {len(names)}, the blocks of "
                    f"{self.backbone}. Received: fine_tune_blocks={self.fine_tune_blocks}"
                )
            if self.fine_tune_on == "activations" and self.fine_tune_from is None:
                if not 1 <= self.fine_tune_blocks < len(names):
                    raise ValueError(
                        "Fine-tuning on activations needs at least one frozen block below "
                        f"(the stem at least): fine_tune_blocks between 1 and {len(names) - 1}. "
                        f"Received: fine_tune_blocks={self.fine_tune_blocks}"
                    )
            if self.fine_tune_on == "activations" and self.views > 1 and not self.augmentation:
                raise ValueError(
                    "views > 1 needs an augmentation preset for the extra views. "
                    f"Received: views={self.views}, augmentation={self.augmentation!r}"
                )

    def first_fine_tuned_block(self) -> str:
        """The first block that fine-tuning unfreezes (`fine_tune_from`, else counted)."""
        if self.fine_tune_from is not None:
            return self.fine_tune_from
        names = _block_names(self.backbone)
        return names[len(names) - self.fine_tune_blocks]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=None)
def _block_names(backbone: str) -> tuple[str, ...]:
    """The blocks `unfreeze` knows in a backbone (built once, without weights)."""
    return tuple(block_names(build_backbone(backbone, weights=None)))


@dataclass
class RunResult:
    """What a run produced: the model, its metrics and where they were written."""

    model: keras.Model
    metrics: dict
    histories: dict = field(default_factory=dict)
    out: Path | None = None


def prepare_run_folder(out: str | Path, overwrite: bool = False) -> Path:
    """Creates the run folder, refusing to overwrite a non-empty one.

    Raises:
        FileExistsError: If `out` exists, is not empty and `overwrite` is False.
        ValueError: If `out` cannot be created or written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"The run folder is a file. Choose another --out. Received: out={out}"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"The run folder {out} already holds a run. Choose another --out, or pass "
            f"--overwrite (overwrite=True) to replace its files. Received: out={out}"
        )
    check_writable_folder(out)
    return out


def check_writable_folder(out: Path) -> None:
    """Creates `out` and proves a file can be written there, or fails in one line.

    A real write is the only reliable test: `os.access` ignores what the
    superuser may do and says nothing of a full disk.

    Raises:
        ValueError: If the folder cannot be created (a regular file is on its
            path) or a file cannot be written into it (read-only filesystem,
            no permission).
    """
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(
            f"Cannot write the run folder {out}: {error.strerror or error}. Choose an --out "
            f"on a writable disk, not under a regular file. Received: out={out}"
        ) from error


def train_run(
    dataset,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log=print,
    strategy=None,
) -> RunResult:
    """Trains a transfer-learning classifier the fast way and evaluates it.

    1. Extract (and cache) frozen-base features, `views` per training image.
    2. Train the new head on those features.
    3. Optionally unfreeze the top blocks (BatchNorm frozen) and fine-tune on
       images with augmentation.
    4. Evaluate on the test split (else validation): without fine-tuning the
       base is unchanged, so the head runs on the split's cached features
       (the same numbers as the whole model on images, without a second pass
       of the base); after fine-tuning, end to end on images.

    With `fine_tune_on="activations"`, steps 1 and 3 change: the base is cut
    at `first_fine_tuned_block()`, the activations entering that block are
    computed once (cached, `views` per training image), the head is trained
    on the features the upper blocks make of them (no second pass of the
    base), and `fine_tune_cached` trains the upper blocks and the head on
    the cached activations (BatchNorm frozen).

    With a run folder, a checkpoint is written after the head phase and after
    every fine-tuning epoch on images (`out/checkpoints/`), each file
    atomically. Every epoch's shuffle order and random state derive from
    (seed, epoch) alone, so a run resumed with `resume=True` after being
    killed ends with the same result as an uninterrupted one. Fine-tuning on
    activations is one `fit` over all its epochs and has no per-epoch
    checkpoint: a resumed run restores the head and restarts that phase from
    its first epoch (from the cached activations, so only the fine-tuning
    epochs are repeated), with the same seeds, so it ends where an
    uninterrupted run would.

    Args:
        dataset: A `tlkit.data.ImageDataset`, or a catalog name or a
            class-per-folder path (`tlkit.data.source.resolve_data`: a folder
            without a validation split gets 20 % of it, seeded by
            `config.seed`).
        config: A `TrainConfig`. Defaults to `TrainConfig()`.
        out: Run folder to write, or None to write nothing. Defaults to None.
        overwrite: Replace files in an existing run folder. Defaults to False.
        resume: Continue the interrupted run in `out` from its last
            checkpoint. Defaults to False.
        progress: Show progress bars. Defaults to True.
        log: Function for short status lines. Defaults to `print`.
        strategy: A `tf.distribute.Strategy` (see `tlkit.distribute`), or
            None for one device. `batch_size` is per replica; the learning
            rates scale linearly with the number of replicas. Defaults to None.

    Returns:
        A `RunResult`.

    Raises:
        TypeError: If `dataset` is neither an `ImageDataset` nor a name or path.
        FileExistsError: If `out` holds a run and neither `overwrite` nor
            `resume` is set.
        ValueError: If `resume` finds no checkpoint, a finished run, or a
            checkpoint made with another config or other data.
    """
    config = config or TrainConfig()
    config.validate()  # Every setting, before a folder is made or an image read.
    if isinstance(dataset, str | os.PathLike):
        dataset = resolve_data(os.fspath(dataset), seed=config.seed, log=log)
    if not hasattr(dataset, "splits"):
        raise TypeError(
            "dataset must be a tlkit.data.ImageDataset (e.g. tlkit.data.load('tf_flowers')), a "
            f"catalog name or a class-per-folder path. Received: {type(dataset).__name__}"
        )
    if resume and out is None:
        raise ValueError("resume=True needs the run folder to resume. Received: out=None")
    if out is not None:
        out = prepare_run_folder(out, overwrite=overwrite or resume)
    run = _start_run(dataset, config, out, resume, progress, log, strategy)

    clock = time.perf_counter()
    with distribute.scope(strategy):
        base = build_feature_extractor(config.backbone, run.image_size)
    run.timings["build_s"] = time.perf_counter() - clock

    on_activations = bool(config.fine_tune_epochs) and config.fine_tune_on == "activations"
    if on_activations:
        train_features, validation_features = _extract_run_activations(run, base)
    else:
        train_features, validation_features = _extract_run_features(run, base)
    head = _train_run_head(run, train_features, validation_features)
    cache_hits = _cache_hits(train_features, validation_features)
    if on_activations:
        del train_features  # The fine-tuning reads the activations again from the cache.
        train_features = None
        model = _fine_tune_on_activations(run, base, head)
    else:
        with distribute.scope(strategy):
            model = build_classifier(
                config.backbone,
                dataset.num_classes,
                run.image_size,
                augmentation=config.augmentation if config.fine_tune_epochs else None,
                base=base,
                head=head,
                class_names=dataset.class_names,
            )
        if config.fine_tune_epochs:
            model = _fine_tune_with_checkpoints(run, model)
    metrics = _evaluate_run(run, model, base, head, validation_features)
    run.timings["total_s"] = time.perf_counter() - run.started
    metrics.update(_run_record(run, cache_hits))
    if out is not None:
        write_run(out, model, metrics, run.histories)
        run.save_state(head_done=True, fine_tune_epochs_done=config.fine_tune_epochs, complete=True)
        # The final model is model.keras; the per-epoch checkpoint is no longer needed.
        (run.checkpoints / "fine_tune.keras").unlink(missing_ok=True)
    return RunResult(model=model, metrics=metrics, histories=run.histories, out=out)


# ---------------------------------------------------------------------------
# The steps of a run
# ---------------------------------------------------------------------------


@dataclass
class _Run:
    """What the steps of one `train_run` share: settings resolved once, and progress."""

    dataset: Any
    config: TrainConfig
    image_size: int
    strategy: Any
    replicas: int
    batch_size: int
    learning_rate: float
    fine_tune_learning_rate: float
    class_weight: dict[int, float] | None
    class_imbalance: float
    backend: str
    fingerprints: dict[str, str]
    checkpoints: Path | None
    state: dict | None
    histories: dict[str, dict]
    timings: dict[str, float]
    started: float
    progress: bool
    log: Callable[[str], Any]

    def save_state(
        self, head_done: bool, fine_tune_epochs_done: int, complete: bool = False
    ) -> None:
        """Writes `checkpoints/state.json`: what is done, histories and timings so far."""
        write_json(
            self.checkpoints / "state.json",
            {
                "config": asdict(self.config),
                "fingerprints": self.fingerprints,
                "head_done": head_done,
                "fine_tune_epochs_done": fine_tune_epochs_done,
                "complete": complete,
                "histories": self.histories,
                "timings": {**self.timings, "total_s": time.perf_counter() - self.started},
            },
        )


def _start_run(dataset, config, out, resume, progress, log, strategy) -> _Run:
    """Resolves the settings of a run, loads its checkpoint state and seeds it."""
    # By content, like the feature cache: a `cp -p` copy with other pixels is other data.
    fingerprints = {name: split.content_fingerprint() for name, split in dataset.splits.items()}
    checkpoints = Path(out) / "checkpoints" if out is not None else None
    state = _load_state(checkpoints, config, fingerprints) if resume else None
    if config.deterministic:
        # Deterministic kernels: same seed, same machine, same result; slower on GPU.
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    image_size = resolve_input_config(config.image_size, backbone=config.backbone).image_size
    replicas = distribute.num_replicas(strategy)
    batch_size, learning_rate = distribute.scale_for_replicas(
        config.batch_size, config.learning_rate, strategy
    )
    timings: dict[str, float] = dict(state["timings"]) if state else {}
    class_weight, imbalance = choose_class_weight(
        config.class_weight, dataset.train.labels, dataset.num_classes
    )
    log(
        f"class weights: {'on' if class_weight else 'off'}, largest/smallest = {imbalance:.1f}"
        + (f" (class_weight={config.class_weight})" if config.class_weight != "auto" else "")
    )
    return _Run(
        dataset=dataset,
        config=config,
        image_size=image_size,
        strategy=strategy,
        replicas=replicas,
        batch_size=batch_size,
        learning_rate=learning_rate,
        fine_tune_learning_rate=config.fine_tune_learning_rate * replicas,
        class_weight=class_weight,
        class_imbalance=imbalance,
        # LiteRT runs outside TensorFlow's devices, so a strategy keeps the Keras path.
        backend="keras" if strategy is not None and config.backend == "auto" else config.backend,
        fingerprints=fingerprints,
        checkpoints=checkpoints,
        state=state,
        histories=dict(state["histories"]) if state else {},
        timings=timings,
        started=time.perf_counter() - timings.get("total_s", 0.0),
        progress=progress,
        log=log,
    )


def _extract_run_features(run: _Run, base: keras.Model):
    """Step 1: the (cached) features of the training and validation splits."""
    config = run.config
    clock = time.perf_counter()
    train_features = extract_features(
        base,
        run.dataset.train,
        run.image_size,
        views=config.views,
        augmentation=config.augmentation if config.views > 1 else None,
        seed=config.seed,
        progress=run.progress,
        backend=run.backend,
    )
    validation_split = run.dataset.validation
    validation_features = (
        extract_features(
            base, validation_split, run.image_size, progress=run.progress, backend=run.backend
        )
        if validation_split is not None
        else None
    )
    run.timings["feature_extraction_s"] = time.perf_counter() - clock
    cache_hits = _cache_hits(train_features, validation_features)
    run.log(
        f"Features: {len(train_features)} training vectors ({config.views} view(s) per image)"
        + (" from the cache" if all(cache_hits) else "")
        + f" in {run.timings['feature_extraction_s']:.1f} s."
    )
    return train_features, validation_features


def _extract_run_activations(run: _Run, base: keras.Model):
    """Step 1 on activations: lower-block activations (cached) and the features above them.

    The head is trained on `upper(activations)`, which equals the base's
    features, so the base never runs a second time over the images.
    """
    config = run.config
    clock = time.perf_counter()
    block = config.first_fine_tuned_block()
    lower, upper = split_at_block(base, block)

    def features(split, views):
        activations = extract_features(
            lower,
            split,
            run.image_size,
            views=views,
            augmentation=config.augmentation if views > 1 else None,
            seed=config.seed,
            progress=run.progress,
            backend=run.backend,
        )
        pooled = upper.predict(activations.features, batch_size=256, verbose=0)
        result = FeatureSet(pooled, activations.labels, views, activations.path)
        result.from_cache = activations.from_cache
        return result

    train_features = features(run.dataset.train, config.views)
    validation_split = run.dataset.validation
    validation_features = features(validation_split, 1) if validation_split is not None else None
    run.timings["feature_extraction_s"] = time.perf_counter() - clock
    run.log(
        f"Activations entering {block}: {len(train_features)} training rows "
        f"({config.views} view(s) per image)"
        + (" from the cache" if all(_cache_hits(train_features, validation_features)) else "")
        + f", features above them in {run.timings['feature_extraction_s']:.1f} s."
    )
    return train_features, validation_features


def _fine_tune_learning_rate(run: _Run, examples_per_epoch: int):
    """The fine-tuning learning rate: a float, or a cosine decay over all its steps."""
    config = run.config
    if config.fine_tune_schedule == "constant":
        return run.fine_tune_learning_rate
    steps = config.fine_tune_epochs * math.ceil(examples_per_epoch / run.batch_size)
    return keras.optimizers.schedules.CosineDecay(run.fine_tune_learning_rate, max(steps, 1))


def _fine_tune_on_activations(run: _Run, base: keras.Model, head: keras.Model) -> keras.Model:
    """Step 3 on activations: `fine_tune_cached` from the first fine-tuned block.

    One `fit` over all epochs; a resumed run repeats this whole phase (see
    `train_run`). The random state is reseeded first, so the phase does the
    same whether or not the head was restored from a checkpoint.
    """
    config = run.config
    block = config.first_fine_tuned_block()
    run.log(
        f"Fine-tuning from {block} on cached activations for {config.fine_tune_epochs} "
        f"epoch(s) (BatchNorm frozen)..."
    )
    # Dropout draws from each layer's own generator, which a restored head has not advanced.
    keras.utils.set_random_seed(config.seed + 1)
    reseed_layers(head, config.seed * 1000)
    reseed_layers(base, config.seed * 1000 + 500)
    clock = time.perf_counter()
    with distribute.scope(run.strategy):
        model, history = fine_tune_cached(
            base,
            head,
            run.dataset.train,
            run.dataset.validation,
            block=block,
            views=config.views,
            augmentation=config.augmentation if config.views > 1 else None,
            augmentation_seed=config.seed,
            epochs=config.fine_tune_epochs,
            batch_size=run.batch_size,
            learning_rate=_fine_tune_learning_rate(run, len(run.dataset.train) * config.views),
            seed=config.seed,
            progress=run.progress,
            verbose=1 if run.progress else 0,
            class_weight=run.class_weight,
        )
    run.histories["fine_tune"] = history
    run.timings["fine_tuning_s"] = time.perf_counter() - clock
    run.log(
        f"Fine-tuning: {config.fine_tune_epochs} epoch(s) in {run.timings['fine_tuning_s']:.1f} s."
    )
    return model


def _cache_hits(train_features, validation_features) -> list[bool]:
    return [f.from_cache for f in (train_features, validation_features) if f is not None]


def _train_run_head(run: _Run, train_features, validation_features) -> keras.Model:
    """Step 2: the head trained on cached features, or restored from the checkpoint."""
    config = run.config
    # Reseed: computing features (a cache miss) creates random ops that a cache hit
    # does not, and the head must not depend on which happened.
    keras.utils.set_random_seed(config.seed)
    with distribute.scope(run.strategy):
        head = build_head(
            get_backbone(config.backbone).feature_width,
            run.dataset.num_classes,
            config.dropout_rate,
        )
    if run.state and run.state["head_done"]:
        head.load_weights(str(run.checkpoints / "head.weights.h5"))
        run.log("Head: restored from the checkpoint.")
        return head
    clock = time.perf_counter()
    if config.epochs:
        with distribute.scope(run.strategy):
            run.histories["head"] = train_head(
                head,
                train_features,
                validation_features,
                epochs=config.epochs,
                batch_size=config.head_batch_size * run.replicas,
                learning_rate=run.learning_rate,
                seed=config.seed,
                class_weight=run.class_weight,
            )
    run.timings["head_training_s"] = time.perf_counter() - clock
    run.log(
        f"Head: {config.epochs} epochs on cached features "
        f"in {run.timings['head_training_s']:.1f} s."
    )
    if run.checkpoints is not None:
        with atomic_path(run.checkpoints / "head.weights.h5") as temporary:
            head.save_weights(str(temporary))
        run.save_state(head_done=True, fine_tune_epochs_done=0)
    return head


def _fine_tune_with_checkpoints(run: _Run, model: keras.Model) -> keras.Model:
    """Step 3: fine-tunes epoch by epoch, checkpointing model and optimizer after each."""
    config = run.config
    first_epoch = run.state["fine_tune_epochs_done"] if run.state else 0
    checkpoint = run.checkpoints / "fine_tune.keras" if run.checkpoints is not None else None
    if first_epoch:
        with distribute.scope(run.strategy):
            # Safe mode: the checkpoint is our own file, but loading never runs code.
            model = keras.models.load_model(checkpoint, safe_mode=True)
        run.log(f"Fine-tuning: resumed after epoch {first_epoch} of {config.fine_tune_epochs}.")
    else:
        with distribute.scope(run.strategy):
            blocks = unfreeze(
                model,
                config.fine_tune_from or config.fine_tune_blocks,
                _fine_tune_learning_rate(run, len(run.dataset.train)),
            )
        run.log(f"Fine-tuning blocks {', '.join(blocks)} for {config.fine_tune_epochs} epoch(s)...")
    clock = time.perf_counter()

    def after_epoch(epoch: int, history: dict[str, list[float]]) -> None:
        nonlocal clock
        run.histories["fine_tune"] = history
        elapsed = time.perf_counter() - clock
        run.timings["fine_tuning_s"] = run.timings.get("fine_tuning_s", 0.0) + elapsed
        clock = time.perf_counter()
        if checkpoint is not None:
            with atomic_path(checkpoint) as temporary:
                model.save(temporary)
            run.save_state(head_done=True, fine_tune_epochs_done=epoch + 1)

    fine_tune_split(
        model,
        run.dataset.train,
        run.dataset.validation,
        image_size=run.image_size,
        epochs=config.fine_tune_epochs,
        batch_size=run.batch_size,
        seed=config.seed,
        first_epoch=first_epoch,
        history=run.histories.get("fine_tune", {}),
        on_epoch_end=after_epoch,
        verbose=1 if run.progress else 0,
        class_weight=run.class_weight,
    )
    return model


def _evaluate_run(run: _Run, model, base, head, validation_features) -> dict:
    """Step 4: metrics on the test split (else validation), from features or images.

    For two classes, a decision threshold is chosen on the validation split
    (`evaluation.choose_threshold`, Youden's J), stored in the model
    (`set_decision_threshold`, so `predict` uses it) and the test metrics at
    that threshold are added under `at_threshold`.
    """
    config = run.config
    dataset = run.dataset
    clock = time.perf_counter()
    evaluation_split = dataset.test if dataset.test is not None else dataset.validation
    metrics: dict = {}
    if evaluation_split is not None:
        probabilities, labels = _split_probabilities(
            run, model, base, head, evaluation_split, validation_features
        )
        metrics = evaluation.classification_metrics(labels, probabilities, dataset.class_names)
        metrics["evaluated_on"] = evaluation_split.name
        metrics["evaluated_from"] = "images" if config.fine_tune_epochs else "cached features"
        if dataset.num_classes == 2 and dataset.validation is not None:
            if evaluation_split is dataset.validation:
                validation_probabilities, validation_labels = probabilities, labels
            else:
                validation_probabilities, validation_labels = _split_probabilities(
                    run, model, base, head, dataset.validation, validation_features
                )
            threshold = evaluation.choose_threshold(
                validation_labels, validation_probabilities[:, 1]
            )
            set_decision_threshold(model, threshold)
            metrics["at_threshold"] = {
                **evaluation.binary_metrics_at_threshold(labels, probabilities[:, 1], threshold),
                "rule": evaluation.THRESHOLD_RULE,
                "positive_class": dataset.class_names[1],
            }
            run.log(
                f"Decision threshold {threshold:.3f} on p({dataset.class_names[1]}), chosen by "
                f"{evaluation.THRESHOLD_RULE}; saved in the model."
            )
    run.timings["evaluation_s"] = time.perf_counter() - clock
    return metrics


def _split_probabilities(run: _Run, model, base, head, split, validation_features):
    """Class probabilities and labels of a split: from cached features when the base is
    unchanged (no fine-tuning), else end to end on images."""
    if run.config.fine_tune_epochs:
        return predict_split(model, split, run.image_size, run.batch_size * 2)
    features = (
        validation_features
        if split is run.dataset.validation and validation_features is not None
        else extract_features(
            base, split, run.image_size, progress=run.progress, backend=run.backend
        )
    )
    return head.predict(features.features, batch_size=1024, verbose=0), features.labels


def _run_record(run: _Run, cache_hits: list[bool]) -> dict:
    """What `metrics.json` records besides the metrics: data, settings, timings, versions."""
    dataset = run.dataset
    return {
        "dataset": {
            "name": dataset.name,
            "class_names": dataset.class_names,
            "sizes": {name: len(split) for name, split in dataset.splits.items()},
            "fingerprints": run.fingerprints,
            "skipped_files": [list(item) for item in dataset.report.skipped],
        },
        "config": {**asdict(run.config), "image_size": run.image_size},
        "distribution": {
            "replicas": run.replicas,
            "global_batch_size": run.batch_size,
            "learning_rate": run.learning_rate,
            "fine_tune_learning_rate": run.fine_tune_learning_rate,
        },
        "class_weight": {
            "mode": run.config.class_weight,
            "on": run.class_weight is not None,
            "largest_over_smallest": (
                run.class_imbalance if np.isfinite(run.class_imbalance) else None
            ),
            "weights": run.class_weight,
        },
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "feature_cache": {"hits": cache_hits},
        "resumed": bool(run.state),
        "seed": run.config.seed,
        "versions": versions(),
        "histories": run.histories,
    }


def _load_state(checkpoints, config, fingerprints) -> dict:
    path = checkpoints / "state.json"
    if not path.is_file():
        raise ValueError(
            f"Nothing to resume: {path} does not exist. Start the run without --resume. "
            f"Received: out={checkpoints.parent}"
        )
    state = json.loads(path.read_text())
    if state.get("complete"):
        raise ValueError(
            f"The run in {checkpoints.parent} already finished; nothing to resume. "
            "Use another --out, or --overwrite to train it again."
        )
    if state["config"] != json.loads(json.dumps(asdict(config))):
        changed = sorted(k for k in state["config"] if state["config"][k] != asdict(config).get(k))
        raise ValueError(
            "The checkpoint was made with other settings; resume with the same ones. "
            f"Received: changed settings {changed}"
        )
    if state["fingerprints"] != fingerprints:
        raise ValueError(
            "The data changed since the checkpoint was written; resume with the same data. "
            f"Received: splits {sorted(fingerprints)}"
        )
    return state


def predict_split(model: keras.Model, split, image_size: int, batch_size: int = 64):
    """Class probabilities and true labels for every readable image of a split."""
    # A compiled forward pass (one per model) rather than predict_on_batch, which returns
    # one row per replica and image under a tf.distribute strategy.
    forward = inference_function(model, jit_compile=False)
    probabilities, labels = [], []
    for images, targets in split.to_dataset(image_size, batch_size=batch_size):
        probabilities.append(forward(images).numpy())
        labels.append(targets.numpy())
    return np.concatenate(probabilities), np.concatenate(labels)


def write_run(out: Path, model: keras.Model, metrics: dict, histories: dict) -> None:
    """Writes the model, metrics and plots of a run, each file atomically."""
    with atomic_path(out / "model.keras") as temporary:
        model.save(temporary)
    write_json(out / "metrics.json", metrics)
    if histories:
        evaluation.plot_training_curves(histories, out / "training_curves.png")
    if "confusion_matrix" in metrics:
        evaluation.plot_confusion_matrix(
            np.asarray(metrics["confusion_matrix"]),
            metrics["dataset"]["class_names"],
            out / "confusion_matrix.png",
        )


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    import tensorflow as tf

    return {
        "tlkit": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
