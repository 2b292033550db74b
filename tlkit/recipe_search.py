"""Choosing a training recipe on the validation split, within a time budget.

`python -m tlkit train DATA` with no recipe flags calls `train_with_search`:
candidate recipes (`TrainConfig`s) are each trained with `tlkit.train_run` on
the training split and scored on the validation split (the test split is
removed from the dataset the candidates see, so it can never influence the
choice); the winner is then trained once more by `train_run` on the full
dataset and evaluated on the test split as usual.

Candidates, cheapest first (the feature cache makes repeats free: a second
head on the same backbone and size costs seconds):

1. `head`: the head on frozen features, for each offline backbone of
   `SEARCH_BACKBONES` x input sizes (`candidate_sizes`: the backbone's own,
   plus 128 px for low-resolution images and a larger size for large ones);
2. `regularisation`: the best of 1 with more dropout (0.5);
3. `views`: the best so far with 3 feature views per image, with a flip
   augmentation (`natural`) and a flip-free one (`medical`: left and right may
   carry meaning, as in X-rays and traffic signs);
4. `fine-tune`: the top blocks fine-tuned on cached activations
   (`fine_tune_on="activations"`), from the last blocks (`block15`-like) and,
   for small inputs, from the middle (`block3`), on the two best backbone /
   size pairs and the best pair at 160 px or less, with 3 views of the better
   `views` preset (`medical` when that stage did not fit the budget); a rung
   schedule of successive halving (Jamieson & Talwalkar 2016): every
   fine-tune candidate runs a few epochs, the best third (at
   least one) runs again from the start with 3x the epochs.

Class weights follow `TrainConfig.class_weight` ("auto": on when the largest
class is over 1.5x the smallest) in every candidate. A candidate is launched
only when its estimated time (from measured extraction and training rates)
plus the estimated final run still fit in the budget; candidates that do not
fit are listed as skipped. The score is validation ROC AUC for two classes,
balanced accuracy when class weights are on, else accuracy; ties go to the
earlier (cheaper) candidate.

Deterministic for a seed given the same candidates: every candidate is a
seeded `train_run`. Which candidates fit the budget depends on this
machine's measured speed, so a faster machine may try more of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlkit._io import write_json
from tlkit.backbones import build_backbone, get_backbone
from tlkit.data import ImageDataset
from tlkit.fine_tuning import split_at_block
from tlkit.heads import choose_class_weight
from tlkit.models import block_names
from tlkit.training import RunResult, TrainConfig, prepare_run_folder, train_run

# A default that suits a 2-core CPU; a GPU fits more candidates in the same time.
DEFAULT_BUDGET_S = 600.0
SEARCH_BACKBONES = ("efficientnet_lite0", "mobilenet_v2")
# The TrainConfig fields a recipe consists of: a flag for any of them fixes that choice.
RECIPE_FIELDS = (
    "backbone",
    "image_size",
    "epochs",
    "fine_tune_epochs",
    "fine_tune_blocks",
    "fine_tune_from",
    "fine_tune_on",
    "views",
    "augmentation",
    "dropout_rate",
    "learning_rate",
    "fine_tune_learning_rate",
    "fine_tune_schedule",
    "class_weight",
)
# Cached activations above this size are not tried (they are held in memory).
MAX_ACTIVATION_BYTES = 3 * 2**30
FINE_TUNE_RUNGS = {"top": (2, 6), "middle": (4, 12)}
FINE_TUNE_LEARNING_RATES = {"top": 1e-4, "middle": 2e-4}
VIEW_AUGMENTATIONS = ("natural", "medical")


@dataclass
class Candidate:
    """One recipe tried by the search, and what it scored on validation."""

    name: str
    stage: str
    config: TrainConfig
    estimate_s: float = 0.0
    score: float | None = None
    seconds: float | None = None
    status: str = "pending"
    timings: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The candidate as a metrics.json row."""
        return {
            "name": self.name,
            "stage": self.stage,
            "recipe": recipe_of(self.config),
            "validation_score": None if self.score is None else round(self.score, 4),
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "estimate_s": round(self.estimate_s, 1),
            "status": self.status,
        }


@dataclass
class SearchResult:
    """The chosen recipe and the record of the search.

    Attributes:
        config: The chosen `TrainConfig`.
        metric: The validation metric the candidates were ranked by.
        candidates: Every candidate, tried or skipped, in launch order.
        budget_s: The budget in seconds (search and final run together).
        search_s: Seconds the search took.
        reason: Why the winner won, in one sentence.
        skipped: Why the search did not run, or None.
    """

    config: TrainConfig
    metric: str
    candidates: list[Candidate] = field(default_factory=list)
    budget_s: float = DEFAULT_BUDGET_S
    search_s: float = 0.0
    reason: str = ""
    skipped: str | None = None

    def record(self) -> dict[str, Any]:
        """The JSON record written to metrics.json under `recipe_search`."""
        return {
            "chosen": recipe_of(self.config),
            "metric": self.metric,
            "budget_s": self.budget_s,
            "search_s": round(self.search_s, 1),
            "reason": self.reason,
            "skipped": self.skipped,
            "candidates": [candidate.row() for candidate in self.candidates],
        }


def recipe_of(config: TrainConfig) -> dict[str, Any]:
    """The recipe fields of a config (what the search chooses), as a plain dict."""
    values = asdict(config)
    recipe = {name: values[name] for name in RECIPE_FIELDS}
    if not config.fine_tune_epochs:
        for name in ("fine_tune_blocks", "fine_tune_from", "fine_tune_on"):
            recipe.pop(name)
        recipe.pop("fine_tune_learning_rate")
        recipe.pop("fine_tune_schedule")
    if config.views == 1 and not config.fine_tune_epochs:
        recipe.pop("augmentation")
    return recipe


def short_name(config: TrainConfig) -> str:
    """A candidate's name in the table, e.g. `mobilenet_v2@128 ft block3 x12 3v signs d0.2`."""
    size = config.image_size or get_backbone(config.backbone).image_size
    parts = [f"{config.backbone}@{size}"]
    if config.fine_tune_epochs:
        where = config.first_fine_tuned_block()
        on = "" if config.fine_tune_on == "activations" else " images"
        parts.append(f"ft{on} {where} x{config.fine_tune_epochs}")
    else:
        parts.append("head")
    if config.views > 1:
        parts.append(f"{config.views}v {config.augmentation}")
    parts.append(f"d{config.dropout_rate:g}")
    return " ".join(parts)


def describe(config: TrainConfig) -> str:
    """A short human description of a recipe, e.g. `mobilenet_v2 @224, head only`."""
    size = config.image_size or get_backbone(config.backbone).image_size
    text = f"{config.backbone} @{size}"
    if config.fine_tune_epochs and config.fine_tune_on == "activations":
        text += (
            f", fine-tune from {config.first_fine_tuned_block()} on activations "
            f"{config.fine_tune_epochs} ep @{config.fine_tune_learning_rate:g}"
        )
    elif config.fine_tune_epochs:
        text += f", fine-tune on images {config.fine_tune_epochs} ep"
    else:
        text += ", head only"
    if config.views > 1:
        text += f", {config.views} views {config.augmentation}"
    return text + f", dropout {config.dropout_rate:g}"


# ---------------------------------------------------------------------------
# The data: native size and the sizes to try
# ---------------------------------------------------------------------------


def native_image_size(split, sample: int = 64, seed: int = 0) -> int:
    """The median shorter side, in pixels, of (a seeded sample of) a split's images.

    Args:
        split: A `tlkit.data.ImageSplit`.
        sample: How many images to look at. Defaults to 64.
        seed: Seed of the sample. Defaults to 0.

    Returns:
        The median of `min(height, width)` over the sample.
    """
    if split.images is not None:
        return int(min(split.images.shape[1:3]))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(split.paths), size=min(sample, len(split.paths)), replace=False)
    sides = []
    for index in sorted(chosen):
        try:
            with Image.open(split.paths[index]) as image:  # Reads the header only.
                sides.append(min(image.size))
        except OSError:
            continue  # Unreadable files are skipped when training, too.
    return int(np.median(sides)) if sides else 224


def candidate_sizes(backbone: str, native: int) -> list[int]:
    """Input sizes to try for a backbone, given the images' native size.

    The backbone's own size always; 128 px when the images are small (native
    size under half the backbone's: frozen features of strongly upsampled
    images are weak, and a smaller input makes fine-tuning cheaper); and
    1.25x the backbone's (rounded to 32) when the images are large enough
    (the train-test resolution effect, Touvron et al. 2019).
    """
    own = get_backbone(backbone).image_size
    sizes = [own]
    if native < own / 2:
        sizes.append(128)
    elif native >= 1.25 * own:
        sizes.append(int(round(1.25 * own / 32) * 32))
    return sizes


# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------


class _Clock:
    """Measured rates, for estimating what a candidate will cost before launching it."""

    def __init__(self, dataset):
        self.train = len(dataset.train)
        self.validation = len(dataset.validation)
        self.test = len(dataset.test) if dataset.test is not None else 0
        self.extract_per_pixel: float | None = None  # Seconds per image-pixel of extraction.
        self.head_s = 5.0  # Seconds to train a head on cached features (measured later).
        self.overhead_s = 3.0  # Building the base, reading caches, evaluating (measured).
        # Seconds per row-pixel per epoch, by (backbone, first fine-tuned block).
        self.fine_tune_per_pixel: dict[tuple[str, str], float] = {}
        self.extracted: set[tuple] = set()

    def extraction_s(self, config: TrainConfig, size: int) -> float:
        keys = self._extraction_keys(config, size)
        new_images = sum(count for key, count in keys if key not in self.extracted)
        return new_images * size * size * (self.extract_per_pixel or 4e-8)

    def _extraction_keys(self, config: TrainConfig, size: int):
        cut = config.first_fine_tuned_block() if _on_activations(config) else "pooled"
        augmentation = config.augmentation if config.views > 1 else None
        return [
            (
                (config.backbone, size, cut, config.views, augmentation, "train"),
                self.train * config.views,
            ),
            ((config.backbone, size, cut, 1, None, "validation"), self.validation),
        ]

    def estimate_s(self, config: TrainConfig, size: int) -> float:
        seconds = self.overhead_s + self.extraction_s(config, size) + self.head_s
        if _on_activations(config):
            rows = self.train * config.views + self.validation
            # Unmeasured: a backward pass costs about twice a forward one, so three forward
            # passes of the blocks above the cut (their share of the blocks) per row and epoch.
            block = config.first_fine_tuned_block()
            per_pixel = self.fine_tune_per_pixel.get(
                (config.backbone, block),
                3 * (self.extract_per_pixel or 4e-8) * upper_fraction(config.backbone, size, block),
            )
            seconds += config.fine_tune_epochs * rows * size * size * per_pixel
        return seconds

    def final_s(self, config: TrainConfig, size: int, candidate: Candidate | None = None) -> float:
        """The final run: the candidate again (extraction from the cache) plus the test split."""
        if candidate is not None and candidate.seconds is not None:
            again = candidate.seconds - candidate.timings.get("feature_extraction_s", 0.0)
        else:
            again = self.estimate_s(config, size) - self.extraction_s(config, size)
        return max(again, 1.0) + self.test * size * size * (self.extract_per_pixel or 4e-8)

    def learn(self, config: TrainConfig, size: int, metrics: dict, seconds: float) -> None:
        timings = metrics["timings"]
        measured = sum(
            timings.get(key, 0.0)
            for key in ("feature_extraction_s", "head_training_s", "fine_tuning_s")
        )
        self.overhead_s = max(seconds - measured, 1.0)
        keys = self._extraction_keys(config, size)
        new_images = sum(count for key, count in keys if key not in self.extracted)
        extraction = timings.get("feature_extraction_s", 0.0)
        if new_images and extraction > 1.0 and not _on_activations(config):
            self.extract_per_pixel = extraction / (new_images * size * size)
        self.extracted.update(key for key, _ in keys)
        self.head_s = max(timings.get("head_training_s", self.head_s), 1.0)
        if _on_activations(config) and timings.get("fine_tuning_s"):
            rows = self.train * config.views + self.validation
            key = (config.backbone, config.first_fine_tuned_block())
            self.fine_tune_per_pixel[key] = timings["fine_tuning_s"] / (
                config.fine_tune_epochs * rows * size * size
            )


def _on_activations(config: TrainConfig) -> bool:
    return bool(config.fine_tune_epochs) and config.fine_tune_on == "activations"


def search_recipe(
    dataset,
    budget_s: float = DEFAULT_BUDGET_S,
    base: TrainConfig | None = None,
    fixed: dict[str, Any] | None = None,
    backbones: tuple[str, ...] = SEARCH_BACKBONES,
    log: Callable[[str], Any] = print,
    progress: bool = False,
) -> SearchResult:
    """Chooses a recipe on the validation split within a time budget.

    Args:
        dataset: A `tlkit.data.ImageDataset` with a validation split. Its test
            split is never used.
        budget_s: Seconds for the search and the final run together.
            Defaults to `DEFAULT_BUDGET_S` (600).
        base: Settings that are not searched (seed, backend, batch sizes,
            determinism). Defaults to `TrainConfig()`.
        fixed: Recipe fields (`RECIPE_FIELDS`) fixed by the user: they
            override every candidate, and candidates that become identical
            are tried once. Defaults to None.
        backbones: The backbones to try. Defaults to `SEARCH_BACKBONES`.
        log: Function for status lines. Defaults to `print`.
        progress: Show progress bars. Defaults to False.

    Returns:
        A `SearchResult`; `config` is the winner with `fixed` applied.

    Raises:
        ValueError: If the dataset has no validation split, the budget is not
            positive, or `fixed` names a field that is not a recipe field.
    """
    if dataset.validation is None or len(dataset.validation) == 0:
        raise ValueError(
            "The recipe search chooses on the validation split; this dataset has none. Use "
            "--validation-split above 0, or --recipe fast. Received: validation=None"
        )
    if not budget_s > 0:
        raise ValueError(f"budget_s must be a positive number of seconds. Received: {budget_s!r}")
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(f"fixed may only hold {list(RECIPE_FIELDS)}. Received: {unknown}")
    base = dataclasses.replace(base or TrainConfig(), **fixed)
    started = time.perf_counter()
    # The candidates never see the test split.
    validation_only = ImageDataset(
        dataset.name, dataset.class_names, dataset.train, dataset.validation, None, dataset.report
    )
    weights, ratio = choose_class_weight(
        base.class_weight, dataset.train.labels, dataset.num_classes
    )
    if dataset.num_classes == 2:
        metric = "roc_auc"
    elif weights is not None:
        metric = "balanced_accuracy"
    else:
        metric = "accuracy"
    native = native_image_size(dataset.train, seed=base.seed)
    log(
        f"Recipe search: budget {budget_s:.0f} s, ranked by validation {metric}; images "
        f"about {native} px; class weights {'on' if weights else 'off'} "
        f"(largest/smallest = {ratio:.1f})."
    )
    clock = _Clock(dataset)
    tried: list[Candidate] = []
    seen: set[str] = set()

    def remaining() -> float:
        return budget_s - (time.perf_counter() - started)

    def size_of(config: TrainConfig) -> int:
        return config.image_size or get_backbone(config.backbone).image_size

    def best() -> Candidate | None:
        done = [c for c in tried if c.score is not None]
        # max() keeps the first of equal scores: the earlier, cheaper candidate.
        return max(done, key=lambda c: c.score) if done else None

    def attempt(stage: str, **changes) -> Candidate | None:
        config = dataclasses.replace(base, **{**changes, **fixed})
        name = short_name(config)
        key = json.dumps(recipe_of(config), sort_keys=True)
        if key in seen:
            return None
        seen.add(key)
        size = size_of(config)
        candidate = Candidate(name, stage, config, clock.estimate_s(config, size))
        tried.append(candidate)
        leader = best()
        final = clock.final_s(config, size)
        if leader is not None:
            final = max(final, clock.final_s(leader.config, size_of(leader.config), leader))
        if tried[0] is not candidate and candidate.estimate_s + final > remaining():
            candidate.status = "skipped: over budget"
            log(f"  {name}: skipped, estimated {candidate.estimate_s:.0f} s does not fit.")
            return candidate
        clock_start = time.perf_counter()
        result = train_run(validation_only, config, progress=progress, log=lambda line: None)
        candidate.seconds = time.perf_counter() - clock_start
        candidate.score = _score(result.metrics, metric)
        candidate.timings = dict(result.metrics["timings"])
        candidate.status = "done"
        clock.learn(config, size, result.metrics, candidate.seconds)
        log(
            f"  {name}: validation {metric} {candidate.score:.4f} in {candidate.seconds:.0f} s "
            f"({describe(config)})"
        )
        return candidate

    # 1. Heads on frozen features, every backbone and size.
    for backbone in backbones:
        for size in candidate_sizes(backbone, native):
            attempt("head", backbone=backbone, image_size=size)
    # 2. Head regularisation.
    leader = best()
    dropout = base.dropout_rate
    if leader is not None:
        attempt(
            "regularisation",
            backbone=leader.config.backbone,
            image_size=size_of(leader.config),
            dropout_rate=0.5,
        )
        dropout = best().config.dropout_rate
    # 3. Augmented feature views.
    leader = best()
    augmentation = "medical"
    if leader is not None:
        for preset in VIEW_AUGMENTATIONS:
            attempt(
                "views",
                backbone=leader.config.backbone,
                image_size=size_of(leader.config),
                dropout_rate=dropout,
                views=3,
                augmentation=preset,
            )
        viewed = [c for c in tried if c.stage == "views" and c.score is not None]
        if viewed:
            augmentation = max(viewed, key=lambda c: c.score).config.augmentation
    # 4. Fine-tuning on cached activations, a rung schedule of successive halving.
    pairs = []
    for candidate in sorted((c for c in tried if c.score is not None), key=lambda c: -c.score):
        pair = (candidate.config.backbone, size_of(candidate.config))
        if pair not in pairs:
            pairs.append(pair)
    chosen_pairs = pairs[:2]
    # Low-resolution data: the best small input too, where fine-tuning from the middle is
    # affordable (frozen features of small inputs score low, fine-tuned ones need not).
    small = [pair for pair in pairs if pair[1] <= 160]
    if small and small[0] not in chosen_pairs:
        chosen_pairs.append(small[0])
    fine_tune: list[tuple[str, dict]] = []
    for backbone, size in chosen_pairs:
        for depth, block in _fine_tune_blocks(backbone, size, len(dataset.train) * 3):
            fine_tune.append(
                (
                    f"{backbone} @{size} from {block}",
                    dict(
                        backbone=backbone,
                        image_size=size,
                        dropout_rate=dropout,
                        views=3,
                        augmentation=augmentation,
                        fine_tune_on="activations",
                        fine_tune_from=block,
                        fine_tune_learning_rate=FINE_TUNE_LEARNING_RATES[depth],
                        _depth=depth,
                    ),
                )
            )
    rung = [(name, settings) for name, settings in fine_tune]
    for level in range(2):
        results = []
        for name, settings in rung:
            depth = settings["_depth"]
            epochs = FINE_TUNE_RUNGS[depth][level]
            changes = {k: v for k, v in settings.items() if k != "_depth"}
            candidate = attempt(f"fine-tune rung {level + 1}", **changes, fine_tune_epochs=epochs)
            if candidate is not None and candidate.score is not None:
                results.append((candidate.score, name, settings))
        results.sort(key=lambda item: -item[0])
        rung = [(name, settings) for _, name, settings in results[: max(1, len(results) // 3)]]
        if not rung:
            break

    winner = best()
    if winner is None:  # Cannot happen: the first candidate always runs.
        raise ValueError("The recipe search tried no candidate.")
    runner_up = max(
        (c for c in tried if c.score is not None and c is not winner),
        key=lambda c: c.score,
        default=None,
    )
    reason = f"{winner.name} has the best validation {metric}, {winner.score:.4f}"
    if runner_up is not None:
        reason += (
            f", {winner.score - runner_up.score:+.4f} over the next best, {runner_up.name} "
            f"({runner_up.score:.4f})"
        )
    skipped = [c for c in tried if c.status.startswith("skipped")]
    if skipped:
        reason += f"; {len(skipped)} candidate(s) did not fit the budget"
    reason += "."
    result = SearchResult(
        config=winner.config,
        metric=metric,
        candidates=tried,
        budget_s=float(budget_s),
        search_s=time.perf_counter() - started,
        reason=reason,
    )
    log(format_search(result))
    return result


def _score(metrics: dict, metric: str) -> float:
    value = metrics.get(metric)
    return float(value) if value is not None else float(metrics["accuracy"])


@functools.lru_cache(maxsize=None)
def _activation_shapes(backbone: str, size: int) -> dict[str, tuple[int, ...]]:
    """Block name -> shape of the activations entering it (built once, without weights)."""
    base = build_backbone(backbone, image_size=size, weights=None)
    shapes = {}
    for block in block_names(base)[1:]:
        lower, _ = split_at_block(base, block)
        shapes[block] = tuple(int(d) for d in lower.output_shape[1:])
    return shapes


def upper_fraction(backbone: str, size: int, block: str) -> float:
    """The share of a backbone's blocks from `block` on: a rough share of its compute."""
    names = list(_activation_shapes(backbone, size))
    return (len(names) - names.index(block)) / len(names)


def _fine_tune_blocks(backbone: str, size: int, rows: int) -> list[tuple[str, str]]:
    """(depth, block) pairs to fine-tune from: the last blocks, and the middle for small inputs.

    "top" starts two blocks before the head (block15 of EfficientNet-Lite0,
    the PneumoniaMNIST recipe); "middle" starts at block3 (the GTSRB recipe),
    tried only at 160 px or less, where it is affordable on a CPU. A block
    whose cached activations would exceed `MAX_ACTIVATION_BYTES` is left out.
    """
    shapes = _activation_shapes(backbone, size)
    names = list(shapes)
    chosen = [("top", names[-3])]
    if size <= 160 and "block3" in shapes:
        chosen.append(("middle", "block3"))
    return [
        (depth, block)
        for depth, block in chosen
        if rows * math.prod(shapes[block]) * 4 <= MAX_ACTIVATION_BYTES
    ]


def format_search(result: SearchResult) -> str:
    """The search as a text table: candidate, stage, validation score, seconds, status."""
    rows = [("candidate", "stage", f"val {result.metric}", "seconds", "status")]
    for candidate in result.candidates:
        rows.append(
            (
                candidate.name,
                candidate.stage,
                "" if candidate.score is None else f"{candidate.score:.4f}",
                f"{candidate.seconds:.0f}"
                if candidate.seconds is not None
                else f"(est. {candidate.estimate_s:.0f})",
                candidate.status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return (
        "\n".join(lines)
        + f"\nSearch: {result.search_s:.0f} s of a {result.budget_s:.0f} s budget. "
        + f"Chosen: {describe(result.config)}. Why: {result.reason}"
    )


# ---------------------------------------------------------------------------
# Search, then train the winner
# ---------------------------------------------------------------------------


def train_with_search(
    dataset,
    budget_s: float = DEFAULT_BUDGET_S,
    base: TrainConfig | None = None,
    fixed: dict[str, Any] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    strategy=None,
) -> RunResult:
    """Chooses a recipe on validation (`search_recipe`), then trains it with `train_run`.

    The final run is an ordinary `train_run` of the chosen config on the
    whole dataset, evaluated on the test split; its metrics.json gains
    `recipe_search` (the chosen recipe, every candidate's validation score
    and time, the budget and the seconds used, and why the winner won). The
    search is recorded in `out/recipe_search.json` before the final run, so
    `resume=True` continues the final run with the recipe chosen before,
    without searching again.

    Args:
        dataset: A `tlkit.data.ImageDataset` with a validation split.
        budget_s: Seconds for the search and the final run together.
            Defaults to 600.
        base: Settings that are not searched. Defaults to `TrainConfig()`.
        fixed: Recipe fields fixed by the user (see `search_recipe`).
            Defaults to None.
        out: Run folder, or None. Defaults to None.
        overwrite: Replace files in an existing run folder. Defaults to False.
        resume: Continue the interrupted final run in `out`. Defaults to False.
        progress: Progress bars in the final run. Defaults to True.
        log: Function for status lines. Defaults to `print`.
        strategy: A `tf.distribute.Strategy` for the final run, or None.

    Returns:
        The `RunResult` of the final run; `metrics["recipe_search"]` holds the search.

    Raises:
        ValueError: As `search_recipe` and `train_run`, or `resume=True`
            without a recorded search in `out`.
    """
    started = time.perf_counter()
    record_path = Path(out) / "recipe_search.json" if out is not None else None
    if resume:
        if record_path is None or not record_path.is_file():
            raise ValueError(
                "Nothing to resume: the run folder holds no recipe_search.json. Start the run "
                f"without --resume. Received: out={out}"
            )
        record = json.loads(record_path.read_text())
        config = TrainConfig(**record["config"])
        log(f"Resuming the final run of the recipe chosen before: {describe(config)}.")
    else:
        if out is not None:
            prepare_run_folder(out, overwrite=overwrite)
        search = search_recipe(dataset, budget_s, base, fixed, log=log)
        config = search.config
        record = {**search.record(), "config": asdict(config)}
        if record_path is not None:
            write_json(record_path, record)
    final_started = time.perf_counter()
    result = train_run(
        dataset,
        config,
        out=out,
        overwrite=True,
        resume=resume,
        progress=progress,
        log=log,
        strategy=strategy,
    )
    record["final_run_s"] = round(time.perf_counter() - final_started, 1)
    if not resume:
        record["used_s"] = round(time.perf_counter() - started, 1)
    record.pop("config", None)
    result.metrics["recipe_search"] = record
    if out is not None:
        write_json(Path(out) / "metrics.json", result.metrics)
    return result
