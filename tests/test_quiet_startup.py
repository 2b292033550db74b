"""TensorFlow's benign C++ start-up lines are dropped; real stderr output is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tlkit._quiet import filter_start_up_lines

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("absl::InitializeLog", "port.cc", "cudart_stub.cc", "failed call to cuInit")

SAMPLE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796133080.878687    4968 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results.\n"
    "I0000 00:00:1796133080.879010    4968 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n"
    "E0000 00:00:1796133138.968328    6143 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
    "E0000 00:00:1796133138.968328    6143 some_kernel.cc:1] a real error\n"
    "Traceback (most recent call last):\n"
)


def _environment(**extra) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**environment, "PYTHONPATH": str(ROOT), **extra}


def _stderr(code: str, **extra) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_environment(**extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_filter_keeps_everything_but_the_known_lines():
    without_driver = filter_start_up_lines(SAMPLE, driver_present=False)
    assert without_driver == (
        "E0000 00:00:1796133138.968328    6143 some_kernel.cc:1] a real error\n"
        "Traceback (most recent call last):\n"
    )
    # With an NVIDIA driver installed a failed cuInit is a real fault: it stays.
    with_driver = filter_start_up_lines(SAMPLE, driver_present=True)
    assert "failed call to cuInit" in with_driver and "a real error" in with_driver
    assert "port.cc" not in with_driver


@pytest.mark.slow
def test_import_tlkit_and_the_cli_start_quietly():
    quiet = _stderr("import tlkit")
    assert not [line for line in quiet.splitlines() if any(n in line for n in NOISE)], quiet
    result = subprocess.run(
        [sys.executable, "-m", "tlkit", "datasets"],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "tf_flowers" in result.stdout
    assert not [n for n in NOISE if n in result.stderr], result.stderr


@pytest.mark.slow
def test_real_stderr_output_during_the_import_is_kept():
    stderr = _stderr(
        "import os, tlkit._quiet as quiet\n"
        "with quiet._filtered_stderr():\n"
        "    os.write(2, b'I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "    os.write(2, b'E0000 00:00:1.0 1 loader.cc:9] could not load libfoo.so\\n')\n"
    )
    assert "could not load libfoo.so" in stderr and "oneDNN" not in stderr


def _first_output(nbformat, nbclient) -> str:
    # The sleep gives ipykernel time to forward what reached file descriptor 2.
    code = 'import tlkit\nimport tensorflow as tf\ntf.config.list_physical_devices("GPU")\n'
    code += "import time\ntime.sleep(2)"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return "".join(output.get("text", "") for output in notebook.cells[0].outputs)


@pytest.mark.slow
def test_a_notebook_first_output_is_quiet(monkeypatch):
    """ipykernel forwards file descriptor 2 to the notebook, so the C++ lines would show."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # The kernel imports this checkout's tlkit.
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    # ipykernel stops forwarding file descriptor 2 when it sees it runs under pytest.
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("TLKIT_VERBOSE_STARTUP", "1")
    verbose = _first_output(nbformat, nbclient)
    if not any(n in verbose for n in NOISE):
        pytest.skip("TensorFlow logs nothing at start-up on this machine; nothing to drop")
    monkeypatch.delenv("TLKIT_VERBOSE_STARTUP")
    quiet = _first_output(nbformat, nbclient)
    assert not [n for n in NOISE if n in quiet], quiet
