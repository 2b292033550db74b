"""Inverted-residual (MBConv) networks in the PyTorch checkpoints' layouts.

Four offline backbones (torchvision MobileNetV2 and EfficientNet-Lite0/1/2) are
stacks of inverted-residual blocks without squeeze-excite and with ReLU6. They
differ in padding (torchvision pads symmetrically; the TF-converted
EfficientNet-Lite uses TensorFlow "same" padding) and BatchNorm epsilon, which
is why `keras.applications.MobileNetV2` cannot take the torchvision weights.

Layer names follow one scheme so the converters and `unfreeze` can find them:
`stem_*`, `block{i}_{expand,depthwise,project}_{conv,bn}`, `head_*`,
`avg_pool`, `predictions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from tlkit.backbones.preprocessing import ImagePreprocessing


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block: expansion ratio, output channels, kernel, stride."""

    expansion: int
    filters: int
    kernel_size: int
    stride: int


@dataclass(frozen=True)
class NetworkConfig:
    """The layout of an inverted-residual network."""

    stem_filters: int
    blocks: tuple[BlockConfig, ...]
    head_filters: int
    padding: str  # "symmetric" (PyTorch) or "same" (TensorFlow)
    batch_norm_epsilon: float
    dropout_rate: float


def expand_stages(stages) -> tuple[BlockConfig, ...]:
    """Turns (expansion, filters, repeats, stride, kernel) stages into blocks."""
    blocks = []
    for expansion, filters, repeats, stride, kernel_size in stages:
        for index in range(repeats):
            blocks.append(BlockConfig(expansion, filters, kernel_size, stride if index == 0 else 1))
    return tuple(blocks)


def _convolution(x, filters, kernel_size, stride, config, name, depthwise=False):
    if kernel_size > 1 and config.padding == "symmetric":
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    if depthwise:
        return layers.DepthwiseConv2D(
            kernel_size, strides=stride, padding=padding, use_bias=False, name=f"{name}_conv"
        )(x)
    return layers.Conv2D(
        filters, kernel_size, strides=stride, padding=padding, use_bias=False, name=f"{name}_conv"
    )(x)


def _batch_norm(x, config, name):
    return layers.BatchNormalization(epsilon=config.batch_norm_epsilon, name=f"{name}_bn")(x)


def build_network(
    config: NetworkConfig,
    name: str,
    preprocessing: str,
    input_shape=(None, None, 3),
    include_top: bool = True,
    num_classes: int = 1000,
) -> keras.Model:
    """Builds the Keras model for `config`, taking raw 0..255 RGB input.

    Args:
        config: The network layout.
        name: The model name.
        preprocessing: An `ImagePreprocessing` mode.
        input_shape: Input shape; spatial sizes may be None. Defaults to
            `(None, None, 3)`.
        include_top: Whether to add pooling, dropout and the ImageNet
            classifier `predictions`. Without it, the output is the pooled
            feature vector `avg_pool`. Defaults to True.
        num_classes: Classifier width. Defaults to 1000.

    Returns:
        A functional `keras.Model`.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = ImagePreprocessing(preprocessing, name="preprocessing")(inputs)
    x = _convolution(x, config.stem_filters, 3, 2, config, "stem")
    x = _batch_norm(x, config, "stem")
    x = layers.ReLU(6.0, name="stem_relu")(x)
    channels = config.stem_filters
    for index, block in enumerate(config.blocks, start=1):
        prefix = f"block{index}"
        shortcut = x
        if block.expansion != 1:
            x = _convolution(x, channels * block.expansion, 1, 1, config, f"{prefix}_expand")
            x = _batch_norm(x, config, f"{prefix}_expand")
            x = layers.ReLU(6.0, name=f"{prefix}_expand_relu")(x)
        x = _convolution(
            x, None, block.kernel_size, block.stride, config, f"{prefix}_depthwise", depthwise=True
        )
        x = _batch_norm(x, config, f"{prefix}_depthwise")
        x = layers.ReLU(6.0, name=f"{prefix}_depthwise_relu")(x)
        x = _convolution(x, block.filters, 1, 1, config, f"{prefix}_project")
        x = _batch_norm(x, config, f"{prefix}_project")
        if block.stride == 1 and channels == block.filters:
            x = layers.Add(name=f"{prefix}_add")([shortcut, x])
        channels = block.filters
    x = _convolution(x, config.head_filters, 1, 1, config, "head")
    x = _batch_norm(x, config, "head")
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(config.dropout_rate, name="top_dropout")(x)
        x = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def block_names(config: NetworkConfig) -> tuple[str, ...]:
    """The unfreezable blocks, input to output: stem, block1..blockN, head."""
    return ("stem",) + tuple(f"block{i}" for i in range(1, len(config.blocks) + 1)) + ("head",)


def assign_state_dict(model: keras.Model, mapping, state_dict) -> None:
    """Copies PyTorch tensors into Keras layers.

    Args:
        model: A model from `build_network`.
        mapping: Pairs of (Keras layer name, PyTorch module prefix).
        state_dict: Parameter name -> numpy array, from `load_state_dict`.

    Raises:
        ValueError: If a tensor is missing, unused, or has the wrong shape.
    """
    used = set()

    def take(key):
        if key not in state_dict:
            raise ValueError(f"The weights file has no tensor `{key}`; is it the right file?")
        used.add(key)
        return state_dict[key]

    for layer_name, prefix in mapping:
        layer = model.get_layer(layer_name)
        if isinstance(layer, layers.DepthwiseConv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif isinstance(layer, layers.Conv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif isinstance(layer, layers.BatchNormalization):
            values = [
                take(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")
            ]
            used.add(f"{prefix}.num_batches_tracked")
        elif isinstance(layer, layers.Dense):
            values = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        else:
            raise TypeError(f"No conversion rule for layer {layer_name} ({type(layer).__name__}).")
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [v.shape for v in values]:
            raise ValueError(
                f"Shape mismatch for layer {layer_name}: expected {expected}, "
                f"the file has {[v.shape for v in values]} under `{prefix}`."
            )
        layer.set_weights(values)
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(
            f"The weights file has tensors this architecture does not use: {unused[:5]}"
        )
