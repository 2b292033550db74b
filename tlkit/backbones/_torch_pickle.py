"""Read legacy (non-zip) PyTorch ``state_dict`` files with numpy only.

No library reads these files without importing torch, and ``torch.load`` runs
arbitrary pickled code unless ``weights_only=True``. This reader is written by
hand so that tlkit needs neither torch nor trust in the file: its unpickler
refuses every global except the few a ``state_dict`` is made of.

The legacy format is five pickles in a row (magic number, protocol version,
system info, the object with persistent ids for its storages, the list of
storage keys) followed by the raw bytes of each storage, each preceded by an
int64 element count.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from typing import BinaryIO

import numpy as np

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_ZIP_MAGIC = b"PK\x03\x04"

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a weights file asks for anything beyond plain tensors."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage whose bytes are read after the main pickle."""

    def __init__(self, dtype: np.dtype, size: int):
        self.dtype = dtype
        self.size = size
        self.array: np.ndarray | None = None


class _TensorPlaceholder:
    """A tensor view on a storage, resolved once the storage bytes are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def resolve(self) -> np.ndarray:
        base = self.storage.array
        if base is None:
            raise pickle.UnpicklingError("Tensor storage was never read from the file.")
        check_tensor_bounds(self.offset, self.size, self.stride, base.size)
        if 0 in self.size:
            return np.zeros(self.size, dtype=base.dtype)
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, copy=True)


def check_tensor_bounds(offset, size, stride, storage_length: int) -> None:
    """Checks that a tensor view lies inside its storage before it is read.

    `as_strided` reads whatever memory the numbers point at, so a crafted file
    could otherwise return bytes from outside the storage or crash the
    interpreter. Python integers keep the arithmetic free of overflow.

    Args:
        offset: The storage offset, in elements.
        size: The tensor's shape.
        stride: The step in elements along each dimension.
        storage_length: The number of elements in the storage.

    Raises:
        UnsafePickleError: If a number is not a non-negative integer, the
            shape and strides differ in length, or the view reaches past the
            end of the storage.
    """
    numbers = [offset, *size, *stride]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise UnsafePickleError(
            "A tensor's offset, shape and strides must be non-negative integers; the weights "
            f"file is corrupt or crafted. Received: offset={offset!r}, size={size!r}, "
            f"stride={stride!r}"
        )
    if len(size) != len(stride):
        raise UnsafePickleError(
            "A tensor's shape and strides must have the same length; the weights file is "
            f"corrupt or crafted. Received: size={size!r}, stride={stride!r}"
        )
    if 0 in size:
        last = offset - 1  # An empty tensor reads nothing; its offset may be the end.
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage_length:
        raise UnsafePickleError(
            f"A tensor reaches element {last} of a storage of {storage_length} elements; the "
            "weights file is corrupt or crafted to read memory outside it. "
            f"Received: offset={offset}, size={tuple(size)}, stride={tuple(stride)}"
        )


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorPlaceholder(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"Refusing to load `{module}.{name}`: a weights file may only contain "
            "tensors in an OrderedDict. The file is not a plain PyTorch state_dict, "
            f"or it tries to run code. Received: global={module}.{name}"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"Unexpected persistent id in weights file. Received: {pid!r}")
        storage_type, key, _location, size = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"Unknown storage type. Received: {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype, int(size))
        storage = self._storages[key]
        if len(pid) > 5 and pid[5] is not None:
            raise UnsafePickleError("Storage views (pre-0.4 PyTorch files) are not supported.")
        return storage


def _load_plain(file: BinaryIO, what: str):
    """Loads a header pickle that may only hold numbers, strings and dicts."""
    unpickler = _RestrictedUnpickler(file, storages={})
    try:
        return unpickler.load()
    except UnsafePickleError:
        raise
    except Exception as error:  # A corrupt header: say which part.
        raise pickle.UnpicklingError(
            f"Could not read the {what} of the weights file: {error}"
        ) from error


def remaining_bytes(file: BinaryIO) -> int:
    """The number of bytes between the file's position and its end."""
    position = file.tell()
    end = file.seek(0, 2)
    file.seek(position)
    return end - position


def load_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """Reads a legacy PyTorch state_dict file into numpy arrays without torch.

    Args:
        path: Path to a ``.pth`` file written by ``torch.save`` with
            ``_use_new_zipfile_serialization=False`` (PyTorch < 1.6 default).

    Returns:
        An ordered mapping of parameter name to numpy array.

    Raises:
        UnsafePickleError: If the file references any global that is not part
            of a plain state_dict (code execution attempt or foreign object).
        ValueError: If the file is not a legacy PyTorch file.
    """
    with open(path, "rb") as file:
        head = file.read(4)
        if head == _ZIP_MAGIC:
            raise ValueError(
                "This is a zip-format PyTorch file; tlkit reads the legacy format only. "
                f"Re-save it with `_use_new_zipfile_serialization=False`. Received: path={path}"
            )
        file.seek(0)
        magic = _load_plain(file, "magic number")
        if magic != _LEGACY_MAGIC_NUMBER:
            raise ValueError(
                f"Not a legacy PyTorch weights file (bad magic number). Received: path={path}"
            )
        _load_plain(file, "protocol version")
        sys_info = _load_plain(file, "system info")
        if not sys_info.get("little_endian", True):
            raise ValueError(f"Big-endian PyTorch files are not supported. Received: path={path}")
        storages: dict = {}
        try:
            state = _RestrictedUnpickler(file, storages).load()
        except UnsafePickleError:
            raise
        except Exception as error:  # Truncated or corrupt: say which part.
            raise pickle.UnpicklingError(
                f"Could not read the state_dict of the weights file: {error}. Received: path={path}"
            ) from error
        storage_keys = _load_plain(file, "storage key list")
        for key in storage_keys:
            storage = storages[key]
            header = file.read(8)  # The element count; missing when the file ends here.
            if len(header) != 8:
                raise ValueError(f"Weights file is truncated. Received: path={path}")
            (count,) = struct.unpack("<q", header)
            if not 0 <= count * storage.dtype.itemsize <= remaining_bytes(file):
                raise ValueError(
                    "A storage in the weights file declares more bytes than the file holds; "
                    f"it is truncated or corrupt. Received: path={path}, count={count}"
                )
            data = file.read(count * storage.dtype.itemsize)
            if len(data) != count * storage.dtype.itemsize:
                raise ValueError(f"Weights file is truncated. Received: path={path}")
            storage.array = np.frombuffer(data, dtype=storage.dtype)
    if not isinstance(state, dict):
        raise UnsafePickleError(
            f"Expected a state_dict mapping. Received: type={type(state).__name__}"
        )
    result = collections.OrderedDict()
    for name, value in state.items():
        if isinstance(value, _TensorPlaceholder):
            result[name] = value.resolve()
        elif isinstance(value, (int, float)):
            result[name] = np.asarray(value)
    return result


# ---------------------------------------------------------------------------
# TorchScript archives: the tensors of `data.pkl`, never the code.
# ---------------------------------------------------------------------------


class _ScriptObject:
    """Stands for a scripted module (`__torch__.*` class): keeps its attribute dict only.

    The class names in a TorchScript archive refer to the Python code in its
    `code/` folder; that code is never read or run here.
    """

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(
                "A TorchScript module's state must be a dict of attributes. "
                f"Received: type={type(state).__name__}"
            )
        self.attributes = state


_SCRIPT_GLOBALS = {
    **_ALLOWED_GLOBALS,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
}


class _ScriptUnpickler(_RestrictedUnpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SCRIPT_GLOBALS:
            return _SCRIPT_GLOBALS[(module, name)]
        if module.startswith("__torch__."):
            return _ScriptObject
        return super().find_class(module, name)


def load_torchscript_tensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Reads the tensors and plain attributes of a TorchScript archive, running no code.

    A TorchScript `.pt` is a zip whose `data.pkl` pickles the module tree
    (objects of `__torch__.*` classes with attribute dicts) and names its
    tensors' storages, whose bytes are the zip members `data/<key>`. The
    module classes are replaced by attribute holders, so the archive's
    `code/` is never read; the storages are read with the same bounds
    checks as `load_state_dict`.

    Args:
        path: Path to a TorchScript archive (`torch.jit.save`).

    Returns:
        Two flat dicts keyed by dotted attribute path (e.g.
        `"net.layers.conv.weight"`): the tensors as numpy arrays, and the
        other attributes (ints, floats, strings, lists of them).

    Raises:
        UnsafePickleError: If `data.pkl` names a global beyond module
            classes, tensors and storages, or a tensor lies outside its storage.
        ValueError: If the file is not a TorchScript zip or a storage's
            size does not match its record.
    """
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"Not a TorchScript (zip) archive: {error}. Received: path={path}"
        ) from error
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(
                "Expected one `<name>/data.pkl` in a TorchScript archive. "
                f"Received: path={path}, data_pickles={pickles}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict = {}
        try:
            root = _ScriptUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        except UnsafePickleError:
            raise
        except Exception as error:  # Corrupt: say which part.
            raise pickle.UnpicklingError(
                f"Could not read the TorchScript data.pkl: {error}. Received: path={path}"
            ) from error
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            expected = storage.size * storage.dtype.itemsize
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ValueError(
                    f"The archive has no storage `{member}`. Received: path={path}"
                ) from None
            if info.file_size != expected:
                raise ValueError(
                    f"Storage `{member}` should hold {expected} bytes. "
                    f"Received: path={path}, size={info.file_size}"
                )
            storage.array = np.frombuffer(archive.read(member), dtype=storage.dtype)
    tensors: dict[str, np.ndarray] = {}
    attributes: dict[str, object] = {}

    def walk(node, name):
        if isinstance(node, _ScriptObject):
            for key, value in getattr(node, "attributes", {}).items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(node, _TensorPlaceholder):
            tensors[name] = node.resolve()
        elif node is None or isinstance(node, (bool, int, float, str, list, tuple)):
            attributes[name] = node
        else:
            raise UnsafePickleError(
                f"Unexpected object in a TorchScript archive. Received: {type(node).__name__} "
                f"at {name!r}"
            )

    walk(root, "")
    return tensors, attributes
