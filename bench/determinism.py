"""What `--deterministic` costs: fine-tuning time with and without op determinism.

`tf.config.experimental.enable_op_determinism()` is process-wide and cannot be
turned off, so each measurement runs in its own subprocess; the two settings
alternate so machine noise hits both alike. Reports medians and their ratio.

    python bench/determinism.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ONE_RUN = """
import json, sys, time
import tlkit
flowers = tlkit.data.load("tf_flowers")
train = flowers.train.sample_per_class({per_class}, seed=0)
dataset = tlkit.data.ImageDataset("flowers-subset", flowers.class_names, train, flowers.validation.sample_per_class(10, seed=0))
config = tlkit.TrainConfig(backbone="mobilenet_v2", image_size={size}, epochs=5, fine_tune_epochs=2,
                           batch_size=16, deterministic={deterministic})
started = time.perf_counter()
result = tlkit.train_run(dataset, config, progress=False, log=lambda *_: None)
print(json.dumps({{"fine_tuning_s": result.metrics["timings"]["fine_tuning_s"],
                  "total_s": time.perf_counter() - started,
                  "loss": result.histories["fine_tune"]["loss"][-1]}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    arguments = parser.parse_args()
    per_class, size = (8, 96) if arguments.quick else (40, 160)
    runs: dict[str, list[dict]] = {"default": [], "deterministic": []}
    for _ in range(1 if arguments.quick else arguments.repeats):
        for mode in ("default", "deterministic"):
            code = ONE_RUN.format(
                per_class=per_class, size=size, deterministic=mode == "deterministic"
            )
            output = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            ).stdout
            runs[mode].append(json.loads(output.strip().splitlines()[-1]))
    medians = {
        mode: statistics.median(r["fine_tuning_s"] for r in results)
        for mode, results in runs.items()
    }
    summary = {
        "benchmark": "determinism",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count()},
        "setup": {
            "backbone": "mobilenet_v2",
            "image_size": size,
            "images_per_class": per_class,
            "fine_tune_epochs": 2,
            "blocks": 2,
        },
        "runs": runs,
        "median_fine_tuning_s": medians,
        "ratio_deterministic_to_default": medians["deterministic"] / medians["default"],
        "date": time.strftime("%Y-%m-%d"),
    }
    from tlkit._io import write_json, write_text

    name = "determinism-quick" if arguments.quick else "determinism"
    write_json(Path(arguments.results) / f"{name}.json", summary)
    table = (
        "| setting | median fine-tuning time (s) |\n|---|---|\n"
        + "".join(f"| {mode} | {value:.1f} |\n" for mode, value in medians.items())
        + f"\nRatio deterministic / default: {summary['ratio_deterministic_to_default']:.2f} "
        f"({len(runs['default'])} alternating runs each). Command: `{summary['command']}`\n"
    )
    write_text(Path(arguments.results) / f"{name}.md", table)
    print(table)


if __name__ == "__main__":
    main()
