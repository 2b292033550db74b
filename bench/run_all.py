"""Runs every tlkit benchmark and writes `bench/results/SUMMARY.md`.

Each benchmark runs as its own command (the same line a person would type),
one after another, so they never share the CPU. Before each, it waits (up to
--max-wait seconds) for the 1-minute load average to fall below --max-load and
records the load it started at.

    python bench/run_all.py            # full: ~25 minutes on 2 quiet cores (`make bench`)
    python bench/run_all.py --quick    # ~5 minutes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

BENCHMARKS = ("tutorial_race", "throughput", "fine_tune_speed", "published")


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
        parser.add_argument("--max-load", type=float, default=1.5)
        parser.add_argument("--max-wait", type=float, default=600.0)

    args = _common.parse_args(__doc__.splitlines()[0], argv, extra)
    _common.setup_environment()
    status = {}
    for name in args.only:
        load = _common.wait_for_quiet_machine(args.max_load, 0 if args.quick else args.max_wait)
        command = [
            sys.executable,
            str(_common.BENCH_DIR / f"{name}.py"),
            "--results",
            str(args.results),
            "--seed",
            str(args.seed),
        ] + (["--quick"] if args.quick else [])
        print(f"== {name} (load average {load}) ==", flush=True)
        started = time.perf_counter()
        status[name] = {
            "returncode": subprocess.run(command).returncode,
            "wall_s": round(time.perf_counter() - started, 1),
            "load_average_before": load,
        }
    write_summary(Path(args.results), status)
    return 0 if all(s["returncode"] == 0 for s in status.values()) else 1


def write_summary(folder: Path, status: dict) -> None:
    """SUMMARY.md: every benchmark's markdown table, in order, under one header."""
    from tlkit._io import write_text

    parts = [
        "# tlkit benchmarks: summary\n",
        f"Written by `python bench/run_all.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"machine: {os.cpu_count()} CPU(s), {_common.machine()['cpu_model']}. Every section "
        "below is the `.md` of one benchmark (its JSON has every number and the exact "
        "command). Compare ratios within one run only: absolute times on a shared "
        "2-core machine are noisy.\n",
    ]
    for name in BENCHMARKS:
        markdown, record = folder / f"{name}.md", folder / f"{name}.json"
        if not markdown.is_file():
            continue
        state = status.get(name)
        text = markdown.read_text().replace(f"# {name}\n", f"## {name}\n", 1)
        text = text.replace("\n## ", "\n### ")
        text = (
            text.replace(f"\n### {name}\n", f"\n## {name}\n", 1) if text.startswith("##") else text
        )
        if state:
            text += f"\n(exit code {state['returncode']}, {state['wall_s']} s, load before {state['load_average_before']})\n"
        elif record.is_file():
            text += (
                f"\n(from an earlier run: {json.loads(record.read_text()).get('finished_at')})\n"
            )
        parts.append(text)
    write_text(folder / "SUMMARY.md", "\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
