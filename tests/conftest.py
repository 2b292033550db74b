"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shared_datasets() -> Path:
    """The real datasets folder ($TLKIT_DATA_DIR); skips the test when it is missing."""
    folder = os.environ.get("TLKIT_DATA_DIR")
    known = ("flower_photos", "cats_and_dogs_filtered", "pneumoniamnist", "bccd")
    # An empty or unrelated folder (a fresh machine) skips too, never fails.
    if not folder or not any((Path(folder) / name).is_dir() for name in known):
        pytest.skip(
            f"shared datasets not found (TLKIT_DATA_DIR={folder!r} holds none of {known}): "
            "set TLKIT_DATA_DIR to ../shared/datasets"
        )
    return Path(folder)


@pytest.fixture(scope="session")
def tlkit_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """One $TLKIT_CACHE_DIR for the whole session, so offline weights convert once."""
    folder = tmp_path_factory.mktemp("tlkit_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLKIT_CACHE_DIR", str(folder))
        yield folder
