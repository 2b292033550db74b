"""The benchmark scripts in QUICK mode, so they never rot (bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON_KEYS = {"benchmark", "quick", "command", "seed", "machine", "versions"}
EXPECTED = {
    "tutorial_race": {"contenders", "target", "reached_by", "tutorial_unfreeze_from"},
    "throughput": {"contenders", "memory", "ceiling", "feature_tolerance", "datasets", "repeats"},
    "fine_tune_speed": {"contenders", "first_block"},
    "published": {"summary", "runs"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_in_quick_mode(name, shared_datasets, tlkit_cache_dir, tmp_path):
    environment = {**os.environ, "QUICK": "1", "TLKIT_DATA_DIR": str(shared_datasets)}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--results", str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert COMMON_KEYS | EXPECTED[name] <= set(record)
    assert record["quick"] is True and record["machine"]["nproc"] >= 1
    assert "cpu_flags" in record["machine"] and record["machine"]["load_average_at_end"]
    assert (tmp_path / f"{name}.md").read_text().startswith(f"# {name}")
    rows = record.get("contenders") or record.get("runs")
    assert rows and not [row for row in rows if "error" in row]
    for row in rows:
        assert row["peak_rss_mb"] > 0
        assert "tf_intra_op_threads" in row["threads"] and row["load_average_before"]
        if "dataset" in row:
            assert all(len(value) == 64 for value in row["dataset"]["fingerprints"].values())
