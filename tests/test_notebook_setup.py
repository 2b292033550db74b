"""Notebooks run anywhere: declared datasets, skips with reasons, one repository address."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tlkit.notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _sync_module():
    spec = importlib.util.spec_from_file_location(
        "sync_notebooks", ROOT / "tools" / "sync_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """Empty TLKIT_DATA_DIR, TLKIT_CACHE_DIR and TFDS_DATA_DIR: a fresh machine."""
    environment = {
        "TLKIT_DATA_DIR": tmp_path / "data",
        "TLKIT_CACHE_DIR": tmp_path / "cache",
        "TFDS_DATA_DIR": tmp_path / "tensorflow_datasets",
    }
    for name, folder in environment.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    return environment


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_declares_every_dataset_it_loads(path):
    declared = tlkit.notebook.required_datasets(path)
    assert declared, "declare the datasets in metadata.tlkit.datasets"
    cells = json.loads(path.read_text())["cells"]
    code = "".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    loaded = set(re.findall(r"load_dataset_or_stop\(\s*\"(\w+)\"", code))
    assert loaded and loaded <= set(declared)


def test_required_datasets_refuses_unknown_names(tmp_path):
    notebook = tmp_path / "x.ipynb"
    notebook.write_text(json.dumps({"cells": [], "metadata": {"tlkit": {"datasets": ["mnist"]}}}))
    with pytest.raises(ValueError, match=r"Received: datasets=\['mnist'\]"):
        tlkit.notebook.required_datasets(notebook)


def test_without_data_only_the_embedded_notebooks_run(no_data):
    runnable = [path.stem for path in NOTEBOOKS if not tlkit.notebook.missing_datasets(path)]
    assert runnable == ["00_quickstart", "02_fine_tuning"]
    reasons = tlkit.notebook.missing_datasets(
        ROOT / "notebooks" / "09_object_detection_transfer.ipynb"
    )
    assert "'bccd'" in reasons["bccd"] and "load_detection('bccd')" in reasons["bccd"]
    assert "sha256-checked" in reasons["bccd"]


def test_with_the_shared_datasets_nothing_is_missing(shared_datasets, monkeypatch):
    monkeypatch.setenv("TLKIT_DATA_DIR", str(shared_datasets))
    assert {path.stem: tlkit.notebook.missing_datasets(path) for path in NOTEBOOKS} == {
        path.stem: {} for path in NOTEBOOKS
    }


@pytest.mark.slow
def test_notebook_collection_without_data_skips_with_reasons(no_data):
    """The notebook part of `make test` on a fresh machine: skips with reasons, no failures.

    Only the notebooks that need absent data are given to pytest here, so no kernel
    starts; the embedded-data notebooks run in `make test` itself.
    """
    needing_data = [path for path in NOTEBOOKS if tlkit.notebook.missing_datasets(path)]
    environment = {
        **os.environ,
        **{name: str(folder) for name, folder in no_data.items()},
        "QUICK": "1",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-rs", "-q", "-p", "no:cacheprovider"]
        + [str(path.relative_to(ROOT)) for path in needing_data],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = output.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in [\d.]+s( \(\S+\))?", summary), summary
    for path in needing_data:
        for name in tlkit.notebook.required_datasets(path):  # Notebook 13 needs two.
            assert re.search(
                rf"SKIPPED \[\d+\] notebooks/{path.name}: .*needs the '{name}' dataset.*To get",
                output,
            ), (path.name, name)


def test_every_badge_and_install_line_agrees_with_pyproject():
    sync = _sync_module()
    url = sync.repository_url()
    assert url == "https://github.com/tlkit-project/tlkit"
    assert [problem for path in NOTEBOOKS for problem in sync.problems(path, url)] == []


def test_the_url_check_sees_a_stale_notebook(tmp_path):
    sync = _sync_module()
    url = sync.repository_url()
    source = ROOT / "notebooks" / "00_quickstart.ipynb"
    stale = tmp_path / source.name
    stale.write_text(source.read_text().replace("tlkit-project/tlkit", "someone/else"))
    found = sync.problems(stale, url)
    assert len(found) == 2 and "badge" in found[0] and "install" in found[1]
    # Rewriting from pyproject mends it, touching nothing else.
    mended = sync.rewrite(json.loads(stale.read_text()), url, source.name)
    assert mended == json.loads(source.read_text())


def test_the_url_must_be_a_github_repository(tmp_path):
    sync = _sync_module()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\n[project.urls]\nRepository = "https://example.org/x"\n'
    )
    with pytest.raises(ValueError, match="Received: Repository='https://example.org/x'"):
        sync.repository_url(pyproject)
