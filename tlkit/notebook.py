"""Helpers for the teaching notebooks: QUICK mode, set-up checks, stopping politely.

The notebooks import these instead of redefining them, so every notebook
checks its environment and handles missing data the same way.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import tlkit
from tlkit import data


class StopNotebook(Exception):
    """Stops a notebook run after a plain message, without a traceback.

    IPython shows nothing for exceptions whose `_render_traceback_` returns an
    empty list, so the message printed before raising is all the user sees.
    """

    def _render_traceback_(self):
        return []


def quick_mode() -> bool:
    """Whether the notebook runs in QUICK mode (`QUICK=1` in the environment).

    QUICK mode shrinks data and epochs so a notebook runs in about 3 minutes
    on a 2-core CPU; the test suite sets it.
    """
    return os.environ.get("QUICK", "").lower() in ("1", "true", "yes")


def in_colab() -> bool:
    """Whether this runs inside Google Colab."""
    return "google.colab" in sys.modules


def check_environment() -> dict[str, str]:
    """Prints and returns the versions that matter, warning about known problems.

    Returns:
        Component name -> version.

    Raises:
        StopNotebook: If Keras 2 is active (tlkit needs Keras 3).
    """
    import keras
    import tensorflow as tf

    versions = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tlkit": tlkit.__version__,
    }
    print("  ".join(f"{name} {version}" for name, version in versions.items()))
    if int(keras.__version__.split(".")[0]) < 3:
        print("tlkit needs Keras 3: `pip install -U keras` and restart the runtime.")
        raise StopNotebook("Keras 3 required")
    gpus = tf.config.list_physical_devices("GPU")
    print(
        f"Running on {'GPU: ' + gpus[0].name if gpus else 'CPU'}; "
        f"QUICK mode is {'on' if quick_mode() else 'off'}."
    )
    return versions


def load_dataset_or_stop(name: str, **kwargs):
    """`tlkit.data.load(name)`, or a plain message and a stop when it is missing.

    Detection datasets (such as "bccd") are loaded with `tlkit.data.load_detection`.

    Args:
        name: A catalog name.
        **kwargs: Passed to `tlkit.data.load` (or `load_detection`).

    Returns:
        The `ImageDataset`, or a `DetectionDataset` for a detection dataset.

    Raises:
        StopNotebook: If the dataset cannot be found (after the message).
    """
    try:
        if name in data.list_datasets() and data.dataset_info(name)["task"] == "detection":
            return data.load_detection(name, **kwargs)
        return data.load(name, **kwargs)
    except data.DatasetNotFoundError as error:
        print(
            f"This notebook needs the `{name}` dataset, which is not available here.\n{error}\n"
            "The rest of the notebook is skipped."
        )
        raise StopNotebook(name) from None


def required_datasets(notebook: str | os.PathLike) -> list[str]:
    """The datasets a notebook declares in its metadata (`metadata.tlkit.datasets`).

    Args:
        notebook: An `.ipynb` file.

    Returns:
        The catalog names, in the order declared; empty when none are declared.

    Raises:
        ValueError: If the declaration is not a list of catalog names.
    """
    metadata = json.loads(Path(notebook).read_text()).get("metadata", {})
    names = metadata.get("tlkit", {}).get("datasets", [])
    if not isinstance(names, list) or set(names) - set(data.list_datasets()):
        raise ValueError(
            f"{notebook}: metadata.tlkit.datasets must list catalog names "
            f"({data.list_datasets()}). Received: datasets={names!r}"
        )
    return names


def missing_datasets(notebook: str | os.PathLike) -> dict[str, str]:
    """The declared datasets that are not on this machine, each with how to get it.

    Only looks on disk (`tlkit.data.resolve_offline`: `$TLKIT_DATA_DIR`, the
    cache, a prepared tensorflow-datasets copy); never downloads.

    Args:
        notebook: An `.ipynb` file.

    Returns:
        Dataset name -> a one-line reason that names it and says how to get it;
        empty when everything the notebook needs is here.
    """
    missing = {}
    for name in required_datasets(notebook):
        if data.resolve_offline(name) is None:
            missing[name] = (
                f"needs the {name!r} dataset, which is not on this machine "
                f"(TLKIT_DATA_DIR={os.environ.get('TLKIT_DATA_DIR')!r}). "
                f"To get it: {data.how_to_get(name)}"
            )
    return missing
