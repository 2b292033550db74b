"""pytest plugin for the notebooks: a notebook whose data is not here is skipped, not failed.

Each notebook lists the datasets it needs in its metadata (`metadata.tlkit.datasets`).
At collection, every nbval item of a notebook whose datasets `tlkit.data` cannot find on
disk (`$TLKIT_DATA_DIR`, the cache, a tensorflow-datasets copy; nothing is downloaded) is
marked skipped with a reason that names the dataset and how to get it.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    decided: dict[Path, dict[str, str]] = {}
    for item in items:
        path = Path(str(item.fspath))
        if path.suffix != ".ipynb":
            continue
        if path not in decided:
            import tlkit.notebook  # Imported only when notebooks are collected.

            decided[path] = tlkit.notebook.missing_datasets(path)
        if decided[path]:
            item.add_marker(pytest.mark.skip(reason=" ".join(decided[path].values())))
