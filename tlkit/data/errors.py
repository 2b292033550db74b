"""Errors shared by tlkit.data's loaders (kept apart so every loader can import them)."""

__all__ = ["DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """A named dataset is neither on disk nor downloadable right now."""
