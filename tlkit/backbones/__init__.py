"""Pretrained backbones: a registry with ImageNet weights that load offline."""

from tlkit.backbones.preprocessing import PREPROCESSING_MODES, ImagePreprocessing
from tlkit.backbones.registry import (
    BACKBONES,
    BackboneSpec,
    WeightsNotAvailableError,
    WeightSource,
    build_backbone,
    converted_weights_path,
    get_backbone,
    list_backbones,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "ImagePreprocessing",
    "PREPROCESSING_MODES",
    "WeightSource",
    "WeightsNotAvailableError",
    "build_backbone",
    "converted_weights_path",
    "get_backbone",
    "list_backbones",
]
