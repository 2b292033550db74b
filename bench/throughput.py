"""Frozen-base throughput: Keras predict vs tlkit's extraction path vs faster options.

For each offline backbone at its default size, on the same in-memory flower
images (decoded and resized once, outside the timing):

- `keras_predict`: `base.predict(images, batch_size=64)`, the usual baseline;
- `tlkit_extract`: `tlkit.features.extract_features` on an in-memory split
  (the code path `train_run` uses), at batch 64 and at other batch sizes;
- `tf_function`: a plain `tf.function` forward loop (what extract_features does);
- `xla`: the same with `jit_compile=True` (extract_features' `jit_compile`);
- `litert`: the base converted to LiteRT and run by XNNPACK with 2 threads.

Every contender runs in its own process, warms up on one batch, then times one
pass over the images; features of the first images must equal Keras' within a
stated tolerance. The ceiling is the model's FLOPs (per-layer formula) against
this CPU's practical peak (a large float32 matmul in TensorFlow).

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
    return {"seconds": round(seconds, 3), "images_per_second": round(len(images) / seconds, 1),
            "features": np.asarray(features)}


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
    images = _images(params["count"], size)
    reference = base.predict(images[:32], batch_size=32, verbose=0)

    if method == "keras_predict":
        def run(x):
            return base.predict(x, batch_size=batch_size, verbose=0)
    elif method == "tlkit_extract":
        from tlkit.data import ImageSplit
        from tlkit.features import extract_features

        def run(x):
            split = ImageSplit("bench", ["any"], np.zeros(len(x), np.int32), images=x)
            return extract_features(
                base, split, size, batch_size=batch_size, cache=False, progress=False,
            ).features
    elif method in ("tf_function", "xla"):
        forward = tf.function(lambda x: base(x, training=False), jit_compile=method == "xla")

        def run(x):
            return np.concatenate([
                forward(tf.cast(x[i : i + batch_size], tf.float32)).numpy()
                for i in range(0, len(x), batch_size)
            ])
    elif method == "litert":
        import tempfile

        from ai_edge_litert.interpreter import Interpreter

        # Through a SavedModel, as tlkit.export does (converting the concrete function
        # directly gave all-NaN features with TF 2.21).
        folder = tempfile.mkdtemp(prefix="tlkit-bench-litert-")
        base.export(folder, format="tf_saved_model", verbose=False)
        model_bytes = tf.lite.TFLiteConverter.from_saved_model(folder).convert()
        interpreter = Interpreter(model_content=model_bytes, num_threads=params.get("threads", 2))
        input_index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(input_index, [batch_size, size, size, 3])
        interpreter.allocate_tensors()
        output_index = interpreter.get_output_details()[0]["index"]

        def run(x):
            outputs = []
            for i in range(0, len(x), batch_size):
                chunk = x[i : i + batch_size].astype(np.float32)
                count = len(chunk)
                if count < batch_size:  # The converted graph has a fixed batch.
                    chunk = np.concatenate([chunk, np.zeros((batch_size - count, *chunk.shape[1:]), np.float32)])
                interpreter.set_tensor(input_index, chunk)
                interpreter.invoke()
                outputs.append(interpreter.get_tensor(output_index)[:count].copy())
            return np.concatenate(outputs)
    else:
        raise ValueError(f"Unknown method. Received: method={method!r}")

    timing = _timed(run, images, batch_size)
    features = timing.pop("features")
    return {**timing, **_compare(features[:32], reference), "image_size": size,
            "count": len(images)}


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
    return {"seconds": round(seconds, 2), "images_per_second": round(count / seconds, 1),
            "rows": len(features)}


def ceiling(params: dict, args) -> dict:
    """Model FLOPs (per-layer formula) and this CPU's matmul GFLOP/s."""
    import tensorflow as tf

    size = 512 if args.quick else 4096
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    matmul()
    times = []
    for _ in range(5):
        clock = time.perf_counter()
        matmul().numpy()
        times.append(time.perf_counter() - clock)
    gflops = 2 * size**3 / statistics.median(times) / 1e9
    models = {}
    for backbone in params["backbones"]:
        base, image_size = _base(backbone)
        models[backbone] = {"image_size": image_size, "gflops_per_image": model_flops(base) / 1e9}
    return {"matmul_size": size, "matmul_gflops": round(gflops, 1), "models": models}


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
    count = 32 if quick else 384
    backbones = BACKBONES[:1] if quick else BACKBONES
    methods = [
        {"method": "keras_predict"},
        {"method": "tlkit_extract"},
        {"method": "litert", "batch_size": 16},
    ]
    if not quick:
        methods += [
            {"method": "tf_function"},
            {"method": "xla"},
            {"method": "tlkit_extract", "batch_size": 32},
            {"method": "tlkit_extract", "batch_size": 128},
            {"method": "tf_function", "intra_threads": 2, "inter_threads": 1},
            {"method": "litert", "batch_size": 1},
            {"method": "litert", "batch_size": 64},
        ]
    runs = [{"backbone": b, "count": count, **m} for b in backbones for m in methods]
    counts = [32, 64] if quick else [1000, 2000, 4000, 8000]
    scale = [{"backbone": SCALING_BACKBONE, "image_size": SCALING_SIZE, "count": c} for c in counts]
    return runs, scale


def label(row: dict) -> str:
    params = row["params"]
    text = params["method"]
    if text == "xla":
        text += " (tf.function jit_compile=True)"
    extras = [f"batch {params.get('batch_size', 64)}"]
    if params.get("intra_threads"):
        extras.append(f"intra {params['intra_threads']} / inter {params.get('inter_threads', 1)}")
    if params["method"] == "litert":
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
    scaling_rows = [_common.run_contender(SCRIPT, "scaling", params, args.quick) for params in scale]

    table_rows = []
    for backbone in BACKBONES:
        group = [r for r in rows if r["params"]["backbone"] == backbone and "error" not in r]
        keras_row = next((r for r in group if r["params"]["method"] == "keras_predict"), None)
        if not group or keras_row is None:
            continue
        model = peak.get("models", {}).get(backbone, {})
        ceiling_ips = peak.get("matmul_gflops", 0) / model["gflops_per_image"] if model else None
        for row in group:
            row["speedup_vs_keras_predict"] = round(row["images_per_second"] / keras_row["images_per_second"], 2)
            if ceiling_ips:
                row["fraction_of_ceiling"] = round(row["images_per_second"] / ceiling_ips, 3)
            table_rows.append({
                "backbone": f"{backbone} @{row['image_size']}", "path": label(row),
                "ips": row["images_per_second"], "speedup": row["speedup_vs_keras_predict"],
                "ceiling": row.get("fraction_of_ceiling", ""),
                "diff": f"{row['relative_difference']:.1e}", "equal": row["features_equal"],
                "rss": row["peak_rss_mb"],
            })
    table = _common.markdown_table(table_rows, [
        ("backbone", "backbone"), ("path", "path"), ("ips", "images/s"),
        ("speedup", "x Keras predict"), ("ceiling", "of FLOP ceiling"),
        ("diff", "max rel. feature diff"), ("equal", f"equal (tol {FEATURE_TOLERANCE})"),
        ("rss", "peak RSS MiB"),
    ])
    ceiling_lines = [f"Practical peak: float32 matmul {peak.get('matmul_size')}^2 in TensorFlow "
                     f"= {peak.get('matmul_gflops')} GFLOP/s."]
    for backbone, model in peak.get("models", {}).items():
        ceiling_lines.append(
            f"- {backbone} @{model['image_size']}: {model['gflops_per_image']:.3f} GFLOP/image "
            f"(2 x multiply-adds of conv/dense layers) -> ceiling "
            f"{peak['matmul_gflops'] / model['gflops_per_image']:.0f} images/s.")
    scaling_table = _common.markdown_table(
        [{"images": r["params"]["count"], "seconds": r.get("seconds"),
          "ips": r.get("images_per_second"), "rss": r.get("peak_rss_mb")} for r in scaling_rows],
        [("images", "images (flower files, repeated)"),
         ("seconds", "extract_features wall s"), ("ips", "images/s"), ("rss", "peak RSS MiB")],
    )
    notes = "\n".join(ceiling_lines) + (
        "\n\nEach row is its own process; timings are one pass over the same in-memory images "
        "after a one-batch warm-up (decode/resize excluded; `tlkit_extract` builds an in-memory "
        "split, so its tf.data pipeline is included). Compare ratios within this run only.\n\n"
        f"## Scaling: extract_features from files, {SCALING_BACKBONE} @{SCALING_SIZE}, cache off\n\n"
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
