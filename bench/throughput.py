"""Frozen-base throughput: Keras predict vs tlkit's extraction path vs faster options.

For each offline backbone at its default size, on the same in-memory flower
images (decoded and resized once, outside the timing):

- `keras_predict`: `base.predict(images, batch_size=64)`, the usual baseline;
- `tlkit_extract`: `tlkit.features.extract_features` on an in-memory split
  (the code path `train_run` uses) with `backend="litert"` (what `"auto"`
  picks on a CPU for 1000+ images; the one-off conversion is timed apart) and
  `backend="keras"`, at batch 64 and other batch sizes;
- `tf_function`: a plain `tf.function` forward loop (`backend="keras"`);
- `xla`: the same with `jit_compile=True` (`backend="xla"`);
- `litert`: `tlkit.litert.LiteRTModel` alone (XNNPACK, 2 threads) at several
  batch sizes.

Every contender runs in its own process, warms up on one batch, then times one
pass over the images; features of the first images must equal Keras' within a
stated tolerance. The ceiling is the model's FLOPs (per-layer formula) against
this CPU's peak: measured (the faster of a large float32 matmul in TensorFlow
and in numpy's OpenBLAS) and nominal (cores x clock x 32 float32 FLOP per cycle,
two 256-bit FMA units).

Then the scaling test: wall time and peak memory of `extract_features` on
1k, 2k, 4k and 8k flower files (files repeated to reach 8k), each in its own
process: memory must stay flat.

    python bench/throughput.py            # full: ~8 minutes on 2 cores
    python bench/throughput.py --quick    # ~1 minute
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "throughput.py"
BACKBONES = ("efficientnet_lite0", "mobilenet_v2")
SCALING_BACKBONE, SCALING_SIZE = "mobilenet_v2", 160  # the cheapest, so 15k images fit the budget
FEATURE_TOLERANCE = 1e-3  # max |difference| / max |Keras feature|, float32 vs fused kernels


# ---------------------------------------------------------------------------
# Inputs and reference features
# ---------------------------------------------------------------------------


def _images(count: int, image_size: int):
    """The first `count` flower photos, decoded and resized once (uint8, in memory)."""
    import numpy as np

    from tlkit import data

    flowers = data.load("tf_flowers", download=False)
    files = [*flowers.train.paths, *flowers.validation.paths, *flowers.test.paths]
    split = data.ImageSplit("bench", ["any"], [0] * count, paths=(files * 3)[:count])
    batches = [images.numpy() for images, _ in split.to_dataset(image_size, batch_size=64)]
    return np.concatenate(batches).round().clip(0, 255).astype(np.uint8)


def _base(backbone: str):
    from tlkit.backbones import get_backbone
    from tlkit.models import build_feature_extractor

    size = get_backbone(backbone).image_size
    return build_feature_extractor(backbone, size), size


def _compare(features, reference) -> dict:
    import numpy as np

    difference = float(np.max(np.abs(features - reference)))
    scale = float(np.max(np.abs(reference)))
    return {
        "max_abs_difference": difference,
        "relative_difference": difference / scale,
        "features_equal": bool(difference / scale <= FEATURE_TOLERANCE),
    }


def _timed(run, images, batch_size: int) -> dict:
    """Warms up on one batch, then times one pass over all images (3 passes when quick)."""
    import numpy as np

    run(images[:batch_size])
    times = []
    for _ in range(1):
        clock = time.perf_counter()
        features = run(images)
        times.append(time.perf_counter() - clock)
    seconds = statistics.median(times)
    return {
        "seconds": round(seconds, 3),
        "images_per_second": round(len(images) / seconds, 1),
        "features": np.asarray(features),
    }


# ---------------------------------------------------------------------------
# Contenders (each in its own process)
# ---------------------------------------------------------------------------


def contender(params: dict, args) -> dict:
    import numpy as np
    import tensorflow as tf

    if params.get("intra_threads"):
        tf.config.threading.set_intra_op_parallelism_threads(params["intra_threads"])
        tf.config.threading.set_inter_op_parallelism_threads(params.get("inter_threads", 1))
    backbone, method = params["backbone"], params["method"]
    batch_size = params.get("batch_size", 64)
    base, size = _base(backbone)
    conversion_s = None
    images = _images(params["count"], size)
    reference = base.predict(images[:32], batch_size=32, verbose=0)

    if method == "keras_predict":

        def run(x):
            return base.predict(x, batch_size=batch_size, verbose=0)
    elif method == "tlkit_extract":
        from tlkit.data import ImageSplit
        from tlkit.features import extract_features

        backend = params.get("backend", "keras")
        if backend == "litert":  # Convert (and cache) once, outside the timing.
            from tlkit.litert import LiteRTModel

            clock = time.perf_counter()
            LiteRTModel(base, size)
            conversion_s = round(time.perf_counter() - clock, 2)

        def run(x):
            split = ImageSplit("bench", ["any"], np.zeros(len(x), np.int32), images=x)
            return extract_features(
                base,
                split,
                size,
                batch_size=batch_size,
                cache=False,
                progress=False,
                backend=backend,
            ).features
    elif method in ("tf_function", "xla"):
        forward = tf.function(lambda x: base(x, training=False), jit_compile=method == "xla")

        def run(x):
            return np.concatenate(
                [
                    forward(tf.cast(x[i : i + batch_size], tf.float32)).numpy()
                    for i in range(0, len(x), batch_size)
                ]
            )
    elif method == "litert":
        from tlkit.litert import LiteRTModel

        clock = time.perf_counter()
        model = LiteRTModel(
            base, size, cache=False, batch_size=batch_size, num_threads=params.get("threads", 2)
        )
        conversion_s = round(time.perf_counter() - clock, 2)

        def run(x):
            return model(x)
    else:
        raise ValueError(f"Unknown method. Received: method={method!r}")

    timing = _timed(run, images, batch_size)
    features = timing.pop("features")
    extra = {"conversion_s": conversion_s} if method in ("litert", "tlkit_extract") else {}
    return {
        **timing,
        **_compare(features[:32], reference),
        "image_size": size,
        "count": len(images),
        **extra,
    }


def scaling(params: dict, args) -> dict:
    """extract_features over `count` flower files (repeated), from files, no cache."""
    import tensorflow as tf  # noqa: F401

    from tlkit import data
    from tlkit.features import extract_features

    flowers = data.load("tf_flowers", download=False)
    files = [*flowers.train.paths, *flowers.validation.paths, *flowers.test.paths]
    count = params["count"]
    paths = (files * (count // len(files) + 1))[:count]
    split = data.ImageSplit("scaling", ["any"], [0] * count, paths=paths)
    from tlkit.models import build_feature_extractor

    size = params["image_size"]
    base = build_feature_extractor(params["backbone"], size)
    clock = time.perf_counter()
    features = extract_features(base, split, size, cache=False, progress=False)
    seconds = time.perf_counter() - clock
    return {
        "seconds": round(seconds, 2),
        "images_per_second": round(count / seconds, 1),
        "rows": len(features),
    }


def ceiling(params: dict, args) -> dict:
    """Model FLOPs (per-layer formula) and this CPU's matmul GFLOP/s."""
    import tensorflow as tf

    size = 512 if args.quick else 4096
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    a_numpy, b_numpy = a.numpy(), b.numpy()
    measured = {}
    for name, function in (
        ("tensorflow", lambda: matmul().numpy()),
        ("numpy", lambda: a_numpy @ b_numpy),
    ):
        function()
        times = []
        for _ in range(5):
            clock = time.perf_counter()
            function()
            times.append(time.perf_counter() - clock)
        measured[name] = round(2 * size**3 / statistics.median(times) / 1e9, 1)
    gflops = max(measured.values())
    models = {}
    for backbone in params["backbones"]:
        base, image_size = _base(backbone)
        models[backbone] = {"image_size": image_size, "gflops_per_image": model_flops(base) / 1e9}
    return {
        "matmul_size": size,
        "matmul_gflops": round(gflops, 1),
        "matmul_gflops_by_library": measured,
        "nominal_gflops": nominal_gflops(),
        "models": models,
    }


def nominal_gflops() -> float | None:
    """Cores x nominal clock x 32 float32 FLOP/cycle (two 256-bit FMA units per core)."""
    try:
        megahertz = [
            float(line.split(":")[1])
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("cpu MHz")
        ]
    except OSError:
        return None
    cores = len(os.sched_getaffinity(0))
    return round(cores * max(megahertz) / 1000 * 32, 1) if megahertz else None


def model_flops(model) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers of a model (batch 1)."""
    import keras

    total = 0.0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, height, width, channels = layer.output.shape
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * height * width * channels * kernel
        elif isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * height * width * filters * kernel * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


CONTENDERS = {"contender": contender, "scaling": scaling, "ceiling": ceiling}


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def plan(quick: bool) -> tuple[list[dict], list[dict]]:
    count = 32 if quick else 512
    backbones = BACKBONES[:1] if quick else BACKBONES
    methods = [
        {"method": "keras_predict"},
        {"method": "tlkit_extract", "backend": "litert"},
        {"method": "tlkit_extract", "backend": "keras"},
        {"method": "litert", "batch_size": 1},
    ]
    if not quick:
        methods += [
            {"method": "tf_function"},
            {"method": "xla"},
            {"method": "tlkit_extract", "backend": "keras", "batch_size": 32},
            {"method": "tlkit_extract", "backend": "keras", "batch_size": 128},
            {"method": "tf_function", "intra_threads": 2, "inter_threads": 1},
            {"method": "litert", "batch_size": 8},
            {"method": "litert", "batch_size": 64},
        ]
    runs = [{"backbone": b, "count": count, **m} for b in backbones for m in methods]
    counts = [32, 64] if quick else [1000, 2000, 4000, 8000]
    scale = [{"backbone": SCALING_BACKBONE, "image_size": SCALING_SIZE, "count": c} for c in counts]
    return runs, scale


def label(row: dict) -> str:
    params = row["params"]
    text = params["method"]
    if params.get("backend"):
        text += f" backend={params['backend']}"
    if text == "xla":
        text += " (tf.function jit_compile=True)"
    extras = [f"batch {params.get('batch_size', 64)}"]
    if params.get("intra_threads"):
        extras.append(f"intra {params['intra_threads']} / inter {params.get('inter_threads', 1)}")
    if params["method"] == "litert" or params.get("backend") == "litert":
        extras.append("2 threads")
    return f"{text}, {', '.join(extras)}"


def main(argv=None) -> int:
    args = _common.start(__doc__.splitlines()[0], argv, CONTENDERS)
    if args is None:
        return 0
    _common.ensure_weights(BACKBONES)
    runs, scale = plan(args.quick)
    load_start = os.getloadavg()[0]
    peak = _common.run_contender(SCRIPT, "ceiling", {"backbones": list(BACKBONES)}, args.quick)
    rows = [_common.run_contender(SCRIPT, "contender", params, args.quick) for params in runs]
    scaling_rows = [
        _common.run_contender(SCRIPT, "scaling", params, args.quick) for params in scale
    ]

    table_rows = []
    for backbone in BACKBONES:
        group = [r for r in rows if r["params"]["backbone"] == backbone and "error" not in r]
        keras_row = next((r for r in group if r["params"]["method"] == "keras_predict"), None)
        if not group or keras_row is None:
            continue
        model = peak.get("models", {}).get(backbone, {})
        peak_gflops = max(peak.get("matmul_gflops") or 0, peak.get("nominal_gflops") or 0)
        ceiling_ips = peak_gflops / model["gflops_per_image"] if model else None
        for row in group:
            row["speedup_vs_keras_predict"] = round(
                row["images_per_second"] / keras_row["images_per_second"], 2
            )
            if ceiling_ips:
                row["fraction_of_ceiling"] = round(row["images_per_second"] / ceiling_ips, 3)
            table_rows.append(
                {
                    "backbone": f"{backbone} @{row['image_size']}",
                    "path": label(row),
                    "ips": row["images_per_second"],
                    "speedup": row["speedup_vs_keras_predict"],
                    "ceiling": row.get("fraction_of_ceiling", ""),
                    "diff": f"{row['relative_difference']:.1e}",
                    "equal": row["features_equal"],
                    "rss": row["peak_rss_mb"],
                    "conversion": row.get("conversion_s") or "",
                }
            )
    table = _common.markdown_table(
        table_rows,
        [
            ("backbone", "backbone"),
            ("path", "path"),
            ("ips", "images/s"),
            ("speedup", "x Keras predict"),
            ("ceiling", "of FLOP ceiling"),
            ("diff", "max rel. feature diff"),
            ("equal", f"equal (tol {FEATURE_TOLERANCE})"),
            ("rss", "peak RSS MiB"),
            ("conversion", "LiteRT conversion s (once, untimed)"),
        ],
    )
    peak_gflops = max(peak.get("matmul_gflops") or 0, peak.get("nominal_gflops") or 0)
    ceiling_lines = [
        f"Peak: float32 matmul {peak.get('matmul_size')}^2 measured "
        f"{peak.get('matmul_gflops_by_library')} GFLOP/s; nominal {peak.get('nominal_gflops')} "
        f"GFLOP/s (cores x clock x 32 FLOP/cycle). The ceiling uses the larger, {peak_gflops} GFLOP/s."
    ]
    for backbone, model in peak.get("models", {}).items():
        ceiling_lines.append(
            f"- {backbone} @{model['image_size']}: {model['gflops_per_image']:.3f} GFLOP/image "
            f"(2 x multiply-adds of conv/dense layers) -> ceiling "
            f"{peak_gflops / model['gflops_per_image']:.0f} images/s."
        )
    scaling_table = _common.markdown_table(
        [
            {
                "images": r["params"]["count"],
                "seconds": r.get("seconds"),
                "ips": r.get("images_per_second"),
                "rss": r.get("peak_rss_mb"),
            }
            for r in scaling_rows
        ],
        [
            ("images", "images (flower files, repeated)"),
            ("seconds", "extract_features wall s"),
            ("ips", "images/s"),
            ("rss", "peak RSS MiB"),
        ],
    )
    notes = "\n".join(ceiling_lines) + (
        "\n\nEach row is its own process; timings are one pass over the same in-memory images "
        "after a one-batch warm-up (decode/resize excluded; `tlkit_extract` builds an in-memory "
        "split, so its tf.data pipeline is included). Compare ratios within this run only.\n\n"
        f"## Scaling: extract_features from files (backend auto: LiteRT from 1000 images), {SCALING_BACKBONE} @{SCALING_SIZE}, feature cache off\n\n"
        + scaling_table
    )
    payload = {
        "feature_tolerance": FEATURE_TOLERANCE,
        "load_average_1min_before": round(load_start, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "ceiling": peak,
        "contenders": rows,
        "scaling": scaling_rows,
        "datasets": {"tf_flowers": _flowers_facts()},
    }
    _common.write_results("throughput", args, payload, table, notes)
    print(table + "\n" + notes)
    return 0


def _flowers_facts() -> dict:
    from tlkit import data

    return _common.dataset_facts(data.load("tf_flowers", download=False))


if __name__ == "__main__":
    sys.exit(main())
