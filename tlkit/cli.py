"""The command line: `python -m tlkit train | predict | backbones | export | doctor | datasets`.

All argparse wiring lives here; defaults and choices are read from where they
are defined (`TrainConfig`, the backend, strategy and export-format lists), so
the command line cannot drift from the library. Importing `tlkit` first sets
TF_CPP_MIN_LOG_LEVEL=2 unless it is set.

`train` with no recipe flag (`RECIPE_FLAGS`) chooses its recipe on the
validation split within `--budget` (`tlkit.recipe_search.train_with_search`);
any recipe flag trains exactly that recipe (`--recipe search` searches anyway,
those flags fixed; `--recipe fast` never searches). `--resume` of a searched
run continues its final run with the recipe recorded in `recipe_search.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlkit import data as tlkit_data
from tlkit._io import write_json
from tlkit.backbones import get_backbone, list_backbones
from tlkit.data.source import DEMO_DATASET, FALLBACK_DATASET, resolve_data
from tlkit.distribute import STRATEGIES, get_strategy
from tlkit.evaluation import format_summary
from tlkit.export import FORMATS, export_command
from tlkit.heads import CLASS_WEIGHT_MODES
from tlkit.inference import BACKENDS
from tlkit.models import get_class_names, get_decision_threshold
from tlkit.predict import load_classifier, predict_files
from tlkit.preflight import doctor_command
from tlkit.recipe_search import DEFAULT_BUDGET_S, train_with_search
from tlkit.scratch import compare_with_scratch
from tlkit.training import (
    FINE_TUNE_ON,
    FINE_TUNE_SCHEDULES,
    TrainConfig,
    prepare_run_folder,
    train_run,
)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if not getattr(arguments, "command", None):
        parser.print_help()
        return 2
    try:
        return arguments.handler(arguments)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # User errors: one clear line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # A disk that refuses a write (read-only, full, no permission): one line too.
        print(
            f"error: {error.strerror or error} ({error.filename or 'a file'}). Check that the "
            "folder exists and is writable, or choose another --out.",
            file=sys.stderr,
        )
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tlkit", description="Transfer learning for image classification."
    )
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser(
        "train",
        help="train a classifier on a folder of images or a named dataset",
        description="Trains a frozen-base classifier with the feature cache, optionally "
        "fine-tunes the top blocks, evaluates and writes a run folder.",
    )
    train.add_argument(
        "data",
        nargs="?",
        default=None,
        help="a class-per-folder image directory, or a dataset name (see `datasets`). "
        f"Default: {DEMO_DATASET} when available, else the embedded {FALLBACK_DATASET}.",
    )
    recipe = train.add_argument_group(
        "recipe",
        "With none of these flags, train chooses the recipe on the validation split within "
        "--budget (tlkit.recipe_search); with any of them it trains exactly that recipe, "
        "TrainConfig's defaults for the rest (see --recipe).",
    )
    recipe.add_argument(
        "--recipe",
        default="auto",
        choices=RECIPE_MODES,
        help="auto: search when no recipe flag is given, else the given recipe; search: "
        "search, the given recipe flags fixing those choices; fast: no search, today's "
        f"single fast path ({TrainConfig.backbone}, head only) (default: %(default)s)",
    )
    recipe.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds for the search and the final run together (default: %(default)g, "
        "suited to a 2-core CPU)",
    )
    recipe.add_argument(
        "--backbone", default=None, help=f"see `backbones` (default: {TrainConfig.backbone})"
    )
    recipe.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size in pixels (default: the backbone's)",
    )
    recipe.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"head epochs on cached features (default: {TrainConfig.epochs})",
    )
    recipe.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=None,
        help=f"epochs with the top blocks unfrozen (default: {TrainConfig.fine_tune_epochs})",
    )
    recipe.add_argument(
        "--fine-tune-blocks",
        type=int,
        default=None,
        help=f"blocks to unfreeze (default: {TrainConfig.fine_tune_blocks})",
    )
    recipe.add_argument(
        "--fine-tune-from",
        default=None,
        metavar="BLOCK",
        help="first block to unfreeze, e.g. block3 (that block and all after it); "
        "overrides --fine-tune-blocks",
    )
    recipe.add_argument(
        "--fine-tune-on",
        default=None,
        choices=FINE_TUNE_ON,
        help="images: the whole model on images, fresh augmentation every epoch; "
        "activations: the top blocks on cached lower-block activations (--views views per "
        f"image), several times faster on a CPU (default: {TrainConfig.fine_tune_on})",
    )
    recipe.add_argument(
        "--fine-tune-learning-rate",
        type=float,
        default=None,
        help="Adam learning rate after unfreezing "
        f"(default: {TrainConfig.fine_tune_learning_rate:g})",
    )
    recipe.add_argument(
        "--fine-tune-schedule",
        default=None,
        choices=FINE_TUNE_SCHEDULES,
        help="constant: --fine-tune-learning-rate throughout; cosine: decayed from it to 0 over "
        f"the fine-tuning steps (default: {TrainConfig.fine_tune_schedule})",
    )
    recipe.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Adam learning rate of the head on cached features "
        f"(default: {TrainConfig.learning_rate:g})",
    )
    recipe.add_argument(
        "--dropout",
        type=float,
        default=None,
        help=f"dropout before the classifier (default: {TrainConfig.dropout_rate})",
    )
    recipe.add_argument(
        "--views",
        type=int,
        default=None,
        help="feature views per training image, extra ones augmented "
        f"(default: {TrainConfig.views})",
    )
    recipe.add_argument(
        "--augmentation",
        default=None,
        help=f"augmentation preset (default: {TrainConfig.augmentation})",
    )
    train.add_argument(
        "--class-weight",
        default=TrainConfig.class_weight,
        choices=CLASS_WEIGHT_MODES,
        help="auto: balanced class weights when the largest class has over 1.5x the images "
        "of the smallest; also in every candidate of the search (default: %(default)s)",
    )
    train.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    train.add_argument("--seed", type=int, default=TrainConfig.seed)
    train.add_argument(
        "--validation-split",
        type=float,
        default=0.2,
        help="for folders without a validation split (default: %(default)s)",
    )
    train.add_argument(
        "--out", default=None, help="run folder (default: runs/<dataset>-<backbone>)"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace the files of an existing run folder"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last checkpoint",
    )
    train.add_argument(
        "--backend",
        default=TrainConfig.backend,
        choices=BACKENDS,
        help="what runs the frozen base for feature extraction; auto = LiteRT on a CPU "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic TensorFlow ops: same seed, same metrics",
    )
    train.add_argument(
        "--strategy",
        default="none",
        choices=STRATEGIES,
        help="tf.distribute strategy; --batch-size is per replica (default: %(default)s)",
    )
    train.add_argument(
        "--compare-scratch",
        action="store_true",
        help="also train a small CNN from scratch for the same wall time",
    )
    train.add_argument(
        "--compare-seconds",
        type=float,
        default=120.0,
        help="minimum wall time for --compare-scratch (default: %(default)s)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    predict = commands.add_parser("predict", help="print the top classes for images")
    predict.add_argument("model", help="a model.keras written by `train`")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--top-k", type=int, default=3)
    predict.set_defaults(handler=_predict)

    backbones = commands.add_parser("backbones", help="list the pretrained backbones")
    backbones.set_defaults(handler=_backbones)

    export = commands.add_parser(
        "export",
        help="export a trained model (SavedModel, LiteRT/TFLite float and int8, ONNX), "
        "checked against Keras",
    )
    export.add_argument("model", help="a model.keras written by `train`")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument(
        "--data",
        default=None,
        help="a folder or dataset name: real images to check every export against Keras "
        "and to calibrate int8",
    )
    export.add_argument(
        "--formats",
        nargs="+",
        default=None,
        help=f"any of {' '.join(FORMATS)} (default: all; int8 needs --data)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in --out"
    )
    export.set_defaults(handler=_export)

    add_doctor_command(commands)

    datasets = commands.add_parser("datasets", help="list the named datasets")
    datasets.set_defaults(handler=_datasets)
    return parser


def add_doctor_command(subparsers) -> argparse.ArgumentParser:
    """Adds `doctor DATA [--model M] [--no-near-duplicates] [--json]` to a CLI.

    Args:
        subparsers: The object returned by `ArgumentParser.add_subparsers()`;
            the command sets `handler`, called with the parsed arguments.

    Returns:
        The new sub-parser.
    """
    parser = subparsers.add_parser(
        "doctor", help="check data (and a model) for what usually ruins a training run"
    )
    parser.add_argument("data", help="a folder of class sub-folders, or a dataset name")
    parser.add_argument("--model", default=None, help="a .keras model to check against the data")
    parser.add_argument(
        "--no-near-duplicates",
        dest="near_duplicates",
        action="store_false",
        help="skip the perceptual-hash search for near-identical images",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    parser.set_defaults(
        handler=lambda arguments: doctor_command(
            arguments.data, arguments.model, arguments.near_duplicates, arguments.as_json
        )
    )
    return parser


def validate_train_arguments(arguments) -> None:
    """Checks the `train` options that `TrainConfig` does not hold, before any work.

    Raises:
        ValueError: On a validation split outside [0, 1) or a non-positive
            `--compare-seconds`.
    """
    split = arguments.validation_split
    if not 0.0 <= split < 1.0:
        raise ValueError(
            f"--validation-split must be a fraction in [0, 1), e.g. 0.2. Received: "
            f"validation_split={split!r}"
        )
    if not arguments.compare_seconds > 0:
        raise ValueError(
            "--compare-seconds must be a positive number of seconds. "
            f"Received: compare_seconds={arguments.compare_seconds!r}"
        )


def validate_evaluation_splits(dataset, validation_split: float) -> None:
    """Refuses a dataset with nothing to evaluate on, before features are extracted.

    A run evaluates on the test split, else the validation split. With
    neither (`--validation-split 0` on a plain class-per-folder directory) its
    metrics.json would hold no accuracy, so the run is refused up front.

    Raises:
        ValueError: If the dataset has neither a validation nor a test split.
    """
    if dataset.validation is None and dataset.test is None:
        raise ValueError(
            f"Nothing to evaluate on: {dataset.name} has no validation or test split, so the "
            "run would end without an accuracy. Use --validation-split above 0 (e.g. 0.2), or "
            "a folder with train/ and test/ (or validation/) sub-folders. "
            f"Received: validation_split={validation_split!r}"
        )


# `train` flags that set a recipe field (`tlkit.recipe_search.RECIPE_FIELDS`): dest -> field.
RECIPE_FLAGS = {
    "backbone": "backbone",
    "image_size": "image_size",
    "epochs": "epochs",
    "fine_tune_epochs": "fine_tune_epochs",
    "fine_tune_blocks": "fine_tune_blocks",
    "fine_tune_from": "fine_tune_from",
    "fine_tune_on": "fine_tune_on",
    "fine_tune_learning_rate": "fine_tune_learning_rate",
    "fine_tune_schedule": "fine_tune_schedule",
    "learning_rate": "learning_rate",
    "dropout": "dropout_rate",
    "views": "views",
    "augmentation": "augmentation",
}
RECIPE_MODES = ("auto", "search", "fast")


def _train(arguments) -> int:
    given = {
        field: getattr(arguments, dest)
        for dest, field in RECIPE_FLAGS.items()
        if getattr(arguments, dest) is not None
    }
    search = arguments.recipe == "search" or (arguments.recipe == "auto" and not given)
    config = TrainConfig(
        **given,
        class_weight=arguments.class_weight,
        batch_size=arguments.batch_size,
        seed=arguments.seed,
        backend=arguments.backend,
        deterministic=arguments.deterministic,
    )
    if arguments.out:
        out = Path(arguments.out)
    else:
        name = Path(arguments.data).name if arguments.data else "demo"
        out = Path("runs") / f"{name}-{'search' if search else config.backbone}"
    if arguments.resume and not arguments.out:
        raise ValueError("--resume needs the --out folder of the run to continue.")
    validate_train_arguments(arguments)
    # The strategy first: MultiWorkerMirroredStrategy must exist before other TensorFlow ops.
    strategy = get_strategy(arguments.strategy)
    config.validate()  # Every setting, before a folder is made or an image read.
    created = not out.exists()
    prepare_run_folder(out, arguments.overwrite or arguments.resume)  # Fail before the slow part.
    try:
        dataset = resolve_data(arguments.data, arguments.validation_split, arguments.seed)
        validate_evaluation_splits(dataset, arguments.validation_split)
    except (ValueError, FileNotFoundError):
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # Leave nothing behind for a rejected run.
        raise
    if dataset.report.skipped:
        print(dataset.report)
    if search and dataset.validation is None:
        print("No validation split to choose a recipe on: training the fast recipe instead.")
        search = False
    if search:
        if not arguments.budget > 0:
            raise ValueError(f"--budget must be positive seconds. Received: {arguments.budget!r}")
        result = train_with_search(
            dataset,
            arguments.budget,
            base=config,
            fixed={**given, "class_weight": arguments.class_weight},
            out=out,
            overwrite=True,
            resume=arguments.resume,
            progress=not arguments.no_progress,
            strategy=strategy,
        )
    else:
        result = train_run(
            dataset,
            config,
            out=out,
            overwrite=True,
            resume=arguments.resume,
            progress=not arguments.no_progress,
            strategy=strategy,
        )
    print(format_summary(result.metrics))
    if arguments.compare_scratch:
        # The transfer run's own time, but at least 2 minutes: with a warm feature cache
        # the transfer run takes seconds, and the comparison should not starve the CNN.
        seconds = max(result.metrics["timings"]["total_s"], arguments.compare_seconds)
        comparison = compare_with_scratch(
            dataset,
            result.metrics,
            seconds=seconds,
            image_size=96,
            seed=config.seed,
        )
        result.metrics["scratch_comparison"] = comparison
        write_json(out / "metrics.json", result.metrics)
    print(
        f"Run written to {out}/ "
        "(model.keras, metrics.json, training_curves.png, confusion_matrix.png)"
    )
    return 0


def _predict(arguments) -> int:
    if arguments.top_k < 1:
        raise ValueError(
            f"--top-k must be at least 1 (how many classes to print). "
            f"Received: top_k={arguments.top_k}"
        )
    model = load_classifier(arguments.model)
    threshold = get_decision_threshold(model)
    if threshold is not None:
        names = get_class_names(model)
        print(
            f"Decision threshold {threshold:.3f}: {names[1]} when p({names[1]}) >= {threshold:.3f} "
            "(chosen on validation); the first class printed is the prediction.",
            file=sys.stderr,
        )
    failed = 0
    for image in arguments.images:
        # One file at a time: a bad file is reported and the good ones still print.
        try:
            [(path, ranked)] = predict_files(model, [image], top_k=arguments.top_k)
        except (ValueError, OSError) as error:
            failed += 1
            print(f"error: {image}: {error}", file=sys.stderr)
            continue
        labels = ", ".join(f"{name} {score:.3f}" for name, score in ranked)
        print(f"{path}: {labels}")
    if failed:
        print(f"error: {failed} of {len(arguments.images)} image(s) failed.", file=sys.stderr)
        return 1
    return 0


def _export(arguments) -> int:
    return export_command(
        arguments.model,
        arguments.out,
        data=arguments.data,
        formats=tuple(arguments.formats) if arguments.formats else FORMATS,
        overwrite=arguments.overwrite,
    )


def _backbones(arguments) -> int:
    for name in list_backbones():
        spec = get_backbone(name)
        mark = "verified" if spec.verified else "        "  # Recorded check: spec.verified.
        print(f"{name:20s} {spec.image_size:4d}px  {mark}  {spec.description}")
    return 0


def _datasets(arguments) -> int:
    for name in tlkit_data.list_datasets():
        info = tlkit_data.dataset_info(name)
        print(f"{name:24s} {info.get('description', info.get('source', ''))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
