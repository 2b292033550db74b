"""The torch-free reader of legacy PyTorch state_dict files, and its refusal to run code."""

from __future__ import annotations

import collections
import os
import pickle
import struct

import numpy as np
import pytest

from tlkit.backbones._torch_pickle import UnsafePickleError, load_state_dict
from tlkit.backbones.registry import get_backbone, weights_file

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}

# name -> (parameter count without num_batches_tracked, {tensor: shape})
REAL_FILES = {
    "efficientnet_lite0": (
        4_694_024,
        {
            "_conv_stem.weight": (32, 3, 3, 3),
            "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
            "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
            "_conv_head.weight": (1280, 320, 1, 1),
            "_fc.weight": (1000, 1280),
            "_fc.bias": (1000,),
        },
    ),
    "mobilenet_v2": (
        3_538_984,
        {
            "features.0.0.weight": (32, 3, 3, 3),
            "features.1.conv.0.0.weight": (32, 1, 3, 3),
            "features.18.0.weight": (1280, 320, 1, 1),
            "features.18.1.running_var": (1280,),
            "classifier.1.weight": (1000, 1280),
            "classifier.1.bias": (1000,),
        },
    ),
}


# ---------------------------------------------------------------------------
# A tiny writer of the legacy format, so the tests control every byte.
# ---------------------------------------------------------------------------


# Stand-ins whose pickled global names are rewritten below (classes, because the
# pure-Python pickler routes classes, not functions, through `self.save_global`).
class _rebuild_tensor_v2:  # noqa: N801
    pass


class FloatStorage:
    pass


class LongStorage:
    pass


_GLOBAL_NAMES = {
    _rebuild_tensor_v2: ("torch._utils", "_rebuild_tensor_v2"),
    FloatStorage: ("torch", "FloatStorage"),
    LongStorage: ("torch", "LongStorage"),
}


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key = key
        self.array = np.ascontiguousarray(array).reshape(-1)


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        arguments = (
            self.storage,
            self.offset,
            self.size,
            self.stride,
            False,
            collections.OrderedDict(),
        )
        return _rebuild_tensor_v2, arguments


class _LegacyPickler(pickle._Pickler):  # The pure-Python pickler lets us name globals.
    def __init__(self, file, storages):
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            self.storages[obj.key] = obj
            kind = LongStorage if obj.array.dtype == np.int64 else FloatStorage
            return ("storage", kind, obj.key, "cpu", obj.array.size, None)
        return None

    def save_global(self, obj, name=None):
        if obj in _GLOBAL_NAMES:
            module, qualname = _GLOBAL_NAMES[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            return
        super().save_global(obj, name)


def _write_legacy(path, state) -> dict[str, int]:
    """Writes `state` like torch.save(_use_new_zipfile_serialization=False).

    Returns file offsets: where the state pickle starts, and where each storage
    record (int64 count, then the bytes) starts, as "storage0", "storage1", ...
    """
    offsets = {}
    with open(path, "wb") as file:
        for header in (MAGIC, 1001, SYS_INFO):
            pickle.dump(header, file, protocol=2)
        offsets["state"] = file.tell()
        storages: dict[str, _Storage] = {}
        _LegacyPickler(file, storages).dump(state)
        keys = sorted(storages)
        pickle.dump(keys, file, protocol=2)
        for index, key in enumerate(keys):
            offsets[f"storage{index}"] = file.tell()
            array = storages[key].array
            file.write(struct.pack("<q", array.size))
            file.write(array.tobytes())
    return offsets


def _write_with_evil_pickle(path, position: int, command: str) -> None:
    """A legacy file whose pickle number `position` (0 = magic) runs `command`."""

    class Evil:
        def __reduce__(self):
            return os.system, (command,)

    pickles = [MAGIC, 1001, SYS_INFO, collections.OrderedDict(), []]
    pickles[position] = Evil()
    with open(path, "wb") as file:
        for item in pickles:
            file.write(pickle.dumps(item))


@pytest.fixture
def small_state_file(tmp_path):
    """A hand-made file: a transposed view, an offset view and a BatchNorm counter."""
    shared = _Storage("0", np.arange(10, dtype=np.float32))
    state = collections.OrderedDict(
        # 2x3 matrix read with strides (1, 2): the transpose of arange(6).reshape(3, 2).
        transposed=_Tensor(shared, 0, (2, 3), (1, 2)),
        # Elements 6..9 of the same storage as a 2x2 matrix.
        tail=_Tensor(shared, 6, (2, 2), (2, 1)),
        bias=_Tensor(_Storage("1", np.array([0.5, -1.5], dtype=np.float32)), 0, (2,), (1,)),
        num_batches_tracked=_Tensor(_Storage("2", np.array([7], dtype=np.int64)), 0, (), ()),
    )
    path = tmp_path / "small.pth"
    offsets = _write_legacy(path, state)
    return path, offsets


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


def test_reads_views_offsets_and_dtypes_exactly(small_state_file):
    path, _ = small_state_file
    state = load_state_dict(str(path))
    assert list(state) == ["transposed", "tail", "bias", "num_batches_tracked"]
    np.testing.assert_array_equal(
        state["transposed"], np.arange(6, dtype=np.float32).reshape(3, 2).T
    )
    np.testing.assert_array_equal(state["tail"], [[6, 7], [8, 9]])
    np.testing.assert_array_equal(state["bias"], [0.5, -1.5])
    assert state["transposed"].dtype == np.float32
    assert state["num_batches_tracked"].dtype == np.int64
    assert state["num_batches_tracked"].shape == ()
    assert int(state["num_batches_tracked"]) == 7
    # Results are owned copies, not views into the file buffer.
    assert state["tail"].flags.writeable


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_weight_files(name):
    expected_count, expected_shapes = REAL_FILES[name]
    state = load_state_dict(str(weights_file(get_backbone(name))))
    count = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert count == expected_count
    for key, shape in expected_shapes.items():
        assert state[key].shape == shape, key
        assert state[key].dtype == np.float32, key
    running_vars = [v for k, v in state.items() if k.endswith("running_var")]
    assert running_vars and all((v >= 0).all() for v in running_vars)  # Dead channels: 0.
    assert all(np.isfinite(v).all() for v in state.values())


# ---------------------------------------------------------------------------
# Refusing code and foreign formats.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", [3, 0], ids=["state_dict", "magic_number"])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, position):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write_with_evil_pickle(path, position, f"touch {marker}")
    with pytest.raises(UnsafePickleError, match=r"Received: global=\w+\.system$"):
        load_state_dict(str(path))
    assert not marker.exists()


def test_evil_file_would_run_code_with_plain_pickle(tmp_path):
    # Guards the test above: the crafted file really does run code when trusted.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write_with_evil_pickle(path, 3, f"touch {marker}")
    with open(path, "rb") as file:
        for _ in range(4):
            pickle.load(file)
    assert marker.exists()


def test_foreign_storage_type_is_refused(tmp_path):
    class Sentinel:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            # A storage whose type is a plain string instead of torch.FloatStorage.
            return ("storage", "evil", "0", "cpu", 1, None) if isinstance(obj, Sentinel) else None

    path = tmp_path / "odd.pth"
    with open(path, "wb") as file:
        for header in (MAGIC, 1001, SYS_INFO):
            pickle.dump(header, file, protocol=2)
        Pickler(file, protocol=2).dump({"weight": Sentinel()})
        pickle.dump(["0"], file, protocol=2)
    with pytest.raises(UnsafePickleError, match="storage type"):
        load_state_dict(str(path))


def test_zip_format_is_rejected_with_advice(tmp_path):
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    with pytest.raises(ValueError, match="legacy format") as error:
        load_state_dict(str(path))
    assert "_use_new_zipfile_serialization=False" in str(error.value)


def test_bad_magic_number_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    path.write_bytes(pickle.dumps(12345) + pickle.dumps(1001))
    with pytest.raises(ValueError, match="magic number"):
        load_state_dict(str(path))


@pytest.mark.parametrize("where", ["in_state_pickle", "at_storage_boundary", "inside_storage"])
def test_truncated_file_gives_a_clear_error(small_state_file, tmp_path, where):
    path, offsets = small_state_file
    data = path.read_bytes()
    cut = {
        "in_state_pickle": offsets["state"] + 40,
        # The first storage is complete, the next one's element count is missing.
        "at_storage_boundary": offsets["storage1"],
        "inside_storage": offsets["storage1"] + 8 + 2,
    }[where]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:cut])
    with pytest.raises((ValueError, pickle.UnpicklingError), match="truncated"):
        load_state_dict(str(truncated))


# ---------------------------------------------------------------------------
# Tensor views that reach outside their storage (issue 15, item A).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset, size, stride, message",
    [
        # One float of storage read as 65,536: without the check, 256 KiB of
        # interpreter memory came back as "weights" from a 332-byte file.
        (0, (65536,), (1,), "reaches element 65535 of a storage of 1"),
        # A huge stride points far outside the process: without the check, a segfault.
        (0, (2,), (2**40,), "reaches element 1099511627776"),
        (1, (1,), (1,), "reaches element 1 of a storage of 1"),
        (0, (2,), (-1,), "non-negative"),
        (-1, (1,), (1,), "non-negative"),
        (0, (1, 1), (1,), "same length"),
    ],
    ids=[
        "overread_65536",
        "huge_stride",
        "offset_past_end",
        "negative_stride",
        "negative_offset",
        "rank_mismatch",
    ],
)
def test_views_outside_their_storage_are_refused(tmp_path, offset, size, stride, message):
    path = tmp_path / "crafted.pth"
    one_float = _Storage("0", np.array([1.0], dtype=np.float32))
    _write_legacy(path, collections.OrderedDict(weight=_Tensor(one_float, offset, size, stride)))
    if size == (65536,):
        assert path.stat().st_size < 400  # Like the 332-byte file of the security report.
    with pytest.raises(UnsafePickleError, match=message):
        load_state_dict(str(path))


def test_empty_tensor_at_the_end_of_its_storage_is_allowed(tmp_path):
    path = tmp_path / "empty.pth"
    one_float = _Storage("0", np.array([1.0], dtype=np.float32))
    _write_legacy(path, collections.OrderedDict(weight=_Tensor(one_float, 1, (0, 3), (3, 1))))
    assert load_state_dict(str(path))["weight"].shape == (0, 3)


def test_storage_count_larger_than_the_file_is_refused(small_state_file, tmp_path):
    path, offsets = small_state_file
    data = bytearray(path.read_bytes())
    data[offsets["storage0"] : offsets["storage0"] + 8] = struct.pack("<q", 2**60)
    crafted = tmp_path / "huge_count.pth"
    crafted.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="declares more bytes than the file holds"):
        load_state_dict(str(crafted))
