"""Frozen-base throughput: tlkit's default path from files vs Keras predict on tensors.

For each offline backbone at its default size (224 px), on the same flower
photos (the files are read once first, so every contender finds them in the
page cache; the share in cache is recorded):

- `keras_predict`: `base.predict(images, batch_size=64)` on decoded images in
  memory (decoding not timed), the usual baseline;
- `extract_files`: `tlkit.features.extract_features` from the files (decoding
  and resizing timed, feature cache off), `backend="auto"` (the default: LiteRT
  on a CPU, with its start-up probe of thread / batch / interpreter counts,
  run untimed first on 640 files, like the one-off LiteRT conversion: both are
  once per machine and stored in the cache) and `"keras"`;
- `tf_function`: a plain `tf.function` forward loop on tensors;
- `litert`: `tlkit.litert.LiteRTModel` alone on tensors, at several batch sizes,
  one interpreter on all cores or one single-threaded interpreter per core.

Every contender runs in its own process; the contenders run interleaved (A B C
... A B C ...) for `--repeats` rounds (3) and the tables give medians, with the
load average of each repeat in the JSON. Features of the first images must equal
Keras' within a stated tolerance. The ceiling is the model's FLOPs (per-layer
formula) against this CPU's peak: measured (the faster of a large float32 matmul
in TensorFlow and in numpy) and nominal (cores x clock x 32 float32 FLOP per
cycle, two 256-bit FMA units; 64 with AVX-512 is given beside it).

Then memory: peak RSS of `extract_features` (default path, from files, files
repeated) on 1k and 10k images, each in its own process, interleaved.

XLA (`jit_compile=True`) is no contender any more: it ran at 0.07-0.09x Keras
predict on this CPU (bench/results/throughput.md of 2026-11-23).

    python bench/throughput.py            # full: ~25 minutes on 2 cores
    python bench/throughput.py --quick    # ~2 minutes
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
MEMORY_BACKBONE, MEMORY_SIZE = "mobilenet_v2", 160  # the cheapest, so 10k images fit the budget
FEATURE_TOLERANCE = 1e-3  # max |difference| / max |Keras feature|, float32 vs fused kernels
REPEATS = 3
PROBE_IMAGES = 640  # >= tlkit.inference.PROBE_MIN_IMAGES: enough for the LiteRT probe


# ---------------------------------------------------------------------------
# Inputs and reference features
# ---------------------------------------------------------------------------


def _flower_files(count: int) -> list[str]:
    """`count` flower photos (all splits, repeated when more are asked for)."""
    from tlkit import data

    flowers = data.load("tf_flowers", download=False)
    files = [*flowers.train.paths, *flowers.validation.paths, *flowers.test.paths]
    return (files * (count // len(files) + 1))[:count]


def _split(count: int):
    from tlkit import data

    return data.ImageSplit("bench", ["any"], [0] * count, paths=_flower_files(count))


def _images(count: int, image_size: int):
    """The first `count` flower photos, decoded and resized once (float32, in memory)."""
    import numpy as np

    batches = [images.numpy() for images, _ in _split(count).to_dataset(image_size, 64)]
    return np.concatenate(batches)


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


# ---------------------------------------------------------------------------
# Contenders (each in its own process)
# ---------------------------------------------------------------------------


def contender(params: dict, args) -> dict:
    import numpy as np
    import tensorflow as tf

    from tlkit.features import extract_features
    from tlkit.inference import read_settings, settings_path
    from tlkit.litert import LiteRTModel

    backbone, method = params["backbone"], params["method"]
    batch_size = params.get("batch_size", 64)
    count = params["count"]
    base, size = _base(backbone)
    images = _images(count, size)  # tensors contenders: decoded outside the timing
    reference = base.predict(images[:32], batch_size=32, verbose=0)
    threads, extra = {}, {}
    backend = params.get("backend")
    if method == "litert" or backend in ("auto", "litert"):
        clock = time.perf_counter()  # Convert (and cache) once, outside the timing.
        LiteRTModel(base, size)
        extra["conversion_s"] = round(time.perf_counter() - clock, 2)

    if method == "keras_predict":

        def run():
            return base.predict(images, batch_size=batch_size, verbose=0)
    elif method == "extract_files":
        split = _split(count)
        extra["page_cache_fraction"] = _common.page_cache_fraction(split.paths)
        if backend == "auto" and not args.quick:  # The once-per-machine probe, untimed.
            clock = time.perf_counter()
            probe_split = _split(max(PROBE_IMAGES, count))
            extract_features(base, probe_split, size, cache=False, progress=False, backend=backend)
            extra["probe_run_s"] = round(time.perf_counter() - clock, 2)

        def run():
            return extract_features(
                base,
                split,
                size,
                batch_size=batch_size,
                cache=False,
                progress=False,
                backend=backend,
            ).features
    elif method == "tf_function":
        forward = tf.function(lambda x: base(x, training=False))

        def run():
            return np.concatenate(
                [
                    forward(tf.constant(images[i : i + batch_size])).numpy()
                    for i in range(0, len(images), batch_size)
                ]
            )
    elif method == "litert":
        model = LiteRTModel(
            base,
            size,
            batch_size=batch_size,
            num_threads=params.get("threads"),
            interpreters=params.get("interpreters", 1),
        )
        threads = {
            "litert_num_threads": model.num_threads,
            "litert_interpreters": model.interpreters,
        }

        def run():
            return model(images)
    else:
        raise ValueError(f"Unknown method. Received: method={method!r}")

    if method == "keras_predict":  # Warm-up on one batch (extract_files: its probe is timed).
        base.predict(images[:batch_size], batch_size=batch_size, verbose=0)
    elif method == "tf_function":
        forward(tf.constant(images[:batch_size]))
    elif method == "litert":
        model(images[: max(batch_size, model.interpreters)])
    clock = time.perf_counter()
    features = np.asarray(run())
    seconds = time.perf_counter() - clock
    if method == "extract_files" and backend == "auto":
        probe = settings_path(base.name, size)
        chosen = read_settings(probe)
        extra["litert_probe"] = _read_json(probe)
        if chosen:
            threads = {
                "litert_num_threads": chosen["num_threads"],
                "litert_interpreters": chosen["interpreters"],
                "litert_batch_size": chosen["batch_size"],
            }
    return {
        "seconds": round(seconds, 3),
        "images_per_second": round(count / seconds, 1),
        **_compare(features[:32], reference),
        "image_size": size,
        "count": count,
        "threads": threads,
        **extra,
    }


def _read_json(path: Path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def memory(params: dict, args) -> dict:
    """extract_features over `count` flower files (repeated), from files, no cache."""
    from tlkit.features import extract_features
    from tlkit.models import build_feature_extractor

    count, size = params["count"], params["image_size"]
    split = _split(count)
    base = build_feature_extractor(params["backbone"], size)
    rss_before = _common.peak_rss_mb()
    clock = time.perf_counter()
    features = extract_features(base, split, size, cache=False, progress=False).features
    seconds = time.perf_counter() - clock
    return {
        "seconds": round(seconds, 2),
        "images_per_second": round(count / seconds, 1),
        "rows": len(features),
        "feature_mb": round(features.nbytes / 2**20, 1),
        "peak_rss_mb_before_extraction": rss_before,
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
        "nominal_gflops": nominal_gflops(32),
        "nominal_gflops_avx512": nominal_gflops(64),
        "models": models,
    }


def nominal_gflops(flop_per_cycle: int) -> float | None:
    """Cores x nominal clock x float32 FLOP/cycle (32: two 256-bit FMA units per core)."""
    from tlkit._cpu import cpu_facts

    facts = cpu_facts()
    if not facts["max_mhz"]:
        return None
    return round(facts["usable_cores"] * facts["max_mhz"] / 1000 * flop_per_cycle, 1)


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


CONTENDERS = {"contender": contender, "memory": memory, "ceiling": ceiling}


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------


def plan(quick: bool, count: int | None = None, backbones=None, methods=None):
    """The contender runs and the memory runs; `methods` names a subset (`_method_name`)."""
    count = count or (32 if quick else 1000)
    backbones = backbones or (BACKBONES[:1] if quick else BACKBONES)
    cores = len(os.sched_getaffinity(0))
    chosen = _all_methods(cores)[: 3 if quick else None]
    if methods:
        chosen = [m for m in _all_methods(cores) if _method_name(m) in methods]
    methods = chosen
    runs = [{"backbone": b, "count": count, **m} for b in backbones for m in methods]
    counts = [32, 64] if quick else [1000, 10000]
    scale = [{"backbone": MEMORY_BACKBONE, "image_size": MEMORY_SIZE, "count": c} for c in counts]
    return runs, scale


def _all_methods(cores: int) -> list[dict]:
    return [
        {"method": "keras_predict"},
        {"method": "extract_files", "backend": "auto"},
        {"method": "litert", "batch_size": 1},
        {"method": "extract_files", "backend": "keras"},
        {"method": "tf_function"},
        {"method": "litert", "batch_size": 8},
        {"method": "litert", "batch_size": 64},
        {"method": "litert", "batch_size": 1, "threads": 1, "interpreters": cores},
    ]


def _method_name(method: dict) -> str:
    """keras_predict, extract_files-auto, litert-1, litert-1x2 (per core), tf_function..."""
    name = method["method"]
    if "backend" in method:
        return f"{name}-{method['backend']}"
    if name == "litert":
        per_core = f"x{method['interpreters']}" if method.get("interpreters", 1) > 1 else ""
        return f"litert-{method['batch_size']}{per_core}"
    return name


def label(row: dict) -> str:
    params, threads = row["params"], row.get("threads", {})
    text = params["method"]
    if params.get("backend"):
        text += f" backend={params['backend']}"
    extras = [f"batch {params.get('batch_size', 64)}"]
    if threads.get("litert_num_threads"):
        extras.append(
            f"LiteRT {threads.get('litert_interpreters', 1)} interpreter(s) x "
            f"{threads['litert_num_threads']} thread(s)"
            + (
                f", invoke batch {threads['litert_batch_size']}"
                if "litert_batch_size" in threads
                else ""
            )
        )
    elif params["method"] != "litert":
        extras.append(
            f"TF intra {threads.get('tf_intra_op_threads')} / inter "
            f"{threads.get('tf_inter_op_threads')} (0 = all cores)"
        )
    return f"{text}, {', '.join(extras)}"


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--repeats", type=int, default=None, help="rounds (3; quick 1)")
        parser.add_argument("--only-memory", action="store_true", help="the memory rows only")
        parser.add_argument("--count", type=int, help="images per contender (1000; quick 32)")
        parser.add_argument("--backbones", nargs="+", choices=BACKBONES, help="default: both")
        parser.add_argument(
            "--methods",
            nargs="+",
            help="a subset, e.g. keras_predict extract_files-auto litert-1 (default: all)",
        )
        parser.add_argument("--no-memory", action="store_true", help="skip the memory rows")

    args = _common.parse_args(__doc__.splitlines()[0], argv, extra)
    _common.setup_environment()
    _common._START_LOAD = _common.load_average()
    if args.child:
        _common.child_main(args, CONTENDERS)
        return 0
    repeats = args.repeats or (1 if args.quick else REPEATS)
    _common.ensure_weights(BACKBONES)
    runs, scale = plan(args.quick, args.count, args.backbones, args.methods)
    scale = [] if args.no_memory else scale
    files = _flower_files(max(r["count"] for r in runs))
    _read_all(files)  # Every contender finds the files in the page cache.
    page_cache = _common.page_cache_fraction(files)
    load_start = _common.load_average()
    rows, peak = [], {}
    if not args.only_memory:
        peak = _common.run_contender(SCRIPT, "ceiling", {"backbones": list(BACKBONES)}, args.quick)
        repeated = _common.run_interleaved(
            SCRIPT, [("contender", p) for p in runs], args.quick, repeats
        )
        rows = [_common.median_result(r, ("images_per_second", "seconds")) for r in repeated]
    memory_repeated = _common.run_interleaved(
        SCRIPT, [("memory", p) for p in scale], args.quick, repeats
    )
    memory_rows = [
        _common.median_result(r, ("images_per_second", "seconds")) for r in memory_repeated
    ]
    table, ceiling_lines = _throughput_table(rows, peak)
    memory_table = _common.markdown_table(
        [
            {
                "images": r["params"]["count"],
                "seconds": r.get("seconds"),
                "ips": r.get("images_per_second"),
                "rss": r.get("peak_rss_mb"),
                "features": r.get("feature_mb"),
                "loads": ", ".join(str(x["load_average_before"][0]) for x in r.get("repeats", [])),
            }
            for r in memory_rows
        ],
        [
            ("images", "images (flower files, repeated)"),
            ("seconds", "extract_features wall s (median)"),
            ("ips", "images/s"),
            ("rss", "peak RSS MiB (max of repeats)"),
            ("features", "feature array MiB"),
            ("loads", "1-min load before each repeat"),
        ],
    )
    notes = "\n".join(ceiling_lines) + (
        f"\n\nEach row is its own process, {repeats} interleaved repeat(s), median images/s; the "
        "JSON has every repeat with its load average. `keras_predict`, `tf_function` and "
        "`litert` run on decoded images in memory; `extract_files` decodes and resizes the "
        f"files inside the timing (share of the files' bytes in the page cache: {page_cache}). "
        "Compare ratios within this run only.\n\n"
        f"## Memory: extract_features from files (default backend), {MEMORY_BACKBONE} "
        f"@{MEMORY_SIZE}, feature cache off\n\n" + memory_table
    )
    payload = {
        "feature_tolerance": FEATURE_TOLERANCE,
        "repeats": repeats,
        "page_cache_fraction": page_cache,
        "load_average_before": load_start,
        "load_average_after": _common.load_average(),
        "ceiling": peak,
        "contenders": rows,
        "memory": memory_rows,
        "raw": {"contenders": [] if args.only_memory else repeated, "memory": memory_repeated},
        "datasets": {"tf_flowers": _flowers_facts()},
    }
    _common.write_results("throughput", args, payload, table, notes)
    print(table + "\n" + notes)
    return 0


def _read_all(files) -> None:
    for path in dict.fromkeys(files):
        with open(path, "rb") as handle:
            handle.read()


def _throughput_table(rows: list[dict], peak: dict) -> tuple[str, list[str]]:
    peak_gflops = max(peak.get("matmul_gflops") or 0, peak.get("nominal_gflops") or 0)
    table_rows = []
    for backbone in BACKBONES:
        group = [r for r in rows if r["params"]["backbone"] == backbone and "error" not in r]
        keras_row = next((r for r in group if r["params"]["method"] == "keras_predict"), None)
        if not group or keras_row is None:
            continue
        model = peak.get("models", {}).get(backbone, {})
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
                    "loads": ", ".join(
                        str(x["load_average_before"][0]) for x in row.get("repeats", [])
                    ),
                    "conversion": row.get("conversion_s") or "",
                }
            )
    table = _common.markdown_table(
        table_rows,
        [
            ("backbone", "backbone"),
            ("path", "path"),
            ("ips", "images/s (median)"),
            ("speedup", "x Keras predict"),
            ("ceiling", "of FLOP ceiling"),
            ("diff", "max rel. feature diff"),
            ("equal", f"equal (tol {FEATURE_TOLERANCE})"),
            ("rss", "peak RSS MiB"),
            ("loads", "1-min load before each repeat"),
            ("conversion", "LiteRT conversion s (untimed)"),
        ],
    )
    lines = [
        f"Peak: float32 matmul {peak.get('matmul_size')}^2 measured "
        f"{peak.get('matmul_gflops_by_library')} GFLOP/s; nominal {peak.get('nominal_gflops')} "
        f"GFLOP/s (cores x clock x 32 FLOP/cycle; {peak.get('nominal_gflops_avx512')} at 64, "
        f"if the AVX-512 units are full width). The ceiling uses {peak_gflops} GFLOP/s."
    ]
    for backbone, model in peak.get("models", {}).items():
        lines.append(
            f"- {backbone} @{model['image_size']}: {model['gflops_per_image']:.3f} GFLOP/image "
            f"(2 x multiply-adds of conv/dense layers) -> ceiling "
            f"{peak_gflops / model['gflops_per_image']:.0f} images/s."
        )
    return table, lines


def _flowers_facts() -> dict:
    from tlkit import data

    return _common.dataset_facts(data.load("tf_flowers", download=False))


if __name__ == "__main__":
    sys.exit(main())
