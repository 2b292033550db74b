"""Object detection on a frozen pretrained backbone: a small RetinaNet-style head.

The detector reuses a tlkit backbone as a multi-scale feature extractor (the
last block outputs at strides 8, 16 and 32), adds a light feature pyramid
(1x1 lateral convolutions and a top-down path, as in Lin et al., "Feature
Pyramid Networks", https://arxiv.org/abs/1612.03144) and one shared
convolutional head that predicts, for every anchor box, class scores (sigmoid,
trained with focal loss as in RetinaNet, https://arxiv.org/abs/1708.02002) and
box offsets.

With the base frozen, its feature maps are computed once per image
(`prepare_detection_data`) and the head trains on them in minutes on a CPU,
like `tlkit.features` does for classifiers. To fine-tune the base's top
blocks too, cache the activations below them instead
(`prepare_detection_data(..., fine_tune_from="block14")`) and train the top
blocks with the head (`fine_tune_detector`, BatchNorm frozen), as
`tlkit.fine_tuning.fine_tune_cached` does for classifiers. Box-aware
augmentation (`build_box_augmentation`) is Keras 3's preprocessing layers
with `bounding_box_format`, applied to a fixed number of cached views.

Box arithmetic comes from Keras itself (`keras.utils.bounding_boxes`:
`convert_format`, `compute_iou`, `encode_box_to_deltas`,
`decode_deltas_to_boxes`); non-maximum suppression is TensorFlow's
`tf.image.combined_non_max_suppression`; mAP is COCO's reference
implementation (`pycocotools.cocoeval.COCOeval`), at a single IoU threshold
(`mean_average_precision`) or COCO's AP50, AP and small-box recall
(`coco_metrics`).
Boxes are drawn with matplotlib because `keras.visualization.draw_bounding_boxes`
needs OpenCV, which tlkit does not depend on.

Boxes are always `[xmin, ymin, xmax, ymax]` in pixels ("xyxy"), like
`tlkit.data.load_detection` returns them.

A trained detector is saved with `save_detector` (one `.keras` file, written
atomically) and read back with `load_detector`, which loads with
`safe_mode=True`: nothing in the file is run as code. The anchors' settings
and the class names travel inside the model, in its `DetectionOutput` layer.

Example:
    >>> bccd = tlkit.data.load_detection("bccd")
    >>> detector = build_detector("mobilenet_v2", num_classes=3)
    >>> train = prepare_detection_data(detector, bccd.train)
    >>> train_detector(detector, train, epochs=30)
    >>> predictions = predict_boxes(detector, prepare_detection_data(detector, bccd.test))
    >>> mean_average_precision(predictions, bccd.test, class_names=bccd.class_names)
    >>> save_detector(detector, "bccd_detector.keras")
    >>> detector = load_detector("bccd_detector.keras")
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.utils import bounding_boxes

from tlkit._io import atomic_path
from tlkit._keras_compat import flatten_layers, reseed_layers
from tlkit.backbones import build_backbone, get_backbone, list_backbones
from tlkit.data.images import load_image
from tlkit.metadata import ModelMetadata

# Box offsets are divided by these before regression (the usual SSD/RetinaNet values).
BOX_VARIANCE = (0.1, 0.1, 0.2, 0.2)
# Anchors with IoU >= POSITIVE_IOU to a true box learn its class; below NEGATIVE_IOU
# they are background; anchors in between are ignored by the loss.
POSITIVE_IOU = 0.5
NEGATIVE_IOU = 0.4
_BACKGROUND = -1.0
_IGNORE = -2.0


# ---------------------------------------------------------------------------
# Box formats
# ---------------------------------------------------------------------------


def convert_boxes(boxes, source: str = "xyxy", target: str = "xywh") -> np.ndarray:
    """Converts boxes between formats with `keras.utils.bounding_boxes.convert_format`.

    Args:
        boxes: Array `(..., 4)`.
        source: Format of `boxes`, e.g. `"xyxy"`, `"xywh"`, `"center_xywh"`,
            `"yxyx"`. Defaults to `"xyxy"`.
        target: Format to return. Defaults to `"xywh"`.

    Returns:
        A float32 numpy array of the same shape.

    Example:
        >>> convert_boxes([[10, 20, 30, 60]], "xyxy", "xywh")
        array([[10., 20., 20., 40.]], dtype=float32)
    """
    boxes = np.asarray(boxes, dtype="float32")
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"Boxes must have shape (..., 4). Received: boxes.shape={boxes.shape}")
    if boxes.size == 0:
        return boxes.reshape(boxes.shape)
    return np.asarray(
        keras.ops.convert_to_numpy(
            bounding_boxes.convert_format(boxes, source=source, target=target)
        ),
        dtype="float32",
    )


# ---------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------


def make_anchors(
    image_size: tuple[int, int],
    strides: tuple[int, ...] = (8, 16, 32),
    anchor_scale: float = 2.5,
    scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
    aspect_ratios: tuple[float, ...] = (1.0,),
) -> np.ndarray:
    """Anchor boxes for every feature-map cell, level by level, in "xyxy" pixels.

    On a level of stride `s` each cell gets `len(scales) * len(aspect_ratios)`
    anchors centred on it, of side `anchor_scale * s * scale` (width/height
    ratio `aspect_ratio`). The order (level, row, column, anchor) matches the
    detector's output.

    Args:
        image_size: `(height, width)` of the detector input.
        strides: Feature-map strides. Defaults to `(8, 16, 32)`.
        anchor_scale: Anchor side in units of the stride. Defaults to 2.5.
        scales: Size multipliers per cell. Defaults to three octave steps.
        aspect_ratios: Width / height ratios. Defaults to `(1.0,)` (cells are
            round).

    Returns:
        A float32 array `(num_anchors, 4)`.
    """
    height, width = image_size
    levels = []
    for stride in strides:
        rows, columns = math.ceil(height / stride), math.ceil(width / stride)
        centre_y, centre_x = np.meshgrid(
            (np.arange(rows) + 0.5) * stride, (np.arange(columns) + 0.5) * stride, indexing="ij"
        )
        shapes = []
        for scale in scales:
            for ratio in aspect_ratios:
                side = anchor_scale * stride * scale
                shapes.append((side * math.sqrt(ratio), side / math.sqrt(ratio)))
        shapes = np.asarray(shapes, dtype="float32")  # (A, 2): width, height
        centres = np.stack([centre_x, centre_y], axis=-1).reshape(-1, 1, 2)
        half = shapes[None] / 2
        levels.append(np.concatenate([centres - half, centres + half], axis=-1).reshape(-1, 4))
    return np.concatenate(levels).astype("float32")


# ---------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------


def pyramid_layer_names(base: keras.Model, strides: tuple[int, ...] = (8, 16, 32)) -> list[str]:
    """The base's last layer at each stride, for a feature pyramid.

    The registry names them (`BackboneSpec.pyramid_layers`), so nothing here
    guesses from layer names.

    Args:
        base: A backbone from `tlkit.build_backbone`.
        strides: The strides wanted. Defaults to `(8, 16, 32)`.

    Returns:
        One layer name per stride.

    Raises:
        ValueError: If the backbone is not registered or has no pyramid layer
            at some stride.
    """
    return _pyramid_layers(get_backbone(base.name), strides)


def _pyramid_layers(spec, strides: tuple[int, ...]) -> list[str]:
    by_stride = dict(spec.pyramid_layers)
    missing = [stride for stride in strides if stride not in by_stride]
    if missing:
        usable = [n for n in list_backbones(offline_only=True) if get_backbone(n).pyramid_layers]
        raise ValueError(
            f"The backbone `{spec.name}` has no pyramid layer at stride {missing[0]} (its "
            "feature maps are not exact fractions of the image, or it is not an offline "
            f"backbone); build_detector needs strides {strides}: use one of {usable}. "
            f"Received: backbone={spec.name!r}, strides={strides}"
        )
    return [by_stride[stride] for stride in strides]


BACKBONE_LAYER = "backbone"
"""Name of the detector's frozen base (strides 8, 16, 32); the pyramid is in the head."""


def frozen_backbone(detector: keras.Model) -> keras.Model:
    """The frozen base inside a detector from `build_detector`.

    Detectors saved before the base was named `backbone` call it
    `feature_pyramid`; both are found.

    Raises:
        ValueError: If `detector` has neither layer.
    """
    for name in (BACKBONE_LAYER, "feature_pyramid"):
        if any(layer.name == name for layer in detector.layers):
            return detector.get_layer(name)
    raise ValueError(
        f"Expected a detector from tlkit.detect.build_detector with a `{BACKBONE_LAYER}` layer. "
        f"Received: layers={[layer.name for layer in detector.layers]}"
    )


def build_detector(
    backbone: str = "mobilenet_v2",
    num_classes: int = 3,
    image_size: tuple[int, int] = (256, 320),
    weights: str | os.PathLike | None = "imagenet",
    head_width: int = 64,
    head_depth: int = 2,
    anchor_scale: float = 2.5,
    scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
    aspect_ratios: tuple[float, ...] = (1.0,),
    class_names: list[str] | None = None,
) -> keras.Model:
    """A frozen pretrained backbone under a feature pyramid and a RetinaNet-style head.

    The model takes raw 0..255 RGB images of shape `image_size` and returns
    raw predictions `(batch, num_anchors, 4 + num_classes)`: box offsets from
    each anchor (see `BOX_VARIANCE`) then class logits. Use `predict_boxes`
    for boxes in pixels after non-maximum suppression.

    The model has two nested parts: `backbone` (the frozen base, called
    with `training=False`, outputting its feature maps at strides 8, 16 and
    32) and `detection_head` (trainable: the feature pyramid and the box and
    class convolutions), so the head can be trained on cached
    features and used in the detector without copying weights. The anchors
    are in `detector.anchors`, class names in `detector.class_names`.

    Args:
        backbone: An offline registry name. Defaults to `"mobilenet_v2"`.
        num_classes: Number of object classes (no background class).
            Defaults to 3.
        image_size: Input `(height, width)`; both multiples of 32. Defaults
            to `(256, 320)`, close to half of a 640x480 image.
        weights: Base weights: `"imagenet"`, None or a `.weights.h5` path.
            Defaults to `"imagenet"`.
        head_width: Channels in the pyramid and head. Defaults to 64.
        head_depth: 3x3 convolutions in the shared head. Defaults to 2.
        anchor_scale: Anchor side in units of the level's stride. Defaults to 2.5.
        scales: Anchor size multipliers per cell. Defaults to
            `(1, 2**(1/3), 2**(2/3))`.
        aspect_ratios: Anchor width / height ratios. Defaults to `(1.0,)`.
        class_names: Names of the classes, or None. Defaults to None.

    Returns:
        An uncompiled `keras.Model` (compile happens in `train_detector`).

    Raises:
        ValueError: On invalid arguments or a backbone without block outputs
            at strides 8, 16 and 32.

    Example:
        >>> detector = build_detector("mobilenet_v2", num_classes=3, image_size=(256, 320))
        >>> detector.output_shape
        (None, 5040, 7)
    """
    spec = get_backbone(backbone)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes must be a positive integer. Received: num_classes={num_classes!r}"
        )
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or any(not isinstance(v, int) or v < 32 or v % 32 for v in image_size)
    ):
        raise ValueError(
            "image_size must be a (height, width) pair of multiples of 32, e.g. (256, 320), so "
            "the stride-32 map is exactly half the stride-16 one. "
            f"Received: image_size={image_size!r}"
        )
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"Got {len(class_names)} class names for num_classes={num_classes}. "
            f"Received: class_names={list(class_names)}"
        )
    image_size = (int(image_size[0]), int(image_size[1]))
    strides = (8, 16, 32)
    names = _pyramid_layers(spec, strides)  # Before building: fails fast.
    base = build_backbone(backbone, image_size=None, weights=weights)
    frozen_base = keras.Model(
        base.input, [base.get_layer(n).output for n in names], name=BACKBONE_LAYER
    )
    frozen_base.trainable = False
    channels = [int(output.shape[-1]) for output in frozen_base.outputs]
    anchors_per_cell = len(scales) * len(aspect_ratios)
    head = _build_head(channels, num_classes, anchors_per_cell, head_width, head_depth)

    inputs = keras.Input(shape=(*image_size, 3), name="image")
    features = frozen_base(inputs, training=False)
    outputs = DetectionOutput(
        class_names=list(class_names) if class_names else [str(i) for i in range(num_classes)],
        strides=strides,
        anchor_scale=anchor_scale,
        scales=scales,
        aspect_ratios=aspect_ratios,
        pyramid_layers=names,
        backbone=backbone,
    )(head(features))
    detector = keras.Model(inputs, outputs, name=f"{backbone}_detector")
    _attach_metadata(detector)
    return detector


@keras.saving.register_keras_serializable(package="tlkit")
class DetectionOutput(ModelMetadata):
    """The detector's last layer: passes the raw predictions through unchanged.

    It records how to read them (the anchors' settings, the class names and
    the base layers the pyramid taps), so a saved detector carries them and
    `load_detector` can rebuild `detector.anchors` and
    `detector.class_names`.

    Args:
        class_names: Names of the classes.
        strides: Feature-map strides. Defaults to `(8, 16, 32)`.
        anchor_scale: Anchor side in units of the stride. Defaults to 2.5.
        scales: Anchor size multipliers per cell. Defaults to
            `(1, 2**(1/3), 2**(2/3))`.
        aspect_ratios: Anchor width / height ratios. Defaults to `(1.0,)`.
        pyramid_layers: Names of the base layers at the pyramid's strides.
            Defaults to None.
        backbone: Registry name of the base, or None (files saved before it
            was recorded: the detector's name gives it). Defaults to None.
    """

    def __init__(
        self,
        class_names,
        strides=(8, 16, 32),
        anchor_scale=2.5,
        scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios=(1.0,),
        pyramid_layers=None,
        backbone=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "detections")
        super().__init__(class_names, **kwargs)
        self.strides = tuple(int(stride) for stride in strides)
        self.anchor_scale = float(anchor_scale)
        self.scales = tuple(float(scale) for scale in scales)
        self.aspect_ratios = tuple(float(ratio) for ratio in aspect_ratios)
        self.pyramid_layers = list(pyramid_layers) if pyramid_layers is not None else None
        self.backbone = backbone

    def get_config(self):
        return {
            **super().get_config(),
            "strides": list(self.strides),
            "anchor_scale": self.anchor_scale,
            "scales": list(self.scales),
            "aspect_ratios": list(self.aspect_ratios),
            "pyramid_layers": self.pyramid_layers,
            "backbone": self.backbone,
        }


def _attach_metadata(detector: keras.Model) -> None:
    """Sets `anchors`, `class_names` and `pyramid_layers` from the `DetectionOutput` layer."""
    output = next((layer for layer in detector.layers if isinstance(layer, DetectionOutput)), None)
    if output is None:
        raise ValueError(
            "This model has no DetectionOutput layer, so it is not a tlkit detector; build one "
            f"with tlkit.detect.build_detector. Received: model named {detector.name!r}"
        )
    image_size = tuple(int(v) for v in detector.input_shape[1:3])
    detector.anchors = make_anchors(
        image_size, output.strides, output.anchor_scale, output.scales, output.aspect_ratios
    )
    detector.class_names = list(output.class_names)
    detector.pyramid_layers = output.pyramid_layers
    detector.backbone_name = output.backbone or detector.name.removesuffix("_detector")
    if detector.output_shape[1] != len(detector.anchors):
        raise ValueError(
            f"The detector predicts for {detector.output_shape[1]} anchors but its settings give "
            f"{len(detector.anchors)}; the file was not written by tlkit.detect.save_detector. "
            f"Received: output_shape={detector.output_shape}"
        )


def save_detector(detector: keras.Model, path: str | os.PathLike) -> None:
    """Saves a detector to one `.keras` file, atomically.

    The file holds the architecture, every weight (frozen base included) and,
    in the `DetectionOutput` layer, the anchors' settings and class names. It
    is written beside `path` and renamed onto it, so a crash leaves either
    the old file or the new one. The head's optimizer state is not kept:
    `train_detector` compiles a fresh one.

    Args:
        detector: A model from `build_detector` (trained or not).
        path: Destination ending in `.keras`.

    Raises:
        ValueError: If `path` does not end in `.keras` or `detector` is not a
            tlkit detector.

    Example:
        >>> save_detector(detector, "bccd_detector.keras")
    """
    if not str(path).endswith(".keras"):
        raise ValueError(
            "A detector is saved as one .keras file, e.g. 'detector.keras'. "
            f"Received: path={str(path)!r}"
        )
    if not any(isinstance(layer, DetectionOutput) for layer in detector.layers):
        raise ValueError(
            "Only models from tlkit.detect.build_detector can be saved with save_detector. "
            f"Received: model named {detector.name!r}"
        )
    with atomic_path(path) as temporary:
        detector.save(temporary)


def load_detector(path: str | os.PathLike) -> keras.Model:
    """Loads a detector written by `save_detector`, without running code from the file.

    Keras loads it with `safe_mode=True`: a file with a `Lambda` layer (whose
    Python code would run on load) is refused, and only Keras layers and
    tlkit's registered layers are rebuilt. `anchors`, `class_names` and
    `pyramid_layers` are restored, so `predict_boxes` and `train_detector`
    work as on the original.

    Args:
        path: A `.keras` file from `save_detector`.

    Returns:
        The detector (uncompiled).

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file holds code that would run on load, or a
            model that is not a tlkit detector.

    Example:
        >>> detector = load_detector("bccd_detector.keras")
        >>> predictions = predict_boxes(detector, ["blood_cells.jpg"])
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No detector file at {str(path)!r}; save one with tlkit.detect.save_detector. "
            f"Received: path={str(path)!r}"
        )
    detector = keras.saving.load_model(path, compile=False, safe_mode=True)
    _attach_metadata(detector)
    return detector


def _build_head(channels, num_classes, anchors_per_cell, width, depth) -> keras.Model:
    layers = keras.layers
    inputs = [
        keras.Input(shape=(None, None, c), name=f"stride{s}")
        for c, s in zip(channels, (8, 16, 32), strict=True)
    ]
    laterals = [
        layers.Conv2D(width, 1, name=f"lateral_stride{s}")(x)
        for x, s in zip(inputs, (8, 16, 32), strict=True)
    ]
    # Top-down path: add the upsampled coarser level to each finer one.
    for index in (1, 0):
        upsampled = layers.UpSampling2D(2, name=f"upsample_to_stride{8 * 2**index}")(
            laterals[index + 1]
        )
        laterals[index] = layers.Add(name=f"top_down_stride{8 * 2**index}")(
            [laterals[index], upsampled]
        )
    tower = [
        layers.Conv2D(width, 3, padding="same", activation="relu", name=f"head_conv{i + 1}")
        for i in range(depth)
    ]
    prior = 0.01  # RetinaNet: start every anchor at 1 % foreground probability.
    class_output = layers.Conv2D(
        anchors_per_cell * num_classes,
        3,
        padding="same",
        name="class_logits",
        bias_initializer=keras.initializers.Constant(-math.log((1 - prior) / prior)),
    )
    box_output = layers.Conv2D(
        anchors_per_cell * 4, 3, padding="same", name="box_offsets", kernel_initializer="zeros"
    )
    per_level = []
    for x, stride in zip(laterals, (8, 16, 32), strict=True):
        for conv in tower:
            x = conv(x)
        boxes = layers.Reshape((-1, 4), name=f"boxes_stride{stride}")(box_output(x))
        classes = layers.Reshape((-1, num_classes), name=f"classes_stride{stride}")(class_output(x))
        per_level.append(layers.Concatenate(name=f"predictions_stride{stride}")([boxes, classes]))
    outputs = layers.Concatenate(axis=1, name="predictions")(per_level)
    return keras.Model(inputs, outputs, name="detection_head")


@keras.saving.register_keras_serializable(package="tlkit")
class DetectionLoss(keras.losses.Loss):
    """Focal loss on classes plus Huber loss on box offsets, per positive anchor.

    `y_true` is `(batch, anchors, 5)`: encoded box offsets, then the class
    index (-1 background, -2 ignored). `y_pred` is the detector output.

    Args:
        num_classes: Number of object classes.
        alpha: Focal loss weight of positives. Defaults to 0.25.
        gamma: Focal loss focusing parameter. Defaults to 2.0.
        box_weight: Weight of the box loss. Defaults to 1.0.
        name: Loss name. Defaults to `"detection_loss"`.
    """

    def __init__(
        self, num_classes, alpha=0.25, gamma=2.0, box_weight=1.0, name="detection_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.alpha = alpha
        self.gamma = gamma
        self.box_weight = box_weight

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_pred = ops.cast(y_pred, "float32")
        labels = y_true[..., 4]
        positive = ops.cast(labels >= 0, "float32")
        keep = ops.cast(labels != _IGNORE, "float32")
        one_hot = ops.one_hot(ops.cast(ops.maximum(labels, 0), "int32"), self.num_classes)
        one_hot = one_hot * positive[..., None]
        focal = keras.losses.binary_focal_crossentropy(
            one_hot[..., None],
            y_pred[..., 4:, None],
            apply_class_balancing=True,
            alpha=self.alpha,
            gamma=self.gamma,
            from_logits=True,
        )  # (batch, anchors, classes)
        class_loss = ops.sum(ops.sum(focal, axis=-1) * keep, axis=-1)
        huber = keras.losses.huber(y_true[..., None, :4], y_pred[..., None, :4], delta=1.0)
        box_loss = ops.sum(ops.sum(huber, axis=-1) * positive, axis=-1) * 4.0
        positives = ops.maximum(ops.sum(positive, axis=-1), 1.0)
        return (class_loss + self.box_weight * box_loss) / positives

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "box_weight": self.box_weight,
        }


# ---------------------------------------------------------------------------
# Data: cached base features and encoded targets
# ---------------------------------------------------------------------------


@dataclass
class DetectionData:
    """Cached base features of some images, with their boxes and training targets.

    Attributes:
        features: One float16 array per pyramid level, `(N * views, h, w, c)`,
            view-major (all images of view 0, then view 1, ...).
        targets: float32 `(N * views, num_anchors, 5)` for `DetectionLoss`.
        boxes: Per image, the true "xyxy" boxes in its original pixels.
        labels: Per image, the int32 class indices.
        image_paths: The image files.
        original_sizes: Per image, `(height, width)` of the file.
        views: 1 (plain), 2 (+ left-right flip) or 4 (+ up-down and both);
            with an augmentation, view 0 is plain and the others are
            augmented draws.
        fine_tune_from: None when `features` are the base's pyramid
            outputs; a block name when they are the frozen activations below
            that block (the pyramid outputs below it, then the block's
            input), for `fine_tune_detector`.
    """

    features: list[np.ndarray]
    targets: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    image_paths: list[str]
    original_sizes: list[tuple[int, int]]
    views: int = 1
    fine_tune_from: str | None = None

    def __len__(self) -> int:
        return len(self.image_paths)

    def first_views(self, count: int = 1) -> DetectionData:
        """The same images with only their first `count` views (view 0 is the plain image).

        Raises:
            ValueError: If `count` is not between 1 and `views`.
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= self.views:
            raise ValueError(f"count must be between 1 and {self.views}. Received: count={count!r}")
        rows = count * len(self)
        return dataclasses.replace(
            self,
            features=[level[:rows] for level in self.features],
            targets=self.targets[:rows],
            views=count,
        )


def encode_targets(anchors: np.ndarray, boxes, labels) -> np.ndarray:
    """Matches anchors to true boxes and encodes the training targets.

    An anchor is positive for the box it overlaps most when IoU >= 0.5,
    background below 0.4, ignored in between; each box's best anchor is
    positive whatever its IoU, so small boxes are never left unmatched.

    Args:
        anchors: `(A, 4)` "xyxy" anchors in detector-input pixels.
        boxes: `(G, 4)` "xyxy" boxes in the same pixels.
        labels: `(G,)` class indices.

    Returns:
        float32 `(A, 5)`: offsets to the matched box, then the class index
        (-1 background, -2 ignored).
    """
    boxes = np.asarray(boxes, "float32").reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    targets = np.zeros((len(anchors), 5), "float32")
    targets[:, 4] = _BACKGROUND
    if len(boxes) == 0:
        return targets
    iou = keras.ops.convert_to_numpy(bounding_boxes.compute_iou(anchors, boxes, "xyxy"))
    best_box = iou.argmax(axis=1)
    best_iou = iou.max(axis=1)
    classes = labels[best_box].astype("float32")
    classes[best_iou < POSITIVE_IOU] = _IGNORE
    classes[best_iou < NEGATIVE_IOU] = _BACKGROUND
    best_anchor = iou.argmax(axis=0)
    best_box[best_anchor] = np.arange(len(boxes))
    classes[best_anchor] = labels.astype("float32")
    targets[:, :4] = keras.ops.convert_to_numpy(
        bounding_boxes.encode_box_to_deltas(
            anchors,
            boxes[best_box],
            anchor_format="xyxy",
            box_format="xyxy",
            variance=BOX_VARIANCE,
        )
    )
    targets[:, 4] = classes
    return targets


def prepare_detection_data(
    detector: keras.Model,
    examples,
    views: int = 1,
    batch_size: int = 16,
    augmentation: keras.Layer | None = None,
    seed: int = 0,
    fine_tune_from: str | None = None,
) -> DetectionData:
    """Runs the frozen base once over the images and encodes their targets.

    Without `fine_tune_from` the cache holds the base's pyramid outputs, for
    `train_detector`. With it, the cache holds what the frozen blocks below
    `fine_tune_from` compute (the pyramid outputs below that block and the
    block's input), so `fine_tune_detector` can train the blocks from
    `fine_tune_from` up together with the head without running the lower
    blocks every epoch (as `tlkit.fine_tuning.fine_tune_cached` does for
    classifiers). `train_detector` and `predict_boxes` accept both.

    Args:
        detector: A model from `build_detector`.
        examples: A list of `tlkit.data.DetectionExample` (e.g.
            `tlkit.data.load_detection("bccd").train`).
        views: Without `augmentation`: 1 for the plain images; 2 adds
            left-right flips; 4 adds up-down flips and both (useful for
            rotation-free images such as microscopy). With `augmentation`:
            view 0 is plain and the other `views - 1` are augmented draws.
            Defaults to 1.
        batch_size: Images per base forward pass. Defaults to 16.
        augmentation: A box-aware Keras layer (`build_box_augmentation`)
            applied to `{"images", "bounding_boxes"}` at the detector's input
            size, or None. Defaults to None.
        seed: Seed of the augmented draws. Defaults to 0.
        fine_tune_from: None, or the first block to fine-tune, one of
            `detector_block_names(detector)` after the stem, e.g. `"block14"`.
            Defaults to None.

    Returns:
        A `DetectionData`.

    Raises:
        ValueError: On bad `views`, an empty `examples`, or an unknown block.
    """
    if augmentation is None and views not in (1, 2, 4):
        raise ValueError(
            f"views must be 1, 2 or 4 (flips), or any positive count with an augmentation. "
            f"Received: views={views!r}"
        )
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be a positive integer. Received: views={views!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty; pass e.g. dataset.train. Received: examples=[]")
    height, width = detector.input_shape[1:3]
    if fine_tune_from is None:
        extractor = frozen_backbone(detector)
    else:
        extractor, _ = split_backbone(detector, fine_tune_from)
    images, scaled_boxes, sizes = [], [], []
    for example in examples:
        image = load_image(example.image_path)
        sizes.append(image.shape[:2])
        images.append(keras.ops.convert_to_numpy(keras.ops.image.resize(image, (height, width))))
        scale = np.array([width / image.shape[1], height / image.shape[0]] * 2, "float32")
        scaled_boxes.append(np.asarray(example.boxes, "float32").reshape(-1, 4) * scale)
    images = np.stack(images)
    labels = [np.asarray(example.labels, "int32").reshape(-1) for example in examples]
    features = [[] for _ in extractor.outputs]
    targets = []
    for view_index in range(views):
        if augmentation is not None:
            if view_index == 0:
                view, view_boxes, view_labels = images, scaled_boxes, labels
            else:
                view, view_boxes, view_labels = augment_with_boxes(
                    augmentation,
                    images,
                    scaled_boxes,
                    labels,
                    seed=seed + view_index,
                    batch_size=batch_size,
                )
        else:
            flip_x, flip_y = [(False, False), (True, False), (False, True), (True, True)][
                view_index
            ]
            view = images[:, :, ::-1] if flip_x else images
            view = view[:, ::-1] if flip_y else view
            view_boxes = []
            for boxes in scaled_boxes:
                flipped = boxes.copy()
                if flip_x:
                    flipped[:, [0, 2]] = width - boxes[:, [2, 0]]
                if flip_y:
                    flipped[:, [1, 3]] = height - boxes[:, [3, 1]]
                view_boxes.append(flipped)
            view_labels = labels
        for start in range(0, len(view), batch_size):
            outputs = extractor(
                np.ascontiguousarray(view[start : start + batch_size]), training=False
            )
            for level, output in zip(features, outputs, strict=True):
                level.append(keras.ops.convert_to_numpy(output).astype("float16"))
        for boxes, box_labels in zip(view_boxes, view_labels, strict=True):
            targets.append(encode_targets(detector.anchors, boxes, box_labels))
    return DetectionData(
        features=[np.concatenate(level) for level in features],
        targets=np.stack(targets),
        boxes=[np.asarray(e.boxes, "float32").reshape(-1, 4) for e in examples],
        labels=[np.asarray(e.labels, "int32") for e in examples],
        image_paths=[e.image_path for e in examples],
        original_sizes=[tuple(int(v) for v in s) for s in sizes],
        views=views,
        fine_tune_from=fine_tune_from,
    )


# ---------------------------------------------------------------------------
# Box-aware augmentation
# ---------------------------------------------------------------------------


def build_box_augmentation(
    zoom: float = 0.3,
    translation: float = 0.1,
    brightness: float = 0.2,
    contrast: float = 0.2,
    horizontal_flip: bool = False,
    seed: int | None = None,
) -> keras.Sequential:
    """Random scale/crop and colour that move the boxes with the image.

    Keras 3 preprocessing layers with `bounding_box_format="xyxy"`: they take
    `{"images", "bounding_boxes": {"boxes", "labels"}}` and transform the
    boxes with the pixels; boxes are clipped to the image, and a box that
    falls out gets label -1 (`augment_with_boxes` drops it). No flip by
    default: a sign's meaning can depend on its side (keep left / keep right).

    Args:
        zoom: `RandomZoom` factor: the image is scaled by up to this fraction
            in or out (zooming in crops). Defaults to 0.3.
        translation: `RandomTranslation` factor, a fraction of height and
            width. Defaults to 0.1.
        brightness: `RandomBrightness` factor (0..255 images). Defaults to 0.2.
        contrast: `RandomContrast` factor. Defaults to 0.2.
        horizontal_flip: Add `RandomFlip("horizontal")`. Defaults to False.
        seed: Seed of the layers, or None. Defaults to None.

    Returns:
        A `keras.Sequential` of preprocessing layers.

    Example:
        >>> augmentation = build_box_augmentation(seed=0)
        >>> data = prepare_detection_data(detector, train, views=3, augmentation=augmentation)
    """
    layers = keras.layers
    fmt = "xyxy"

    def seeded(offset):
        return None if seed is None else seed + offset

    stack = []
    if horizontal_flip:
        stack.append(layers.RandomFlip("horizontal", bounding_box_format=fmt, seed=seeded(0)))
    if zoom:
        stack.append(
            layers.RandomZoom(
                (-zoom, zoom), bounding_box_format=fmt, fill_mode="constant", seed=seeded(1)
            )
        )
    if translation:
        stack.append(
            layers.RandomTranslation(
                translation,
                translation,
                bounding_box_format=fmt,
                fill_mode="constant",
                seed=seeded(2),
            )
        )
    if brightness:
        stack.append(
            layers.RandomBrightness(
                brightness, value_range=(0, 255), bounding_box_format=fmt, seed=seeded(3)
            )
        )
    if contrast:
        stack.append(
            layers.RandomContrast(
                contrast, value_range=(0, 255), bounding_box_format=fmt, seed=seeded(4)
            )
        )
    return keras.Sequential(stack, name="box_augmentation")


def augment_with_boxes(
    augmentation: keras.Layer,
    images,
    boxes: list,
    labels: list,
    seed: int | None = None,
    batch_size: int = 16,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Applies a box-aware augmentation to images and their "xyxy" boxes.

    The boxes of each batch are padded to one length with label -1 (Keras'
    convention for "no box"), passed with the images as
    `{"images", "bounding_boxes": {"boxes", "labels"}}`, and read back; boxes
    that Keras marked -1 (fell out of the image) or that were clipped to
    zero width or height are dropped.

    Args:
        augmentation: A Keras layer taking that dict, e.g.
            `build_box_augmentation()`.
        images: `(N, H, W, 3)` 0..255 images.
        boxes: Per image, `(G, 4)` "xyxy" boxes in those images' pixels.
        labels: Per image, `(G,)` class indices.
        seed: Reseeds `augmentation`'s random layers first, or None to
            continue their sequence. Defaults to None.
        batch_size: Images per call. Defaults to 16.

    Returns:
        `(images, boxes, labels)` augmented, boxes float32 and labels int32.

    Raises:
        ValueError: If the three inputs differ in length.
    """
    images = np.asarray(images, "float32")
    if not len(images) == len(boxes) == len(labels):
        raise ValueError(
            "images, boxes and labels must have one entry per image. Received: "
            f"len(images)={len(images)}, len(boxes)={len(boxes)}, len(labels)={len(labels)}"
        )
    if seed is not None:
        reseed_layers(augmentation, seed)
    out_images, out_boxes, out_labels = [], [], []
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        batch_boxes = [np.asarray(b, "float32").reshape(-1, 4) for b in boxes[start:stop]]
        batch_labels = [np.asarray(v, "int32").reshape(-1) for v in labels[start:stop]]
        longest = max(1, max(len(b) for b in batch_boxes))
        padded_boxes = np.zeros((len(batch_boxes), longest, 4), "float32")
        padded_labels = np.full((len(batch_boxes), longest), -1, "int32")
        for row, (b, v) in enumerate(zip(batch_boxes, batch_labels, strict=True)):
            padded_boxes[row, : len(b)] = b
            padded_labels[row, : len(v)] = v
        result = augmentation(
            {
                "images": images[start:stop],
                "bounding_boxes": {"boxes": padded_boxes, "labels": padded_labels},
            },
            training=True,
        )
        out_images.append(keras.ops.convert_to_numpy(result["images"]).astype("float32"))
        new_boxes = keras.ops.convert_to_numpy(result["bounding_boxes"]["boxes"])
        new_labels = keras.ops.convert_to_numpy(result["bounding_boxes"]["labels"])
        for b, v in zip(new_boxes, new_labels, strict=True):
            keep = (v >= 0) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            out_boxes.append(b[keep].astype("float32"))
            out_labels.append(v[keep].astype("int32"))
    return np.concatenate(out_images), out_boxes, out_labels


# ---------------------------------------------------------------------------
# Fine-tuning the backbone's top blocks on cached lower activations
# ---------------------------------------------------------------------------


def detector_block_names(detector: keras.Model) -> list[str]:
    """The detector base's blocks in input-to-output order (as `tlkit.models.block_names`).

    Raises:
        ValueError: If the base is not a registered backbone.
    """
    spec = get_backbone(detector.backbone_name)
    names: list[str] = []
    for layer in flatten_layers(frozen_backbone(detector), include_self=False):
        block = spec.block_of(layer.name)
        if block and block not in names:
            names.append(block)
    return names


def split_backbone(detector: keras.Model, block: str) -> tuple[keras.Model, keras.Model]:
    """Cuts the detector's base at the start of `block`, for cached fine-tuning.

    Args:
        detector: A model from `build_detector`.
        block: The first block to fine-tune, one of `detector_block_names`
            after the stem.

    Returns:
        `(lower, upper)`. `lower` maps raw 0..255 images to the pyramid
        outputs below `block` followed by the activation entering `block`;
        `upper` maps that activation to the remaining pyramid outputs. Both
        share their layers with the detector.

    Raises:
        ValueError: On an unknown block or `"stem"`.
    """
    names = detector_block_names(detector)
    if block not in names[1:]:
        raise ValueError(
            f"block must name a block of {detector.backbone_name} after the stem, one of "
            f"{names[1:]}. Received: block={block!r}"
        )
    spec = get_backbone(detector.backbone_name)
    base = frozen_backbone(detector)
    cut_index = names.index(block)
    first = next(
        layer
        for layer in flatten_layers(base, include_self=False)
        if spec.block_of(layer.name) == block
    )
    cut = first.input
    below, above = [], []
    for output, layer_name in zip(base.outputs, detector.pyramid_layers, strict=True):
        tapped = spec.block_of(layer_name)
        (below if tapped and names.index(tapped) < cut_index else above).append(output)
    lower = keras.Model(base.input, [*below, cut], name=f"backbone_below_{block}")
    upper = keras.Model(cut, above, name=f"backbone_from_{block}")
    return lower, upper


def _cached_model(detector: keras.Model, fine_tune_from: str | None) -> keras.Model:
    """The part of the detector that runs on cached features: head, or upper blocks + head."""
    head = detector.get_layer("detection_head")
    if fine_tune_from is None:
        return head
    lower, upper = split_backbone(detector, fine_tune_from)
    inputs = [
        keras.Input(shape=tuple(output.shape[1:]), name=f"cached{index}")
        for index, output in enumerate(lower.outputs)
    ]
    above = upper(inputs[-1], training=False)
    above = above if isinstance(above, (list, tuple)) else [above]
    outputs = head([*inputs[:-1], *above])
    return keras.Model(inputs, outputs, name=f"detector_from_{fine_tune_from}")


# ---------------------------------------------------------------------------
# Training and prediction
# ---------------------------------------------------------------------------


def train_detector(
    detector: keras.Model,
    train_data: DetectionData,
    validation_data: DetectionData | None = None,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    verbose: int = 0,
) -> keras.callbacks.History:
    """Trains the detection head on cached features; the base stays frozen.

    With data prepared with `fine_tune_from`, the frozen top blocks run on
    the cached activations every epoch (use `fine_tune_detector` to train
    them too).

    Adam with a cosine-decaying learning rate. With `validation_data`, the
    head ends with the weights of the epoch of lowest validation loss.

    Args:
        detector: A model from `build_detector`.
        train_data: From `prepare_detection_data` with the same detector.
        validation_data: Same, for validation loss, or None. Defaults to None.
        epochs: Passes over `train_data`. Defaults to 30.
        learning_rate: Initial learning rate. Defaults to 1e-3.
        batch_size: Images per step. Defaults to 8.
        seed: Shuffling seed. Defaults to 0.
        verbose: Keras verbosity. Defaults to 0.

    Returns:
        The Keras `History` (`loss`, and `val_loss` with validation data).

    Raises:
        ValueError: If the data were prepared with another detector layout.
    """
    return _fit(
        detector,
        _cached_model(detector, train_data.fine_tune_from),
        train_data,
        validation_data,
        epochs,
        learning_rate,
        batch_size,
        seed,
        verbose,
    )


def fine_tune_detector(
    detector: keras.Model,
    train_data: DetectionData,
    validation_data: DetectionData | None = None,
    epochs: int = 10,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    verbose: int = 0,
) -> keras.callbacks.History:
    """Fine-tunes the base's top blocks together with the head, on cached activations.

    The blocks from `train_data.fine_tune_from` up become trainable, except
    their BatchNormalization layers, which stay frozen and run in inference
    mode (`training=False`), so their statistics never move to the small
    new data set. The blocks below are frozen and their activations come
    from the cache (`prepare_detection_data(..., fine_tune_from=block)`), so
    an epoch costs only the top blocks and the head. Train the head first
    (`train_detector` on the same data): a random head sends large, noisy
    gradients into the pretrained blocks. Afterwards the base is frozen
    again; its weights stay fine-tuned in `detector`.

    Args:
        detector: A model from `build_detector`, changed in place.
        train_data: From `prepare_detection_data(detector, ...,
            fine_tune_from=block)`.
        validation_data: Same, for validation loss, or None. With it, the
            weights of the epoch of lowest validation loss are kept.
            Defaults to None.
        epochs: Passes over `train_data`. Defaults to 10.
        learning_rate: Initial Adam learning rate (cosine decay), lower
            than for the head alone. Defaults to 1e-4.
        batch_size: Images per step. Defaults to 8.
        seed: Shuffling seed. Defaults to 0.
        verbose: Keras verbosity. Defaults to 0.

    Returns:
        The Keras `History`.

    Raises:
        ValueError: If `train_data` was prepared without `fine_tune_from`,
            or the two data sets were cut at different blocks.

    Example:
        >>> data = prepare_detection_data(detector, train, fine_tune_from="block14")
        >>> train_detector(detector, data, epochs=20)
        >>> fine_tune_detector(detector, data, epochs=10)
    """
    block = train_data.fine_tune_from
    if block is None:
        raise ValueError(
            "fine_tune_detector trains on activations below the fine-tuned blocks; prepare "
            "the data with prepare_detection_data(detector, examples, fine_tune_from='block14') "
            "(see detector_block_names). Received: train_data.fine_tune_from=None"
        )
    if validation_data is not None and validation_data.fine_tune_from != block:
        raise ValueError(
            "train_data and validation_data must be cut at the same block. Received: "
            f"{block!r} and {validation_data.fine_tune_from!r}"
        )
    model = _cached_model(detector, block)
    _, upper = split_backbone(detector, block)
    # Set every layer itself: a model cut from the middle of another does not pass
    # `trainable` on to the layers it shares (as in fine_tuning.build_upper_classifier).
    for layer in flatten_layers(upper, include_self=False):
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    try:
        return _fit(
            detector,
            model,
            train_data,
            validation_data,
            epochs,
            learning_rate,
            batch_size,
            seed,
            verbose,
        )
    finally:
        frozen_backbone(detector).trainable = False


def _fit(
    detector, model, train_data, validation_data, epochs, learning_rate, batch_size, seed, verbose
) -> keras.callbacks.History:
    for data, name in ((train_data, "train_data"), (validation_data, "validation_data")):
        if data is not None and data.targets.shape[1] != len(detector.anchors):
            raise ValueError(
                f"{name} has targets for {data.targets.shape[1]} anchors but the detector has "
                f"{len(detector.anchors)}; prepare it with this detector. "
                f"Received: {name}.targets.shape={data.targets.shape}"
            )
    if validation_data is not None and validation_data.fine_tune_from != train_data.fine_tune_from:
        raise ValueError(
            "train_data and validation_data must be prepared alike (same fine_tune_from). "
            f"Received: {train_data.fine_tune_from!r} and {validation_data.fine_tune_from!r}"
        )
    steps = math.ceil(len(train_data.targets) / batch_size) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(steps, 1))
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=DetectionLoss(len(detector.class_names)),
    )
    callbacks = []
    validation = None
    if validation_data is not None:
        validation = _dataset(validation_data, batch_size, shuffle=False, seed=seed)
        callbacks.append(
            keras.callbacks.EarlyStopping(
                patience=epochs, restore_best_weights=True, start_from_epoch=0
            )
        )
    return model.fit(
        _dataset(train_data, batch_size, shuffle=True, seed=seed),
        validation_data=validation,
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=verbose,
    )


def _dataset(data: DetectionData, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices((tuple(data.features), data.targets))
    if shuffle:
        dataset = dataset.shuffle(len(data.targets), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).map(
        lambda features, targets: (tuple(tf.cast(f, "float32") for f in features), targets)
    )


def predict_boxes(
    detector: keras.Model,
    images,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    batch_size: int = 16,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Detects objects: decodes the anchors' offsets, then per-class non-maximum suppression.

    Args:
        detector: A model from `build_detector`.
        images: A `DetectionData` (uses its cached features, fast), a list of
            image files, or a list / array of RGB images (0..255, any size).
        score_threshold: Drop detections scoring below this. Keep it low
            (0.05) for mAP, higher (0.3-0.5) for drawing. Defaults to 0.05.
        iou_threshold: Non-maximum suppression merges boxes of one class
            overlapping more than this. Defaults to 0.5.
        max_detections: At most this many boxes per image. Defaults to 100.
        batch_size: Images per forward pass. Defaults to 16.

    Returns:
        One `(boxes, scores, classes)` per image: float32 `(K, 4)` "xyxy" in
        that image's own pixels, float32 `(K,)` sorted high to low, int32 `(K,)`.

    Raises:
        ValueError: On thresholds outside [0, 1].
    """
    for value, name in ((score_threshold, "score_threshold"), (iou_threshold, "iou_threshold")):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]. Received: {name}={value!r}")
    height, width = detector.input_shape[1:3]
    if isinstance(images, DetectionData):
        head = _cached_model(detector, images.fine_tune_from)
        count = len(images)
        raw = head.predict(
            [level[:count].astype("float32") for level in images.features],
            batch_size=batch_size,
            verbose=0,
        )
        sizes = images.original_sizes
    else:
        arrays = [
            load_image(i) if isinstance(i, (str, os.PathLike)) else np.asarray(i, "float32")
            for i in images
        ]
        sizes = [a.shape[:2] for a in arrays]
        resized = np.stack(
            [keras.ops.convert_to_numpy(keras.ops.image.resize(a, (height, width))) for a in arrays]
        )
        raw = detector.predict(resized, batch_size=batch_size, verbose=0)
    return _decode(
        detector.anchors,
        raw,
        (height, width),
        sizes,
        score_threshold,
        iou_threshold,
        max_detections,
    )


def _decode(anchors, raw, input_size, sizes, score_threshold, iou_threshold, max_detections):
    height, width = input_size
    boxes = bounding_boxes.decode_deltas_to_boxes(
        anchors, raw[..., :4], anchor_format="xyxy", box_format="yxyx", variance=BOX_VARIANCE
    )
    boxes = tf.clip_by_value(tf.convert_to_tensor(boxes), 0.0, [height, width, height, width])
    scores = tf.sigmoid(raw[..., 4:])
    nmsed = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :],
        scores,
        max_output_size_per_class=max_detections,
        max_total_size=max_detections,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        clip_boxes=False,
    )
    results = []
    for index, (original_height, original_width) in enumerate(sizes):
        count = int(nmsed.valid_detections[index])
        yxyx = nmsed.nmsed_boxes[index, :count].numpy()
        scale = np.array([original_width / width, original_height / height] * 2, "float32")
        xyxy = yxyx[:, [1, 0, 3, 2]] * scale
        results.append(
            (
                xyxy.astype("float32"),
                nmsed.nmsed_scores[index, :count].numpy().astype("float32"),
                nmsed.nmsed_classes[index, :count].numpy().astype("int32"),
            )
        )
    return results


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def mean_average_precision(
    predictions,
    ground_truth,
    iou_threshold: float = 0.5,
    class_names: list[str] | None = None,
) -> dict[str, float]:
    """COCO-style average precision per class at one IoU threshold, and their mean.

    Uses the COCO reference implementation (`pycocotools`): detections are
    matched greedily by score to unmatched true boxes of the same class with
    IoU >= `iou_threshold`; unmatched detections, including duplicates of an
    already matched box, are false positives. Precision is interpolated at
    101 recall points. At 0.5 this is the "AP50" of COCO and close to Pascal
    VOC 2010+ mAP.

    Args:
        predictions: One `(boxes, scores, classes)` per image, as
            `predict_boxes` returns ("xyxy" pixels).
        ground_truth: One entry per image, same order: a
            `tlkit.data.DetectionExample` or a `(boxes, labels)` pair.
        iou_threshold: Minimum IoU for a match. Defaults to 0.5.
        class_names: Names for the per-class keys; None uses `"0"`, `"1"`, ...
            Defaults to None (as many classes as the largest label + 1).

    Returns:
        `{class name: AP, ..., "mAP": mean}`. A class with no true boxes gets
        NaN and is left out of the mean.

    Raises:
        ValueError: If the two lists differ in length.
        ImportError: If `pycocotools` is not installed.

    Example:
        >>> truth = [(np.array([[0, 0, 10, 10]]), np.array([0]))]
        >>> mean_average_precision([(truth[0][0], np.array([0.9]), np.array([0]))], truth)
        {'0': 1.0, 'mAP': 1.0}
    """
    try:
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError(
            "mean_average_precision uses COCO's reference implementation: "
            "pip install pycocotools==2.0.11"
        ) from error
    predictions = list(predictions)
    truth_coco, detections, class_names, annotations = _coco_inputs(
        predictions, ground_truth, class_names
    )
    result = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if detections:
            evaluation = COCOeval(truth_coco, truth_coco.loadRes(detections), "bbox")
            evaluation.params.iouThrs = np.array([iou_threshold])
            evaluation.params.maxDets = [max(100, max(len(p[1]) for p in predictions))]
            evaluation.params.areaRng = [[0, 1e10]]
            evaluation.params.areaRngLbl = ["all"]
            evaluation.evaluate()
            evaluation.accumulate()
            precision = evaluation.eval["precision"][0, :, :, 0, -1]  # (recall, class)
    has_truth = {int(a["category_id"]) for a in annotations}
    for index, name in enumerate(class_names):
        if index not in has_truth:
            result[name] = float("nan")
        elif not detections:
            result[name] = 0.0
        else:
            result[name] = float(np.mean(precision[:, index]))
    scored = [v for v in result.values() if not math.isnan(v)]
    result["mAP"] = float(np.mean(scored)) if scored else float("nan")
    return result


def _coco_inputs(predictions, ground_truth, class_names):
    """COCO ground truth (indexed), detection dicts, class names and annotations."""
    from pycocotools.coco import COCO

    predictions = list(predictions)
    truth = [_boxes_and_labels(item) for item in ground_truth]
    if len(predictions) != len(truth):
        raise ValueError(
            "predictions and ground_truth must have one entry per image, in the same order. "
            f"Received: len(predictions)={len(predictions)}, len(ground_truth)={len(truth)}"
        )
    if class_names is None:
        largest = max([int(labels.max()) for _, labels in truth if len(labels)] + [0])
        class_names = [str(i) for i in range(largest + 1)]
    annotations, detections = [], []
    for image_id, ((boxes, labels), (predicted, scores, classes)) in enumerate(
        zip(truth, predictions, strict=True)
    ):
        for box, label in zip(convert_boxes(boxes, "xyxy", "xywh"), labels, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        predicted = np.asarray(predicted, "float32").reshape(-1, 4)
        for box, score, label in zip(
            convert_boxes(predicted, "xyxy", "xywh"), scores, classes, strict=True
        ):
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    truth_coco = COCO()
    truth_coco.dataset = {
        "images": [{"id": i} for i in range(len(truth))],
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(class_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        truth_coco.createIndex()
    return truth_coco, detections, class_names, annotations


def coco_metrics(
    predictions,
    ground_truth,
    class_names: list[str] | None = None,
    small_side: float = 32.0,
) -> dict[str, float]:
    """mAP@0.5, mAP@[.5:.95] and recall on small boxes, by COCO's `COCOeval`.

    `mAP@0.5` and `mAP@[.5:.95]` are COCO's AP50 and AP (mean over classes,
    101-point interpolation, IoU thresholds 0.5, 0.55, ..., 0.95 for the
    latter), at up to 100 detections per image. `recall_small@0.5` is the
    fraction of true boxes of area below `small_side` squared (COCO's
    "small", in the images' original pixels) that a detection of the right
    class finds with IoU >= 0.5, over all classes' small boxes together.

    Args:
        predictions: One `(boxes, scores, classes)` per image, as
            `predict_boxes` returns.
        ground_truth: One `DetectionExample` or `(boxes, labels)` per image.
        class_names: As in `mean_average_precision`. Defaults to None.
        small_side: Side in pixels below which a box counts as small.
            Defaults to 32.0.

    Returns:
        `{"mAP@0.5", "mAP@[.5:.95]", "recall_small@0.5", "small_boxes"}`
        (recall is NaN when there are no small boxes).

    Raises:
        ValueError: If the two lists differ in length.
    """
    from pycocotools.cocoeval import COCOeval

    predictions = list(predictions)
    truth_coco, detections, class_names, annotations = _coco_inputs(
        predictions, ground_truth, class_names
    )
    small = [a for a in annotations if a["area"] < small_side**2]
    result = {
        "mAP@0.5": 0.0,
        "mAP@[.5:.95]": 0.0,
        "recall_small@0.5": float("nan") if not small else 0.0,
        "small_boxes": float(len(small)),
    }
    if not detections:
        return result
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth_coco, truth_coco.loadRes(detections), "bbox")
        evaluation.params.areaRng = [[0, 1e10], [0, small_side**2]]
        evaluation.params.areaRngLbl = ["all", "small"]
        evaluation.params.maxDets = [100]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, 0]  # (iou, recall, class), "all"
    has_truth = sorted({int(a["category_id"]) for a in annotations})
    per_class = precision[:, :, has_truth]
    result["mAP@0.5"] = float(np.mean(per_class[0]))
    result["mAP@[.5:.95]"] = float(np.mean(per_class))
    if small:
        recall = evaluation.eval["recall"][0, :, 1, 0]  # IoU 0.5, per class, "small"
        counts = np.bincount([a["category_id"] for a in small], minlength=len(class_names))
        found = sum(recall[k] * counts[k] for k in range(len(class_names)) if counts[k])
        result["recall_small@0.5"] = float(found / len(small))
    return result


def _boxes_and_labels(item) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(item, "boxes") and hasattr(item, "labels"):
        boxes, labels = item.boxes, item.labels
    else:
        boxes, labels = item
    return np.asarray(boxes, "float32").reshape(-1, 4), np.asarray(labels, "int64").reshape(-1)


# ---------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------

_COLORS = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf"]


def draw_boxes(
    image,
    boxes,
    labels,
    scores=None,
    class_names: list[str] | None = None,
    ax=None,
    title: str | None = None,
    linestyle: str = "-",
) -> Any:
    """Draws labelled boxes on an image with matplotlib.

    Args:
        image: An RGB array (0..255) or an image file.
        boxes: `(N, 4)` "xyxy" pixels of that image.
        labels: `(N,)` class indices.
        scores: `(N,)` scores to print after the names, or None. Defaults to None.
        class_names: Names for the labels, or None. Defaults to None.
        ax: A matplotlib Axes to draw on, or None for a new figure. Defaults to None.
        title: Axes title, or None. Defaults to None.
        linestyle: Box line style, e.g. `"--"` for true boxes. Defaults to `"-"`.

    Returns:
        The matplotlib Figure.

    Example:
        >>> boxes, scores, classes = predict_boxes(detector, [path], 0.5)[0]
        >>> draw_boxes(path, boxes, classes, scores, class_names=bccd.class_names)
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    boxes = np.asarray(boxes, "float32").reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(
            f"boxes and labels must have the same length. Received: len(boxes)={len(boxes)}, "
            f"len(labels)={len(labels)}"
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    ax.imshow(np.clip(np.asarray(image), 0, 255).astype("uint8"))
    for index, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        color = _COLORS[int(label) % len(_COLORS)]
        ax.add_patch(
            Rectangle(
                (box[0], box[1]),
                box[2] - box[0],
                box[3] - box[1],
                fill=False,
                edgecolor=color,
                linewidth=1.5,
                linestyle=linestyle,
            )
        )
        text = class_names[int(label)] if class_names else str(int(label))
        if scores is not None:
            text += f" {float(scores[index]):.2f}"
        ax.text(
            box[0],
            box[1],
            text,
            color="white",
            fontsize=7,
            va="bottom",
            bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "linewidth": 0},
        )
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax.figure
