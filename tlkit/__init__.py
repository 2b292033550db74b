"""tlkit: transfer learning for image recognition with Keras 3.

Pretrained backbones that load offline, frozen-base classifiers, fine-tuning
that avoids the BatchNorm / preprocessing / recompile traps, augmentation
presets, data loading and a feature cache that makes CPU training fast.

Example:
    >>> import tlkit
    >>> flowers = tlkit.data.load("tf_flowers")
    >>> result = tlkit.train_run(flowers, tlkit.TrainConfig(epochs=10))
"""

import os as _os

# TensorFlow's C++ start-up logs are noise for notebook users; an explicit setting wins.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before anything imports TensorFlow: drop its benign C++ start-up lines (see tlkit._quiet).
from tlkit._quiet import import_tensorflow_quietly as _import_tensorflow_quietly  # noqa: E402

_import_tensorflow_quietly()

from tlkit import augment, data, detect, evaluation, explain  # noqa: E402
from tlkit._version import __version__  # noqa: E402
from tlkit.augment import build_augmentation, list_presets  # noqa: E402
from tlkit.backbones import build_backbone, get_backbone, list_backbones  # noqa: E402
from tlkit.export import export_model  # noqa: E402
from tlkit.features import FeatureSet, extract_features  # noqa: E402
from tlkit.fine_tuning import fine_tune, fine_tune_cached  # noqa: E402
from tlkit.heads import build_head, train_head  # noqa: E402
from tlkit.imagenet import decode_predictions  # noqa: E402
from tlkit.models import (  # noqa: E402
    build_classifier,
    build_feature_extractor,
    freeze,
    get_class_names,
    unfreeze,
)
from tlkit.predict import load_classifier, predict_files  # noqa: E402
from tlkit.preflight import DoctorReport, doctor  # noqa: E402
from tlkit.training import RunResult, TrainConfig, train_run  # noqa: E402

__all__ = [
    "__version__",
    "FeatureSet",
    "RunResult",
    "TrainConfig",
    "augment",
    "build_augmentation",
    "build_backbone",
    "build_classifier",
    "build_feature_extractor",
    "build_head",
    "data",
    "decode_predictions",
    "detect",
    "doctor",
    "DoctorReport",
    "evaluation",
    "explain",
    "export_model",
    "extract_features",
    "fine_tune",
    "fine_tune_cached",
    "freeze",
    "get_backbone",
    "get_class_names",
    "list_backbones",
    "list_presets",
    "load_classifier",
    "predict_files",
    "train_head",
    "train_run",
    "unfreeze",
]
