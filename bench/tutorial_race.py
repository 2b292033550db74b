"""The TensorFlow transfer-learning tutorial, reproduced and raced against tlkit.

Data: cats_and_dogs_filtered, 2000 training and all 1000 validation images, the
same split for every contender. Each contender runs in its own process (its
peak RSS is its own) with an empty feature cache.

Contenders:

- `tutorial`: the recipe of tensorflow.org/tutorials/images/transfer_learning as
  written: MobileNetV2 (tlkit's offline torchvision-layout `mobilenet_v2`) at
  160 px, batch 32, RandomFlip + RandomRotation(0.2) (`augmentation="tutorial"`),
  Adam 1e-4, 10 epochs with the frozen base inside the training loop (every
  image goes through the base every epoch), then unfreeze from Keras layer 100
  and fine-tune 10 more epochs with RMSprop 1e-5. Keras' layer 100 is
  `block_11_expand_relu`: the tutorial trains `block_11`'s depthwise and project
  convolutions, `block_12`..`block_16` and `Conv_1`. Keras' `block_k` is
  torchvision's `features[k + 1]`, tlkit's `block{k+1}`, so the equivalent is
  `unfreeze(model, "block12")`: blocks 12..17 and the head convolution (tlkit
  also unfreezes block12's expand convolution, which Keras leaves frozen, and
  keeps BatchNorm frozen where the tutorial trains gamma and beta). The
  tutorial validates after every epoch; this run does not (monitoring only),
  and evaluates once on all 1000 validation images after each phase.
- `tlkit_default`: `tlkit.train_run(dataset, TrainConfig(seed=...))`, the
  current defaults: EfficientNet-Lite0 at 224, the base converted to LiteRT
  (`backend="auto"` on a CPU; the conversion is inside the feature-extraction
  time, the LiteRT cache starts empty), features extracted once, 20 head epochs,
  evaluation on the cached validation features (the same numbers as the whole
  model on the images). Also with `backend="keras"`, to show what LiteRT adds.
- `cached_features`: the same recipe written out with `extract_features` and
  `train_head`, for other backbones, sizes and augmented views, including the
  tutorial's MobileNetV2 @160.

    python bench/tutorial_race.py           # full: ~10 minutes on 2 quiet cores
    python bench/tutorial_race.py --quick   # ~1 minute
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "tutorial_race.py"
DATASET = "cats_and_dogs_filtered"
# Keras MobileNetV2 layer 100 (`block_11_expand_relu`) lies in Keras block_11 = tlkit block12.
TUTORIAL_UNFREEZE_FROM = "block12"


# ---------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------


def _evaluate(model, split, image_size: int) -> float:
    from tlkit.training import predict_split

    probabilities, labels = predict_split(model, split, image_size, batch_size=64)
    return float((probabilities.argmax(-1) == labels).mean())


def tutorial(params: dict, args) -> dict:
    import keras

    from tlkit.models import build_classifier, unfreeze

    keras.utils.set_random_seed(args.seed)
    dataset = _common.load_dataset(DATASET, args.quick, per_class=6)
    size, batch = 160, 32
    epochs = 1 if args.quick else params.get("epochs", 10)
    fine_tune_epochs = 1 if args.quick else params.get("fine_tune_epochs", 10)
    clock = _common.PhaseClock()

    started = time.perf_counter()
    model = build_classifier(
        "mobilenet_v2",
        dataset.num_classes,
        size,
        augmentation="tutorial",
        learning_rate=1e-4,
        class_names=dataset.class_names,
    )
    clock.record("build", time.perf_counter() - started)

    def train_images(epoch_seed):
        return dataset.train.to_dataset(size, batch_size=batch, shuffle=True, seed=epoch_seed)

    def train_then_evaluate(
        phase: str, evaluation_phase: str, epoch_seed: int, count: int, prepare=lambda: None
    ) -> float:
        started = time.perf_counter()
        prepare()
        model.fit(train_images(epoch_seed), epochs=count, verbose=2)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        accuracy = _evaluate(model, dataset.validation, size)
        clock.record(phase, train_s, len(dataset.train) * count)
        clock.record(
            evaluation_phase,
            time.perf_counter() - started,
            len(dataset.validation),
            accuracy=accuracy,
        )
        return accuracy

    blocks = []

    def unfreeze_and_compile():
        blocks.extend(unfreeze(model, TUTORIAL_UNFREEZE_FROM, recompile=False))
        model.compile(
            optimizer=keras.optimizers.RMSprop(1e-5),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    frozen_accuracy = train_then_evaluate("frozen_training", "frozen_evaluation", args.seed, epochs)
    fine_accuracy = train_then_evaluate(
        "fine_tuning",
        "fine_tuned_evaluation",
        args.seed + 1,
        fine_tune_epochs,
        unfreeze_and_compile,
    )
    return {
        "phases": clock.phases,
        "unfrozen_blocks": blocks,
        "accuracy": fine_accuracy,
        "accuracy_after_frozen_phase": frozen_accuracy,
        "total_wall_s": round(sum(p["wall_s"] for p in clock.phases.values()), 2),
        "dataset": _common.dataset_facts(dataset),
    }


def tlkit_default(params: dict, args) -> dict:
    from tlkit.training import TrainConfig, train_run

    dataset = _common.load_dataset(DATASET, args.quick, per_class=6)
    config = TrainConfig(seed=args.seed, **params.get("config", {}))
    if args.quick:
        config.epochs = min(config.epochs, 3)
        config.fine_tune_epochs = min(config.fine_tune_epochs, 1)
    started = time.perf_counter()
    result = train_run(dataset, config, progress=False, log=lambda line: print(line, flush=True))
    total = time.perf_counter() - started
    timings = result.metrics["timings"]
    clock = _common.PhaseClock()
    clock.record("build", timings["build_s"])
    clock.record(
        "feature_extraction",
        timings["feature_extraction_s"],
        len(dataset.train) * config.views + len(dataset.validation),
    )
    clock.record("head_training", timings.get("head_training_s", 0.0))
    if "fine_tuning_s" in timings:
        clock.record(
            "fine_tuning", timings["fine_tuning_s"], len(dataset.train) * config.fine_tune_epochs
        )
    clock.record("evaluation", timings["evaluation_s"], len(dataset.validation))
    return {
        "phases": clock.phases,
        "accuracy": float(result.metrics["accuracy"]),
        "evaluated_on": result.metrics["evaluated_on"],
        "config": result.metrics["config"],
        "total_wall_s": round(total, 2),
        "dataset": _common.dataset_facts(dataset),
    }


def cached_features(params: dict, args) -> dict:
    import keras

    from tlkit.backbones import get_backbone
    from tlkit.features import extract_features
    from tlkit.heads import build_head, train_head
    from tlkit.models import build_feature_extractor

    keras.utils.set_random_seed(args.seed)
    dataset = _common.load_dataset(DATASET, args.quick, per_class=6)
    backbone, size = params["backbone"], params["image_size"]
    views, epochs = params.get("views", 1), (3 if args.quick else params.get("epochs", 20))
    clock = _common.PhaseClock()
    total = time.perf_counter()
    started = time.perf_counter()
    base = build_feature_extractor(backbone, size)
    clock.record("build", time.perf_counter() - started)
    started = time.perf_counter()
    train = extract_features(
        base,
        dataset.train,
        size,
        views=views,
        augmentation=params.get("augmentation", "natural") if views > 1 else None,
        seed=args.seed,
        progress=False,
        backend=params.get("backend", "auto"),
    )
    validation = extract_features(
        base, dataset.validation, size, progress=False, backend=params.get("backend", "auto")
    )
    clock.record(
        "feature_extraction",
        time.perf_counter() - started,
        len(dataset.train) * views + len(dataset.validation),
    )
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()
    head = build_head(get_backbone(backbone).feature_width, dataset.num_classes)
    train_head(head, train, None, epochs=epochs, seed=args.seed)
    clock.record("head_training", time.perf_counter() - started)
    started = time.perf_counter()
    probabilities = head.predict(validation.features, batch_size=256, verbose=0)
    accuracy = float((probabilities.argmax(-1) == validation.labels).mean())
    clock.record("evaluation", time.perf_counter() - started, len(validation), accuracy=accuracy)
    return {
        "phases": clock.phases,
        "accuracy": accuracy,
        "total_wall_s": round(time.perf_counter() - total, 2),
        "dataset": _common.dataset_facts(dataset),
    }


CONTENDERS = {
    "tutorial": tutorial,
    "tlkit_default": tlkit_default,
    "cached_features": cached_features,
}


def plan(quick: bool) -> list[tuple[str, dict]]:
    runs = [
        ("tlkit_default", {}),
        ("tlkit_default", {"config": {"backend": "keras"}}),
    ]
    if not quick:
        runs += [
            ("cached_features", {"backbone": "mobilenet_v2", "image_size": 160}),
            ("cached_features", {"backbone": "efficientnet_lite0", "image_size": 224, "views": 2}),
        ]
    # The tutorial last: it runs longest, and the short contenders get the quieter machine.
    return runs + [("tutorial", {})]


def describe(row: dict) -> str:
    name, params = row["contender"], row.get("params", {})
    if name == "tutorial":
        return "TF tutorial (mobilenet_v2 @160, base in the loop, 10+10 epochs)"
    if name == "tlkit_default":
        backend = params.get("config", {}).get("backend")
        return "tlkit train_run, TrainConfig() defaults" + (
            f", backend={backend!r}" if backend else ""
        )
    text = f"cached features: {params['backbone']} @{params['image_size']}"
    if params.get("views", 1) > 1:
        text += f", {params['views']} views"
    return text + f", backend={params.get('backend', 'auto')!r}, head 20 epochs"


def main(argv=None) -> int:
    args = _common.start(__doc__.splitlines()[0], argv, CONTENDERS)
    if args is None:
        return 0
    _common.ensure_weights(["mobilenet_v2", "efficientnet_lite0"])
    rows = [
        _common.run_contender(SCRIPT, name, params, args.quick) for name, params in plan(args.quick)
    ]
    table_rows = []
    for row in rows:
        if "error" in row:
            table_rows.append({"contender": describe(row), "phase": "error", "wall": row["error"]})
            continue
        for phase, entry in row["phases"].items():
            table_rows.append(
                {
                    "contender": describe(row),
                    "phase": phase,
                    "wall": entry["wall_s"],
                    "ips": entry.get("images_per_second", ""),
                    "rss": entry["peak_rss_mb_so_far"],
                    "accuracy": entry.get("accuracy", ""),
                }
            )
        table_rows.append(
            {
                "contender": describe(row),
                "phase": "**total**",
                "wall": row["total_wall_s"],
                "rss": row["peak_rss_mb"],
                "accuracy": row["accuracy"],
            }
        )
    table = _common.markdown_table(
        table_rows,
        [
            ("contender", "contender"),
            ("phase", "phase"),
            ("wall", "wall s"),
            ("ips", "images/s"),
            ("rss", "peak RSS MiB (process, so far)"),
            ("accuracy", "val accuracy (1000 images)"),
        ],
    )
    target = {"accuracy": 0.985, "total_wall_s": 60, "peak_rss_mb": 1536}
    reached = [
        describe(r)
        for r in rows
        if "error" not in r
        and r["accuracy"] >= target["accuracy"]
        and r["total_wall_s"] <= target["total_wall_s"]
        and r["peak_rss_mb"] < target["peak_rss_mb"]
    ]
    notes = (
        f"Target: >= {target['accuracy']:.1%} on the 1000 validation images in <= "
        f"{target['total_wall_s']} s total wall time, peak RSS < {target['peak_rss_mb']} MiB. "
        f"Reached by: {', '.join(reached) if reached else 'none'}.\n\n"
        "Wall times exclude starting Python and importing TensorFlow (`process_wall_s` in the "
        "JSON includes it). Each contender ran in its own process with an empty feature cache; "
        "converted ImageNet weights were already on disk. Peak RSS is `ru_maxrss` of that "
        "process. Tutorial unfreeze point: Keras layer 100 (`block_11_expand_relu`) -> tlkit "
        f"`{TUTORIAL_UNFREEZE_FROM}` (blocks 12..17 and head)."
    )
    payload = {
        "target": target,
        "reached_by": reached,
        "contenders": rows,
        "tutorial_unfreeze_from": TUTORIAL_UNFREEZE_FROM,
    }
    _common.write_results("tutorial_race", args, payload, table, notes)
    print(table + "\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
