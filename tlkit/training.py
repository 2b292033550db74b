"""The main job: feature-cache training, optional fine-tuning, evaluation, a run folder.

`train_run` is what `python -m tlkit train` calls; notebooks can call it too.
A run folder holds `model.keras`, `metrics.json`, `training_curves.png` and
`confusion_matrix.png`. An existing, non-empty run folder is never
overwritten unless `overwrite=True`.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from tlkit import distribute, evaluation
from tlkit._io import atomic_path, write_json
from tlkit._keras_compat import flatten_layers, seed_generators
from tlkit._version import __version__
from tlkit.backbones import get_backbone
from tlkit.features import extract_features
from tlkit.heads import build_head, train_head
from tlkit.inference import BACKENDS, inference_function
from tlkit.input_config import resolve_input_config
from tlkit.models import build_classifier, build_feature_extractor, unfreeze


@dataclass
class TrainConfig:
    """Settings of a training run; every field has a sensible default.

    Attributes:
        backbone: Registry name of the pretrained base.
        image_size: Square input size; None means the backbone's default.
        epochs: Head epochs on cached features.
        fine_tune_epochs: Epochs with the top blocks unfrozen (on images).
        fine_tune_blocks: How many blocks to unfreeze, counted from the output.
        views: Feature views per training image (1 plain + views-1 augmented).
        augmentation: `tlkit.augment` preset for the extra views and fine-tuning.
        batch_size: Batch size for images, per replica.
        head_batch_size: Batch size for the head on cached features, per replica.
        learning_rate: Head learning rate.
        fine_tune_learning_rate: Learning rate after unfreezing.
        dropout_rate: Dropout before the classifier.
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
    views: int = 1
    augmentation: str = "natural"
    batch_size: int = 32
    head_batch_size: int = 64
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    dropout_rate: float = 0.2
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
        if self.epochs == 0 and self.fine_tune_epochs == 0:
            raise ValueError("Nothing to train: epochs and fine_tune_epochs are both 0.")


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
    out.mkdir(parents=True, exist_ok=True)
    return out


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

    With a run folder, a checkpoint is written after the head phase and after
    every fine-tuning epoch (`out/checkpoints/`), each file atomically. Every
    epoch's shuffle order and random state derive from (seed, epoch) alone, so
    a run resumed with `resume=True` after being killed ends with the same
    result as an uninterrupted one.

    Args:
        dataset: A `tlkit.data.ImageDataset`.
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
        FileExistsError: If `out` holds a run and neither `overwrite` nor
            `resume` is set.
        ValueError: If `resume` finds no checkpoint, a finished run, or a
            checkpoint made with another config or other data.
    """
    config = config or TrainConfig()
    if resume and out is None:
        raise ValueError("resume=True needs the run folder to resume. Received: out=None")
    if out is not None:
        out = prepare_run_folder(out, overwrite=overwrite or resume)
    fingerprints = {name: split.fingerprint() for name, split in dataset.splits.items()}
    checkpoints = Path(out) / "checkpoints" if out is not None else None
    state = _load_state(checkpoints, config, fingerprints) if resume else None
    if config.deterministic:
        # Deterministic kernels: same seed, same machine, same result; slower on GPU.
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    spec = get_backbone(config.backbone)
    image_size = resolve_input_config(config.image_size, backbone=config.backbone).image_size
    replicas = distribute.num_replicas(strategy)
    batch_size, learning_rate = distribute.scale_for_replicas(
        config.batch_size, config.learning_rate, strategy
    )
    fine_tune_learning_rate = config.fine_tune_learning_rate * replicas
    timings: dict[str, float] = dict(state["timings"]) if state else {}
    started = time.perf_counter() - timings.get("total_s", 0.0)

    clock = time.perf_counter()
    with distribute.scope(strategy):
        base = build_feature_extractor(config.backbone, image_size)
    timings["build_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    # LiteRT runs outside TensorFlow's devices, so a strategy keeps the Keras path.
    backend = "keras" if strategy is not None and config.backend == "auto" else config.backend
    train_features = extract_features(
        base,
        dataset.train,
        image_size,
        views=config.views,
        augmentation=config.augmentation if config.views > 1 else None,
        seed=config.seed,
        progress=progress,
        backend=backend,
    )
    validation_split = dataset.validation
    validation_features = (
        extract_features(base, validation_split, image_size, progress=progress, backend=backend)
        if validation_split is not None
        else None
    )
    timings["feature_extraction_s"] = time.perf_counter() - clock
    cache_hits = [f.from_cache for f in (train_features, validation_features) if f is not None]
    log(
        f"Features: {len(train_features)} training vectors ({config.views} view(s) per image)"
        + (" from the cache" if all(cache_hits) else "")
        + f" in {timings['feature_extraction_s']:.1f} s."
    )

    histories: dict[str, dict] = dict(state["histories"]) if state else {}
    # Reseed: computing features (a cache miss) creates random ops that a cache hit
    # does not, and the head must not depend on which happened.
    keras.utils.set_random_seed(config.seed)
    with distribute.scope(strategy):
        head = build_head(spec.feature_width, dataset.num_classes, config.dropout_rate)
    if state and state["head_done"]:
        head.load_weights(str(checkpoints / "head.weights.h5"))
        log("Head: restored from the checkpoint.")
    else:
        clock = time.perf_counter()
        if config.epochs:
            with distribute.scope(strategy):
                histories["head"] = train_head(
                    head,
                    train_features,
                    validation_features,
                    epochs=config.epochs,
                    batch_size=config.head_batch_size * replicas,
                    learning_rate=learning_rate,
                    seed=config.seed,
                )
        timings["head_training_s"] = time.perf_counter() - clock
        log(
            f"Head: {config.epochs} epochs on cached features in {timings['head_training_s']:.1f} s."
        )
        if checkpoints is not None:
            with atomic_path(checkpoints / "head.weights.h5") as temporary:
                head.save_weights(str(temporary))
            _save_state(checkpoints, config, fingerprints, True, 0, histories, timings, started)

    with distribute.scope(strategy):
        model = build_classifier(
            config.backbone,
            dataset.num_classes,
            image_size,
            augmentation=config.augmentation if config.fine_tune_epochs else None,
            base=base,
            head=head,
            class_names=dataset.class_names,
        )
    if config.fine_tune_epochs:
        model = _fine_tune_with_checkpoints(
            model,
            dataset,
            config,
            image_size,
            batch_size,
            fine_tune_learning_rate,
            strategy,
            checkpoints,
            state,
            histories,
            timings,
            started,
            fingerprints,
            progress,
            log,
        )

    clock = time.perf_counter()
    evaluation_split = dataset.test if dataset.test is not None else validation_split
    metrics: dict = {}
    if evaluation_split is not None:
        if config.fine_tune_epochs:
            probabilities, labels = predict_split(
                model, evaluation_split, image_size, batch_size * 2
            )
        else:
            evaluation_features = (
                validation_features
                if evaluation_split is validation_split
                else extract_features(
                    base, evaluation_split, image_size, progress=progress, backend=backend
                )
            )
            probabilities = head.predict(evaluation_features.features, batch_size=1024, verbose=0)
            labels = evaluation_features.labels
        metrics = evaluation.classification_metrics(labels, probabilities, dataset.class_names)
        metrics["evaluated_on"] = evaluation_split.name
        metrics["evaluated_from"] = "images" if config.fine_tune_epochs else "cached features"
    timings["evaluation_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - started

    metrics.update(
        {
            "dataset": {
                "name": dataset.name,
                "class_names": dataset.class_names,
                "sizes": {name: len(split) for name, split in dataset.splits.items()},
                "fingerprints": fingerprints,
                "skipped_files": [list(item) for item in dataset.report.skipped],
            },
            "config": {**asdict(config), "image_size": image_size},
            "distribution": {
                "replicas": replicas,
                "global_batch_size": batch_size,
                "learning_rate": learning_rate,
                "fine_tune_learning_rate": fine_tune_learning_rate,
            },
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "feature_cache": {"hits": cache_hits},
            "resumed": bool(state),
            "seed": config.seed,
            "versions": versions(),
            "histories": histories,
        }
    )
    if out is not None:
        write_run(out, model, metrics, histories)
        _save_state(
            checkpoints,
            config,
            fingerprints,
            True,
            config.fine_tune_epochs,
            histories,
            timings,
            started,
            complete=True,
        )
        # The final model is model.keras; the per-epoch checkpoint is no longer needed.
        (checkpoints / "fine_tune.keras").unlink(missing_ok=True)
    return RunResult(model=model, metrics=metrics, histories=histories, out=out)


def _fine_tune_with_checkpoints(
    model,
    dataset,
    config,
    image_size,
    batch_size,
    learning_rate,
    strategy,
    checkpoints,
    state,
    histories,
    timings,
    started,
    fingerprints,
    progress,
    log,
):
    """Fine-tunes epoch by epoch, checkpointing model and optimizer after each."""
    first_epoch = state["fine_tune_epochs_done"] if state else 0
    checkpoint = checkpoints / "fine_tune.keras" if checkpoints is not None else None
    if first_epoch:
        with distribute.scope(strategy):
            # Safe mode: the checkpoint is our own file, but loading never runs code.
            model = keras.models.load_model(checkpoint, safe_mode=True)
        log(f"Fine-tuning: resumed after epoch {first_epoch} of {config.fine_tune_epochs}.")
    else:
        with distribute.scope(strategy):
            blocks = unfreeze(model, config.fine_tune_blocks, learning_rate)
        log(f"Fine-tuning blocks {', '.join(blocks)} for {config.fine_tune_epochs} epoch(s)...")
    validation_images = (
        dataset.validation.to_dataset(image_size, batch_size=batch_size * 2)
        if dataset.validation is not None
        else None
    )
    history = {key: list(values) for key, values in histories.get("fine_tune", {}).items()}
    clock = time.perf_counter()
    for epoch in range(first_epoch, config.fine_tune_epochs):
        # Shuffle order and random draws depend on (seed, epoch) only, so a resumed
        # run repeats exactly what the uninterrupted one would have done.
        keras.utils.set_random_seed(config.seed + 1 + epoch)
        reseed_layers(model, config.seed * 1000 + epoch)
        train_images = dataset.train.to_dataset(
            image_size, batch_size=batch_size, shuffle=True, seed=config.seed + epoch
        )
        result = model.fit(
            train_images,
            validation_data=validation_images,
            initial_epoch=epoch,
            epochs=epoch + 1,
            verbose=1 if progress else 0,
            shuffle=False,  # The dataset shuffles itself.
        )
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        histories["fine_tune"] = history
        timings["fine_tuning_s"] = timings.get("fine_tuning_s", 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()
        if checkpoint is not None:
            with atomic_path(checkpoint) as temporary:
                model.save(temporary)
            _save_state(
                checkpoints, config, fingerprints, True, epoch + 1, histories, timings, started
            )
    return model


def reseed_layers(model: keras.Model, seed: int) -> None:
    """Sets the random state of every augmentation and dropout layer from `seed`.

    Keras layers draw from their own `SeedGenerator`, whose state is not saved
    with the model and which `keras.utils.set_random_seed` does not reset, so a
    resumed run would draw other random numbers than the uninterrupted one.
    Keras has no public call to reseed built layers; this sets the states.

    Args:
        model: The model; nested models are included.
        seed: The seed; layer `i` gets state `(seed + i, 0)`.
    """
    generators = [
        generator
        for layer in flatten_layers(model, include_self=True)
        for generator in seed_generators(layer)
    ]
    for index, generator in enumerate(generators):
        generator.state.assign(np.asarray([seed + index, 0], dtype=generator.state.dtype))


def _save_state(
    checkpoints,
    config,
    fingerprints,
    head_done,
    fine_tune_epochs_done,
    histories,
    timings,
    started,
    complete=False,
):
    write_json(
        checkpoints / "state.json",
        {
            "config": asdict(config),
            "fingerprints": fingerprints,
            "head_done": head_done,
            "fine_tune_epochs_done": fine_tune_epochs_done,
            "complete": complete,
            "histories": histories,
            "timings": {**timings, "total_s": time.perf_counter() - started},
        },
    )


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
