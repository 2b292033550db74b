"""Fine-tuning the top blocks on cached lower-block activations vs plain fine-tuning.

When only the top blocks are unfrozen, the frozen blocks below compute the same
function every epoch. `tlkit.fine_tuning.split_at_block` cuts the base there; the
lower part runs once over a fixed number of augmented views (`extract_features`
on the lower model, cached like features), and only the upper blocks and the
head train on those activations (`build_upper_classifier`).

Both contenders, each in its own process, first train the same head on cached
frozen features (same seed), then fine-tune the same blocks (block17 and the
head convolution of mobilenet_v2 @160 on cats_and_dogs_filtered, BatchNorm
frozen, Adam 1e-5) for the same number of gradient steps:

- `plain`: `epochs` epochs on images with fresh "natural" augmentation per epoch,
  the whole network forward every step (what `train_run` does today);
- `cached`: `views` views per image (view 0 plain, the rest "natural"
  augmentation) of the lower activations, computed once, then
  `epochs / views` passes over them (the same number of steps). Two rows:
  float32 activations with `backend="auto"` (LiteRT here: 4000 images), and
  float16 activations (`dtype="float16"`, half the memory) with
  `backend="litert"`. Each contender starts with an empty cache, so the
  LiteRT conversion of the lower blocks (in this process, `tlkit.litert`) is
  inside the timed extraction.

Every row records the load average before and after its process.

Accuracy: both evaluate the assembled full classifier end to end on all 1000
validation images.

    python bench/fine_tune_speed.py           # full: ~8 minutes on 2 cores (load ~4)
    python bench/fine_tune_speed.py --quick   # ~1 minute
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "fine_tune_speed.py"
DATASET = "cats_and_dogs_filtered"
BACKBONE, IMAGE_SIZE, FIRST_BLOCK = "mobilenet_v2", 160, "block17"
LEARNING_RATE = 1e-5


def _prepare(args):
    """Dataset, base and a head trained on cached frozen features (identical in both)."""
    import keras

    from tlkit.backbones import get_backbone
    from tlkit.features import extract_features
    from tlkit.heads import build_head, train_head
    from tlkit.models import build_feature_extractor

    keras.utils.set_random_seed(args.seed)
    dataset = _common.load_dataset(DATASET, args.quick, per_class=8)
    base = build_feature_extractor(BACKBONE, IMAGE_SIZE)
    train = extract_features(base, dataset.train, IMAGE_SIZE, progress=False)
    keras.utils.set_random_seed(args.seed)
    head = build_head(get_backbone(BACKBONE).feature_width, dataset.num_classes)
    train_head(head, train, epochs=3 if args.quick else 20, seed=args.seed)
    return dataset, base, head


def _accuracy(base, head, dataset) -> float:
    from tlkit.models import build_classifier
    from tlkit.training import predict_split

    model = build_classifier(BACKBONE, dataset.num_classes, IMAGE_SIZE, base=base, head=head)
    probabilities, labels = predict_split(model, dataset.validation, IMAGE_SIZE)
    return float((probabilities.argmax(-1) == labels).mean())


def plain(params: dict, args) -> dict:
    import keras

    from tlkit.models import build_classifier, unfreeze

    dataset, base, head = _prepare(args)
    accuracy_before = _accuracy(base, head, dataset)
    epochs = params["epochs"]
    model = build_classifier(
        BACKBONE, dataset.num_classes, IMAGE_SIZE, augmentation="natural", base=base, head=head
    )
    blocks = unfreeze(model, FIRST_BLOCK, learning_rate=LEARNING_RATE)
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        images = dataset.train.to_dataset(
            IMAGE_SIZE, batch_size=32, shuffle=True, seed=args.seed + epoch
        )
        model.fit(images, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    return {
        "fine_tune_s": round(seconds, 2),
        "steps": epochs * math.ceil(len(dataset.train) / 32),
        "unfrozen_blocks": blocks,
        "accuracy_before": accuracy_before,
        "accuracy": _accuracy(base, head, dataset),
        "dataset": _common.dataset_facts(dataset),
    }


def cached(params: dict, args) -> dict:
    import keras

    from tlkit.features import extract_features
    from tlkit.fine_tuning import build_upper_classifier, split_at_block
    from tlkit.models import block_names

    dataset, base, head = _prepare(args)
    accuracy_before = _accuracy(base, head, dataset)
    epochs, views = params["epochs"], params["views"]
    dtype, backend = params.get("dtype", "float32"), params.get("backend", "auto")
    started = time.perf_counter()
    lower, upper = split_at_block(base, FIRST_BLOCK)
    activations = extract_features(
        lower,
        dataset.train,
        IMAGE_SIZE,
        views=views,
        augmentation="natural" if views > 1 else None,
        seed=args.seed,
        progress=False,
        backend=backend,
        dtype=dtype,
    )
    extract_s = time.perf_counter() - started
    model = build_upper_classifier(upper, head, learning_rate=LEARNING_RATE)
    passes = max(1, round(epochs / views))
    keras.utils.set_random_seed(args.seed)
    started = time.perf_counter()
    training = activations.to_dataset(32, shuffle=True, seed=args.seed)
    model.fit(training, epochs=passes, shuffle=False, verbose=0)  # shuffled by the dataset
    train_s = time.perf_counter() - started
    names = block_names(base)
    return {
        "fine_tune_s": round(extract_s + train_s, 2),
        "activation_extraction_s": round(extract_s, 2),
        "upper_training_s": round(train_s, 2),
        "activation_shape": list(activations.features.shape[1:]),
        "activation_mb": round(activations.features.nbytes / 2**20, 1),
        "steps": passes * math.ceil(len(activations) / 32),
        "unfrozen_blocks": names[names.index(FIRST_BLOCK) :],
        "accuracy_before": accuracy_before,
        "accuracy": _accuracy(base, head, dataset),
        "dataset": _common.dataset_facts(dataset),
    }


CONTENDERS = {"plain": plain, "cached": cached}


def plan(quick: bool) -> list[tuple[str, dict]]:
    epochs = 2 if quick else 4
    return [
        ("plain", {"epochs": epochs}),
        ("cached", {"epochs": epochs, "views": 2}),
        ("cached", {"epochs": epochs, "views": 2, "dtype": "float16", "backend": "litert"}),
    ]


def main(argv=None) -> int:
    args = _common.start(__doc__.splitlines()[0], argv, CONTENDERS)
    if args is None:
        return 0
    _common.ensure_weights([BACKBONE])
    rows = [
        _common.run_contender(SCRIPT, name, params, args.quick) for name, params in plan(args.quick)
    ]
    plain_row = next((r for r in rows if r["contender"] == "plain" and "error" not in r), None)
    table_rows = []
    for row in rows:
        if "error" in row:
            table_rows.append({"contender": row["contender"], "extra": row["error"]})
            continue
        speedup = round(plain_row["fine_tune_s"] / row["fine_tune_s"], 2) if plain_row else ""
        row["speedup_vs_plain"] = speedup
        if plain_row:
            row["accuracy_change_vs_plain"] = round(row["accuracy"] - plain_row["accuracy"], 4)
        params = row["params"]
        table_rows.append(
            {
                "contender": row["contender"],
                "settings": f"{params['epochs']} epochs"
                + (f", {params['views']} views" if "views" in params else "")
                + (
                    f", {params.get('dtype', 'float32')}, backend {params.get('backend', 'auto')}"
                    if "views" in params
                    else ""
                ),
                "steps": row["steps"],
                "seconds": row["fine_tune_s"],
                "extra": (
                    f"extract {row['activation_extraction_s']} s + train "
                    f"{row['upper_training_s']} s; activations {row['activation_shape']} "
                    f"{row['activation_mb']} MiB"
                )
                if row["contender"] == "cached"
                else "images through the whole base every step",
                "speedup": speedup,
                "before": row["accuracy_before"],
                "accuracy": row["accuracy"],
                "rss": row["peak_rss_mb"],
                "load": f"{row['load_average_before'][0]} / {row['load_average_after'][0]}",
            }
        )
    table = _common.markdown_table(
        table_rows,
        [
            ("contender", "contender"),
            ("settings", "settings"),
            ("steps", "steps"),
            ("seconds", "fine-tune wall s"),
            ("speedup", "x plain"),
            ("extra", "detail"),
            ("before", "val acc before"),
            ("accuracy", "val acc after"),
            ("rss", "peak RSS MiB"),
            ("load", "load 1 min before / after"),
        ],
    )
    notes = (
        f"{BACKBONE} @{IMAGE_SIZE}, unfrozen from `{FIRST_BLOCK}` (block17 + head conv), Adam "
        f"{LEARNING_RATE}, batch 32, BatchNorm frozen. The fine-tune wall time of `cached` "
        "includes computing the lower activations (with an empty cache: for LiteRT also "
        "converting the lower blocks, in this process). Validation: all images of the "
        "validation split, end to end through the assembled classifier."
    )
    _common.write_results(
        "fine_tune_speed",
        args,
        {
            "contenders": rows,
            "backbone": BACKBONE,
            "image_size": IMAGE_SIZE,
            "first_block": FIRST_BLOCK,
        },
        table,
        notes,
    )
    print(table + "\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
