"""The backbone registry, the offline ImageNet weights and the preprocessing layer."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tlkit
from tlkit._io import sha256_file
from tlkit.backbones import (
    BACKBONES,
    ImagePreprocessing,
    WeightsNotAvailableError,
    build_backbone,
    converted_weights_path,
    get_backbone,
    list_backbones,
)
from tlkit.backbones._torch_pickle import load_state_dict
from tlkit.backbones.registry import weights_file

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}

# One row per offline backbone: the facts about its layout that the checkpoint dictates.
OFFLINE = {
    "efficientnet_lite0": {
        "epsilon": 1e-3,
        "padding": "same",  # Converted from TensorFlow.
        "blocks": 16,
        "parameters": 4_694_024,
        "stem_tensor": "_conv_stem.weight",
        "classifier_tensor": "_fc.weight",
    },
    "efficientnet_lite1": {
        "epsilon": 1e-3,
        "padding": "same",
        "blocks": 21,  # Depth 1.1, first and last stages fixed.
        "parameters": 5_470_344,
        "stem_tensor": "_conv_stem.weight",
        "classifier_tensor": "_fc.weight",
    },
    "efficientnet_lite2": {
        "epsilon": 1e-3,
        "padding": "same",
        "blocks": 21,
        "parameters": 6_150_168,
        "stem_tensor": "_conv_stem.weight",
        "classifier_tensor": "_fc.weight",
    },
    "mobilenet_v2": {
        "epsilon": 1e-5,
        "padding": "symmetric",  # torchvision pads both sides.
        "blocks": 17,
        "parameters": 3_538_984,
        "stem_tensor": "features.0.0.weight",
        "classifier_tensor": "classifier.1.weight",
    },
}
backbone_table = pytest.mark.parametrize("name", sorted(OFFLINE))


def _center_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Resize the short side to 256 / 224 * size, then take the central square."""
    picture = Image.fromarray(image)
    scale = round(size * 256 / 224) / min(picture.size)
    picture = picture.resize(
        (round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR
    )
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)), dtype=np.float32)


def _photos(size: int = 224) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return np.stack([_center_crop(data.chelsea(), size), _center_crop(data.coffee(), size)])


# ---------------------------------------------------------------------------
# Pretrained networks.
# ---------------------------------------------------------------------------


@pytest.mark.slow
@backbone_table
def test_imagenet_top1_on_real_photos(name):
    size = get_backbone(name).image_size  # Lite1 240 px, Lite2 260 px, the others 224 px.
    model = build_backbone(name, image_size=size, include_top=True)
    probabilities = model.predict(_photos(size), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    (cat, *_), (coffee, *_) = tlkit.decode_predictions(probabilities, top=5)
    assert cat[1] in CATS, tlkit.decode_predictions(probabilities, top=5)[0]
    assert coffee[1] in {"espresso", "cup"}, tlkit.decode_predictions(probabilities, top=5)[1]


@backbone_table
def test_converted_weights_are_the_checkpoint_tensors(name):
    row = OFFLINE[name]
    model = build_backbone(name, image_size=64, include_top=True)
    assert model.count_params() == row["parameters"]
    state = load_state_dict(str(weights_file(get_backbone(name))))
    # PyTorch (out, in, h, w) -> Keras (h, w, in, out); Dense is transposed.
    np.testing.assert_array_equal(
        model.get_layer("stem_conv").kernel.numpy(), state[row["stem_tensor"]].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        model.get_layer("predictions").kernel.numpy(), state[row["classifier_tensor"]].T
    )


@backbone_table
def test_feature_extractor_shape_and_any_input_size(name):
    flexible = tlkit.build_feature_extractor(name, image_size=None)
    assert flexible.output_shape == (None, 1280)
    assert flexible.trainable_weights == []
    # The extractor defaults to the backbone's size; build_backbone takes any size.
    size = get_backbone(name).image_size
    assert flexible.input_shape == (None, size, size, 3)
    flexible = build_backbone(name, image_size=None)
    assert flexible.input_shape == (None, None, None, 3)
    rng = np.random.default_rng(0)
    small = flexible.predict(rng.uniform(0, 255, (2, 64, 64, 3)), verbose=0)
    large = flexible.predict(rng.uniform(0, 255, (1, 96, 80, 3)), verbose=0)
    assert small.shape == (2, 1280) and large.shape == (1, 1280)
    assert np.isfinite(small).all() and np.isfinite(large).all()


@backbone_table
def test_layout_follows_the_checkpoint(name):
    row = OFFLINE[name]
    model = build_backbone(name, image_size=64, weights=None)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and {layer.epsilon for layer in norms} == {row["epsilon"]}
    pads = [layer for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
    if row["padding"] == "symmetric":
        assert model.get_layer("stem_pad").padding == ((1, 1), (1, 1))
        assert model.get_layer("stem_conv").padding == "valid"
        # Every spatial convolution is preceded by its own symmetric pad.
        depthwise = [
            layer for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)
        ]
        assert len(pads) == len(depthwise) + 1
    else:
        assert pads == []
        assert model.get_layer("stem_conv").padding == "same"
    assert f"block{row['blocks']}_project_conv" in {layer.name for layer in model.layers}
    assert f"block{row['blocks'] + 1}_project_conv" not in {layer.name for layer in model.layers}


def test_torchvision_layout_differs_from_keras_mobilenet_v2():
    # Why keras.applications.MobileNetV2 cannot take torchvision's weights: it pads
    # stride-2 convolutions on the bottom/right only and uses BatchNorm epsilon 1e-3.
    ours = build_backbone("mobilenet_v2", image_size=64, weights=None)
    theirs = keras.applications.MobileNetV2(
        input_shape=(64, 64, 3), include_top=False, weights=None
    )

    def norms(model):
        return {
            layer.epsilon
            for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }

    def pads(model):
        return {
            layer.padding for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)
        }

    assert norms(theirs) == {1e-3} and norms(ours) == {1e-5}
    assert pads(theirs) == {((0, 1), (0, 1))} and pads(ours) == {((1, 1), (1, 1))}
    assert theirs.get_layer("Conv1").padding == "same"
    assert ours.get_layer("stem_conv").padding == "valid"
    # Same kernel, same image: the padding difference alone changes the stem output.
    image = np.random.default_rng(1).uniform(-1, 1, (1, 64, 64, 3)).astype("float32")
    kernel = np.random.default_rng(2).normal(size=(3, 3, 3, 32)).astype("float32")
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1), (0, 0)))
    symmetric = keras.ops.conv(padded, kernel, strides=2, padding="valid")
    same = keras.ops.conv(image, kernel, strides=2, padding="same")
    assert symmetric.shape == same.shape
    assert not np.allclose(symmetric, same, atol=1e-3)


# ---------------------------------------------------------------------------
# The converted-weights cache.
# ---------------------------------------------------------------------------


@backbone_table
def test_converted_weights_are_cached_by_source_sha(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path))
    spec = get_backbone(name)
    first = converted_weights_path(spec)
    assert first.parent == tmp_path / "weights"
    assert first.name == f"{name}-{sha256_file(weights_file(spec))[:16]}.weights.h5"
    assert spec.weights.sha256[:16] in first.name
    written = first.stat().st_mtime_ns
    second = converted_weights_path(spec)
    assert second == first
    assert second.stat().st_mtime_ns == written
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # No temp files left.


@backbone_table
def test_source_sha_mismatch_is_refused(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path))
    spec = BACKBONES[name]
    tampered = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, sha256="0" * 64))
    monkeypatch.setitem(BACKBONES, name, tampered)
    with pytest.raises(ValueError, match="sha256") as error:
        build_backbone(name, image_size=64)
    assert spec.weights.sha256 in str(error.value)  # The actual digest is reported.
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").iterdir())


# ---------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------


def test_list_backbones_offline_first():
    offline = [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "inception_v3_fid",
        "mobilenet_v2",
        "vgg16_torchvision",
    ]
    assert list_backbones(offline_only=True) == offline
    everything = list_backbones()
    assert everything[: len(offline)] == offline
    assert {"resnet50", "efficientnet_b0", "mobilenet_v2_keras"} <= set(everything)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="Received: backbone='nope'") as error:
        get_backbone("nope")
    for name in list_backbones():
        assert name in str(error.value)
    with pytest.raises(ValueError, match="nope"):
        tlkit.build_classifier("nope")


@pytest.mark.parametrize("image_size", [16, 64.0, "64"])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        build_backbone("mobilenet_v2", image_size=image_size, weights=None)


def test_online_backbone_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TLKIT_OFFLINE", "1")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsNotAvailableError) as error:
        build_backbone("resnet50")
    message = str(error.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in message
    assert str(tmp_path / "models") in message
    assert "efficientnet_lite0" in message and "mobilenet_v2" in message
    assert isinstance(error.value, FileNotFoundError)


# ---------------------------------------------------------------------------
# ImagePreprocessing.
# ---------------------------------------------------------------------------

PIXEL = np.array([10.0, 128.0, 250.0], dtype=np.float32)
EXPECTED = {
    "torch": (PIXEL / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
    "tf": PIXEL / 127.5 - 1,
    "lite": (PIXEL - 127) / 128,
    "fid": (PIXEL - 128) / 128,
    "caffe": PIXEL[::-1] - [103.939, 116.779, 123.68],  # BGR, mean subtracted.
    "none": PIXEL,
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_preprocessing_modes(mode):
    layer = ImagePreprocessing(mode)
    images = np.tile(PIXEL, (2, 3, 3, 1))
    np.testing.assert_allclose(layer(images).numpy()[1, 2, 0], EXPECTED[mode], rtol=1e-5, atol=1e-5)

    restored = ImagePreprocessing.from_config(layer.get_config())
    assert restored.mode == mode and restored.name == layer.name
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, ImagePreprocessing) and revived.mode == mode

    dataset = tf.data.Dataset.from_tensor_slices(images).batch(2).map(layer)
    np.testing.assert_allclose(
        next(iter(dataset)).numpy()[0, 0, 0], EXPECTED[mode], rtol=1e-5, atol=1e-5
    )


def test_preprocessing_accepts_uint8_and_rejects_unknown_mode():
    uint8 = np.full((1, 2, 2, 3), 255, dtype=np.uint8)
    np.testing.assert_allclose(ImagePreprocessing("tf")(uint8).numpy(), 1.0)
    with pytest.raises(ValueError, match="Received: mode='imagenet'"):
        ImagePreprocessing("imagenet")
