"""What a Colab user does: install the wheel next to an existing TensorFlow, run notebook 00.

The wheel is built from the checkout and installed into a clean virtual environment
that cannot see the checkout or the editable install. Its other packages are
links to this environment's (everything but tlkit), which stands in for Colab's
preinstalled TensorFlow and Keras and costs no download; pip resolves the
wheel against them offline (`--no-index`), so a requirement that wanted another
TensorFlow fails here instead of replacing Colab's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_quickstart.ipynb"
PIP_TIMEOUT_SECONDS = 300


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def _clean_environment(**extra) -> dict[str, str]:
    """The caller's environment without anything that points back at the checkout."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "TLKIT_DATA_DIR", "VIRTUAL_ENV", "PYTHONHOME")
    }
    return {**environment, **extra}


def _build_wheel(folder: Path) -> tuple[Path, str]:
    source = folder / "source"  # A copy, so the build leaves nothing in the checkout.
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "tlkit", source / "tlkit", ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(folder / "dist")]
    if Version(version("setuptools")) >= Version("77"):
        command.append("--no-build-isolation")  # `make` installs it: no download.
    result = _run(command + [str(source)], timeout=PIP_TIMEOUT_SECONDS)
    (wheel,) = (folder / "dist").glob("tlkit-*.whl")
    return wheel, result.stdout + result.stderr


def _linked_venv(folder: Path) -> Path:
    """A venv whose site-packages links every package of this one except tlkit."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(folder)], timeout=120)
    python = folder / "bin" / "python"
    target = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.lower().startswith(("tlkit", "__editable__")):
            continue
        if not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    return python


def _fake_installed_tensorflow(python: Path, installed_version: str) -> None:
    """Makes pip see TensorFlow `installed_version` (metadata only; the code stays)."""
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    for old in site.glob("tensorflow-*.dist-info"):
        old.unlink() if old.is_symlink() else shutil.rmtree(old)
    real = next(Path(sysconfig.get_paths()["purelib"]).glob("tensorflow-*.dist-info"))
    fake = site / f"tensorflow-{installed_version}.dist-info"
    fake.mkdir()
    for name in ("METADATA", "INSTALLER", "WHEEL", "top_level.txt"):
        if (real / name).is_file():
            text = (real / name).read_text()
            if name == "METADATA":
                lines = text.splitlines(keepends=True)
                lines = [
                    f"Version: {installed_version}\n" if line.startswith("Version:") else line
                    for line in lines
                ]
                text = "".join(lines)
            (fake / name).write_text(text)


@pytest.mark.slow
def test_wheel_in_a_clean_venv_beside_another_tensorflow_runs_notebook_00(tmp_path):
    wheel, build_output = _build_wheel(tmp_path)
    assert "Deprecat" not in build_output, build_output  # e.g. `license = {text = ...}`
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "tlkit/resources/fashion_mnist_small.npz" in names
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: tensorflow<3,>=2.16" in metadata

    python = _linked_venv(tmp_path / "venv")
    environment = _clean_environment(TLKIT_CACHE_DIR=str(tmp_path / "cache"), QUICK="1")

    # Colab ships its own TensorFlow: pip must keep it, whatever patch it is.
    for installed in ("2.21.1", "2.20.0"):
        _fake_installed_tensorflow(python, installed)
        report = tmp_path / f"report-{installed}.json"
        _run(
            [str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--quiet"]
            + ["--report", str(report), str(wheel)],
            env=environment,
            timeout=PIP_TIMEOUT_SECONDS,
        )
        planned = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
        assert planned == ["tlkit"], f"next to TensorFlow {installed}, pip would install {planned}"
    _run(
        [str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", str(wheel)],
        env=environment,
        timeout=PIP_TIMEOUT_SECONDS,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(NOTEBOOK, elsewhere / NOTEBOOK.name)
    (elsewhere / "pytest.ini").write_text("[pytest]\n")  # Stops pytest looking further up.
    check = _run(
        [
            str(python),
            "-c",
            "import tlkit; print(tlkit.__file__); "
            "print(len(tlkit.data.load('fashion_mnist_small', download=False).train))",
        ],
        cwd=elsewhere,
        env=environment,
        timeout=PIP_TIMEOUT_SECONDS,
    )
    module_file, train_size = check.stdout.split()
    assert Path(module_file).is_relative_to(tmp_path / "venv"), module_file
    assert train_size == "1000"

    result = subprocess.run(
        [str(python), "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-q"]
        + ["-p", "no:cacheprovider", NOTEBOOK.name],
        cwd=elsewhere,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = output.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "skipped" not in summary, summary
