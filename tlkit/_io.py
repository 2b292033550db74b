"""Atomic file writes (a crash leaves either the old file or the new one), progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    Write the file to the yielded path (any writer that takes a filename works,
    e.g. `model.save`, `np.savez`). If the block raises, the temporary file is
    removed and `path` is untouched.

    Args:
        path: The final destination.

    Yields:
        A temporary path in the same folder with the same suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep every suffix (".weights.h5"): Keras checks file names by suffix.
    suffixes = "".join(path.suffixes)
    base = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    handle, temporary = tempfile.mkstemp(
        prefix=f".{base}.", suffix=f".tmp{suffixes}", dir=path.parent
    )
    os.close(handle)
    os.unlink(temporary)  # Some writers refuse to overwrite; let them create it.
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes `data` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays appear in metrics; JSON has no type for them.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def cache_dir() -> Path:
    """The tlkit cache folder: `$TLKIT_CACHE_DIR`, else `~/.cache/tlkit`."""
    root = os.environ.get("TLKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tlkit"
    )
    return Path(root)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verified_cache_file(path: str | os.PathLike) -> bool:
    """Whether a cache file exists and still has the sha256 recorded when it was written.

    The digest is kept apart from the cache folder, in
    `../checksums/<folder>/<name>.sha256` (written by `record_checksum`), so the
    cache folder holds only cache files. A truncated, damaged or replaced file, or one without a
    recorded digest, is deleted (with its digest) so the caller builds it
    again; a warning names it.

    Args:
        path: The cache file.

    Returns:
        True if the file can be used as it is; False if it must be built.
    """
    import warnings

    path = Path(path)
    checksum = _checksum_path(path)
    if not path.is_file():
        return False
    try:
        expected = checksum.read_text().strip()
    except OSError:
        expected = None
    actual = sha256_file(path)
    if actual == expected:
        return True
    warnings.warn(
        f"The cache file {path} is damaged or was replaced (sha256 {actual[:16]}..., "
        f"recorded {(expected or 'none')[:16]}...); building it again.",
        stacklevel=3,
    )
    path.unlink(missing_ok=True)
    checksum.unlink(missing_ok=True)
    return False


def record_checksum(path: str | os.PathLike) -> None:
    """Writes the sha256 of a finished cache file beside it, for `verified_cache_file`."""
    write_text(_checksum_path(path), sha256_file(path) + "\n")


def _checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent.parent / "checksums" / path.parent.name / f"{path.name}.sha256"


def progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar counting batches (text or notebook widget), disabled when not `enabled`."""
    import warnings

    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        # tqdm.auto warns in Jupyter without ipywidgets, then falls back to text bars.
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", disable=not enabled, leave=False)
