"""What a model expects as input, resolved once: image size and preprocessing.

Like timm's `resolve_data_config`: every place that needs a model's input size
asks `resolve_input_config` instead of working it out again, so the rule
(an explicit size wins, then the model's own fixed size, then the backbone's
registry size, then 224) lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from tlkit.backbones import get_backbone
from tlkit.fingerprint import preprocessing_modes

# The size for a model that takes any size and names no registered backbone
# (the ImageNet training size of most backbones).
DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class InputConfig:
    """A model's input configuration.

    Attributes:
        image_size: Square input size in pixels.
        preprocessing: The `ImagePreprocessing` mode inside the model (or of
            the backbone), or None when unknown. Inputs are raw 0..255 RGB
            whenever it is set.
    """

    image_size: int
    preprocessing: str | None = None


def resolve_input_config(
    image_size: int | None = None,
    model: keras.Model | None = None,
    backbone: str | None = None,
) -> InputConfig:
    """The input configuration of a model or backbone, resolved in one place.

    Args:
        image_size: An explicit size; it wins when given. Defaults to None.
        model: A built model: its fixed input size and its preprocessing
            layer. Defaults to None.
        backbone: A registry name (`tlkit.backbones.list_backbones()`): its
            default size and preprocessing. Defaults to None.

    Returns:
        An `InputConfig`. The size is `image_size`, else the model's fixed
        input size, else the backbone's registry size, else 224.

    Raises:
        ValueError: On an unknown backbone name.

    Example:
        >>> resolve_input_config(backbone="mobilenet_v2").image_size
        224
    """
    spec = get_backbone(backbone) if backbone is not None else None
    size = image_size
    if not size and model is not None:
        size = model.input_shape[1]
    if not size and spec is not None:
        size = spec.image_size
    size = size or DEFAULT_IMAGE_SIZE
    modes = preprocessing_modes(model) if model is not None else []
    preprocessing = modes[0] if modes else (spec.preprocessing if spec is not None else None)
    return InputConfig(image_size=size, preprocessing=preprocessing)
