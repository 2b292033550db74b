"""Shared plumbing of the tlkit benchmarks: sizes, isolation, machine facts, results.

Every benchmark script follows the same shape:

- `--quick` (or `QUICK=1`) shrinks the data and epochs so the script finishes in
  about a minute; the test suite runs that size (`tests/test_bench_quick.py`).
- Each contender runs in its own subprocess (`run_contender`), so its peak
  resident memory (`ru_maxrss` of that process) is its own, and a contender
  cannot warm a cache for the next one.
- Every subprocess gets a fresh, empty `$TLKIT_CACHE_DIR` (features are computed,
  never read from an earlier run); only the converted ImageNet weights (a
  one-time install step) are linked in.
- Results go to `<results>/<name>.json` and `<results>/<name>.md`, each written
  atomically, with the machine, versions, seeds, dataset fingerprints and the
  exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_RESULTS = BENCH_DIR / "results"
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "datasets"

_START_LOAD: list[float] | None = None  # set by `start`

if str(ROOT) not in sys.path:  # Run as `python bench/x.py` from a checkout.
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(description: str, argv=None, extra: Callable | None = None) -> argparse.Namespace:
    """The common command line: --quick, --results, --seed, and the child mode."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (also QUICK=1)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="output folder")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # contender name (subprocess)
    parser.add_argument("--params", help=argparse.SUPPRESS)  # JSON parameters (subprocess)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.quick = args.quick or os.environ.get("QUICK", "").lower() in ("1", "true", "yes")
    return args


def command_line() -> str:
    """The command that started this process, as a copy-paste shell line."""
    quick = "QUICK=1 " if os.environ.get("QUICK", "").lower() in ("1", "true", "yes") else ""
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return quick + shlex.join(["python", script, *sys.argv[1:]])


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def setup_environment() -> None:
    """Quiet TensorFlow and point tlkit at the shared datasets when unset."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not os.environ.get("TLKIT_DATA_DIR") and DEFAULT_DATA_DIR.is_dir():
        os.environ["TLKIT_DATA_DIR"] = str(DEFAULT_DATA_DIR)


def machine() -> dict[str, Any]:
    """nproc, CPU model and vector flags, memory and the load average right now.

    The flags (AVX2, AVX-512, VNNI, FMA...) tell apart machines that share a
    model name: XNNPACK and oneDNN pick their kernels by them.
    """
    from tlkit._cpu import cpu_facts

    facts = cpu_facts()
    memory_gb = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": facts["usable_cores"],
        "cpu_model": facts["cpu_model"],
        "cpu_flags": facts["vector_flags"],
        "cpu_max_mhz": facts["max_mhz"],
        "memory_gb": memory_gb,
        "load_average_at_start": _START_LOAD or load_average(),
        "load_average_at_end": load_average(),
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def thread_settings() -> dict[str, Any]:
    """The thread counts TensorFlow uses in this process (0 = TensorFlow's default: all cores)."""
    import tensorflow as tf

    return {
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def page_cache_fraction(paths, sample: int = 400) -> float | None:
    """Share of the bytes of (a sample of) `paths` already in the page cache.

    Uses util-linux `fincore`; None when it is missing. A value near 1 means
    the files are read from memory, not from disk, in what follows.
    """
    import random
    import shutil

    if not paths or shutil.which("fincore") is None:
        return None
    chosen = random.Random(0).sample(list(paths), min(sample, len(paths)))
    resident = total = 0
    for start in range(0, len(chosen), 100):
        completed = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE"]
            + chosen[start : start + 100],
            capture_output=True,
            text=True,
        )
        for line in completed.stdout.split("\n"):
            fields = line.split()
            if len(fields) == 2 and all(f.isdigit() for f in fields):
                resident += int(fields[0])
                total += int(fields[1])
    return round(min(1.0, resident / total), 3) if total else None  # RES counts whole pages


def versions() -> dict[str, str]:
    """tlkit / TF / Keras / numpy / Python versions, plus LiteRT when installed."""
    from tlkit.training import versions as tlkit_versions

    result = tlkit_versions()
    try:
        from importlib.metadata import version

        result["ai_edge_litert"] = version("ai-edge-litert")
    except Exception:  # Not installed: the LiteRT contender is skipped.
        pass
    return result


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def fresh_cache_dir() -> Path:
    """An empty tlkit cache folder with only the converted weights linked in."""
    from tlkit._io import cache_dir

    folder = Path(tempfile.mkdtemp(prefix="tlkit-bench-cache-"))
    weights = cache_dir() / "weights"
    if weights.is_dir():
        (folder / "weights").symlink_to(weights, target_is_directory=True)
    checksums = cache_dir() / "checksums" / "weights"  # else the weights count as damaged
    if checksums.is_dir():
        (folder / "checksums").mkdir()
        (folder / "checksums" / "weights").symlink_to(checksums, target_is_directory=True)
    return folder


def ensure_weights(backbones) -> None:
    """Converts the offline weights once, outside every timed contender."""
    from tlkit.models import build_feature_extractor

    for name in backbones:
        build_feature_extractor(name)


# ---------------------------------------------------------------------------
# Contenders in subprocesses
# ---------------------------------------------------------------------------


def run_contender(script: str, name: str, params: dict, quick: bool, timeout: float = 3600) -> dict:
    """Runs `script --child name` in a fresh process and returns its JSON result.

    The child gets a fresh `$TLKIT_CACHE_DIR`. Its result carries
    `peak_rss_mb` (the child's own peak) and `process_wall_s` (including the
    import of TensorFlow, which the contender's own timings leave out).
    """
    cache = fresh_cache_dir()
    with tempfile.TemporaryDirectory(prefix="tlkit-bench-") as folder:
        result_file = Path(folder) / "result.json"
        command = [
            sys.executable,
            str(BENCH_DIR / script),
            "--child",
            name,
            "--params",
            json.dumps(params),
            "--result-file",
            str(result_file),
        ] + (["--quick"] if quick else [])
        environment = {**os.environ, "TLKIT_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        print(f"[{script}] {name} {json.dumps(params)}", flush=True)
        started = time.perf_counter()
        completed = subprocess.run(command, env=environment, timeout=timeout)
        wall = time.perf_counter() - started
        _remove_tree(cache)
        if completed.returncode != 0 or not result_file.is_file():
            return {
                "contender": name,
                "params": params,
                "error": f"exit code {completed.returncode}",
            }
        result = json.loads(result_file.read_text())
    result["process_wall_s"] = round(wall, 2)
    return result


def run_interleaved(
    script: str, runs: list[tuple[str, dict]], quick: bool, repeats: int
) -> list[list[dict]]:
    """Runs every contender once per round, in the same order, for `repeats` rounds.

    A B C A B C ...: a load spike from another user of the machine falls on one
    repeat of every contender rather than on all repeats of one, so medians of
    the repeats compare. Each run records the load average before and after.

    Returns:
        One list of results per contender (same order as `runs`), one per repeat.
    """
    results: list[list[dict]] = [[] for _ in runs]
    for round_index in range(repeats):
        for position, (name, params) in enumerate(runs):
            print(f"[round {round_index + 1}/{repeats}]", end=" ", flush=True)
            results[position].append(run_contender(script, name, params, quick))
    return results


def median_result(repeats: list[dict], keys: tuple[str, ...]) -> dict:
    """The first successful repeat with `keys` replaced by their medians over the repeats.

    Adds `repeats` (each repeat's value of `keys[0]`, its load averages and peak RSS)
    and `repeat_count`; an `error` when no repeat succeeded.
    """
    good = [r for r in repeats if "error" not in r]
    if not good:
        return {**repeats[0]}
    merged = {**good[0]}
    for key in keys:
        values = [r[key] for r in good if r.get(key) is not None]
        if values:
            merged[key] = round(statistics.median(values), 3)
    merged["peak_rss_mb"] = max(r.get("peak_rss_mb", 0) for r in good)
    merged["repeat_count"] = len(good)
    merged["repeats"] = [
        {
            keys[0]: r.get(keys[0]),
            "load_average_before": r.get("load_average_before"),
            "load_average_after": r.get("load_average_after"),
            "peak_rss_mb": r.get("peak_rss_mb"),
        }
        for r in good
    ]
    return merged


def child_main(args: argparse.Namespace, contenders: dict[str, Callable]) -> None:
    """The child side of `run_contender`: runs one contender, writes its result."""
    from tlkit._io import write_json

    params = json.loads(args.params or "{}")
    load_before = load_average()
    result = contenders[args.child](params, args)
    result = {
        "contender": args.child,
        "params": params,
        **result,
        "peak_rss_mb": peak_rss_mb(),
        "threads": {**thread_settings(), **result.get("threads", {})},
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    write_json(args.result_file, result)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def dataset_facts(dataset) -> dict[str, Any]:
    """Name, split sizes and `split.fingerprint()` of every split."""
    return {
        "name": dataset.name,
        "sizes": {name: len(split) for name, split in dataset.splits.items()},
        "fingerprints": {name: split.fingerprint() for name, split in dataset.splits.items()},
    }


def write_results(
    name: str, args: argparse.Namespace, payload: dict, table: str, notes: str = ""
) -> Path:
    """Writes `<results>/<name>.json` and `<name>.md` atomically; returns the JSON path."""
    from tlkit._io import write_json, write_text

    record = {
        "benchmark": name,
        "quick": bool(args.quick),
        "command": command_line(),
        "seed": args.seed,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "versions": versions(),
        **payload,
    }
    folder = Path(args.results)
    write_json(folder / f"{name}.json", record)
    header = (
        f"# {name}\n\n"
        f"Command: `{record['command']}`  \n"
        f"Machine: {record['machine']['nproc']} CPU(s), {record['machine']['cpu_model']}, "
        f"{record['machine']['memory_gb']} GB; flags {' '.join(record['machine']['cpu_flags'])}; "
        f"load average at start "
        f"{record['machine']['load_average_at_start']}, at end "
        f"{record['machine']['load_average_at_end']}  \n"
        f"Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if k != "platform")
        + "  \n"
        f"Seed: {args.seed}; quick: {bool(args.quick)}; finished {record['finished_at']}\n\n"
    )
    write_text(
        folder / f"{name}.md",
        header + table.rstrip() + "\n" + (f"\n{notes.rstrip()}\n" if notes else ""),
    )
    return folder / f"{name}.json"


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table from dict rows; `columns` are (key, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            if isinstance(value, float):
                value = f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def wait_for_quiet_machine(
    max_load: float = 1.5, max_wait_s: float = 0, poll_s: float = 15
) -> list[float]:
    """Waits (up to `max_wait_s`) until the 1-minute load average is below `max_load`."""
    deadline = time.time() + max_wait_s
    while os.getloadavg()[0] >= max_load and time.time() < deadline:
        time.sleep(poll_s)
    return [round(x, 2) for x in os.getloadavg()]


def load_dataset(name: str, quick: bool, per_class: int = 12, seed: int = 42):
    """A named dataset; in quick mode `per_class` examples per class of every split."""
    from tlkit import data

    dataset = data.load(name, download=False, seed=seed)
    if not quick:
        return dataset
    splits = {
        split_name: split.sample_per_class(
            min(per_class, min(split.class_counts().values())), seed=seed
        )
        for split_name, split in dataset.splits.items()
    }
    return data.ImageDataset(
        dataset.name,
        dataset.class_names,
        splits["train"],
        splits.get("validation"),
        splits.get("test"),
        info=dataset.info,
    )


class PhaseClock:
    """Per-phase wall time, images/s and the process' peak RSS at the end of each phase."""

    def __init__(self):
        self.phases: dict[str, dict] = {}

    def record(self, name: str, seconds: float, images: int | None = None, **extra) -> None:
        entry = {"wall_s": round(seconds, 2), "peak_rss_mb_so_far": peak_rss_mb(), **extra}
        if images:
            entry["images"] = int(images)
            entry["images_per_second"] = round(images / seconds, 1) if seconds > 0 else None
        self.phases[name] = entry


def start(description: str, argv, contenders):
    """Parses arguments and sets up; runs the child and returns None in a child process.

    Returns:
        The parsed arguments in the parent process, None after running a child.
    """
    global _START_LOAD
    args = parse_args(description, argv)
    setup_environment()
    _START_LOAD = load_average()
    if args.child:
        child_main(args, contenders)
        return None
    return args
