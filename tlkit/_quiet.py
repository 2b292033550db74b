"""Imports TensorFlow without its C++ start-up noise, keeping every real message.

TensorFlow 2.21's shared libraries log a few INFO lines while they are loaded,
before absl logging is initialised, so `TF_CPP_MIN_LOG_LEVEL` cannot silence
them (measured: levels 2 and 3, `GLOG_minloglevel`, `ABSL_MIN_LOG_LEVEL` and
`TF_ENABLE_ONEDNN_OPTS=1` all leave them). On a machine without an NVIDIA
driver the first device listing also logs `failed call to cuInit ... (303)` at
ERROR level, which a CPU user reads as a fault. No TensorFlow or absl setting
removes these lines, so this module catches file descriptor 2 while TensorFlow
loads and lists its devices, drops exactly the known start-up lines and writes
everything else back to stderr unchanged: a real error still shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BENIGN_PATTERNS", "filter_start_up_lines", "import_tensorflow_quietly"]

# Start-up lines that say nothing is wrong. Each is matched against one whole line.
BENIGN_PATTERNS = (
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^[IW]\d{4} .* port\.cc:\d+\] oneDNN custom operations are on"),
    re.compile(r"^[IW]\d{4} .* cudart_stub\.cc:\d+\] Could not find cuda drivers"),
    re.compile(r"^[IW]\d{4} .* cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)
# Only dropped where no NVIDIA driver is installed: there it just means "no GPU".
_NO_DRIVER_PATTERN = re.compile(r"^E\d{4} .* failed call to cuInit: .*\(303\)")


def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def filter_start_up_lines(text: str, driver_present: bool | None = None) -> str:
    """Removes TensorFlow's benign start-up lines from captured stderr text.

    Args:
        text: What TensorFlow wrote to stderr.
        driver_present: Whether an NVIDIA driver is installed; a failed cuInit
            is kept when one is. Defaults to checking `/proc/driver/nvidia`.

    Returns:
        `text` without the benign lines; every other line, in order.
    """
    if driver_present is None:
        driver_present = _nvidia_driver_present()
    kept = []
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\n")
        if any(pattern.search(stripped) for pattern in BENIGN_PATTERNS):
            continue
        if not driver_present and _NO_DRIVER_PATTERN.search(stripped):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _filtered_stderr() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield  # No usable file descriptor 2 (e.g. pythonw): nothing to filter.
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            rest = filter_start_up_lines(text)
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its GPUs with the benign start-up lines dropped.

    Listing physical devices initialises CUDA (where the cuInit line comes
    from) but not the logical devices, so `tf.config.set_visible_devices` and
    memory growth can still be set afterwards. Set `TLKIT_VERBOSE_STARTUP=1` to
    see TensorFlow's start-up output unfiltered.
    """
    if "tensorflow" in sys.modules or os.environ.get("TLKIT_VERBOSE_STARTUP") == "1":
        return
    with _filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
