"""Grad-CAM heat maps for tlkit classifiers, whose pretrained base is a nested model.

Grad-CAM (Selvaraju et al., https://arxiv.org/abs/1610.02391) weights the
channels of a late convolutional activation by the gradient of a class score
and keeps the positive part: bright regions are the ones that raised that
class's score.

The usual Keras recipe, `keras.Model(model.inputs, [model.get_layer(name).output,
model.output])`, fails on a tlkit classifier because the convolutional layers
live inside the nested base model, not in the outer graph. Here the base is
split instead: a sub-model of the base returns (activation, pooled features),
and the layers after the base (the head) run on the pooled features inside
the same `GradientTape`. The outer model's `Resizing` is applied first and its
augmentation is skipped, so the heat map explains what the model predicts at
inference.

Example:

```python
heatmaps = grad_cam(model, images)  # (N, 7, 7) at 224 px, values in 0..1
overlay = overlay_heatmap(images[0], heatmaps[0])  # (H, W, 3) uint8
```
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from tlkit.backbones import BACKBONES
from tlkit.backbones.preprocessing import ImagePreprocessing
from tlkit.models import find_base

__all__ = ["grad_cam", "overlay_heatmap"]

# ---------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------


def grad_cam(
    model: keras.Model,
    images: Any,
    class_index: int | Sequence[int] | None = None,
    layer_name: str | None = None,
) -> np.ndarray:
    """Grad-CAM heat maps of a tlkit classifier for a batch of images.

    The class score is taken before the softmax (as in the paper) when the
    last layer of the head is a softmax `Dense`, so a confident prediction
    still has useful gradients.

    Args:
        model: A classifier from `tlkit.build_classifier` (or loaded with
            `tlkit.load_classifier`).
        images: Raw 0..255 RGB images, array-like of shape (N, H, W, 3); they
            are resized by the model's own `Resizing` layer.
        class_index: The class to explain: None for each image's predicted
            class, an int for the same class in every image, or one int per
            image. Defaults to None.
        layer_name: A layer of the base with a 4-D output (batch, height,
            width, channels). Defaults to the base's last convolutional
            activation (`"head_relu"` for the offline backbones).

    Returns:
        float32 array (N, h, w) with values in 0..1, h x w being the chosen
        layer's spatial size (7 x 7 at 224 px for the last activation). Each
        map is divided by its own maximum; a map with no positive evidence is
        all zeros.

    Raises:
        ValueError: If the model has no tlkit base, the images are not
            (N, H, W, 3), `class_index` is out of range, or `layer_name` is
            not a 4-D layer of the base.

    Example:

    >>> heatmaps = grad_cam(model, test_images[:4])
    >>> heatmaps.shape
    (4, 7, 7)
    """
    base = find_base(model)
    images = _as_image_batch(images)
    layer_name = layer_name or default_layer_name(base)
    split_base = _split_model(base, layer_name)
    before, after = _outer_layers(model, base)

    num_classes = int(model.output_shape[-1])
    classes = _class_indices(class_index, len(images), num_classes)

    x = tf.convert_to_tensor(images, dtype=tf.float32)
    for layer in before:
        x = layer(x)
    with tf.GradientTape() as tape:
        activation, pooled = split_base(x)
        tape.watch(activation)
        scores = _class_scores(after, pooled)
        if classes is None:
            classes = np.argmax(keras.ops.convert_to_numpy(scores), axis=-1)
        picked = tf.gather(scores, tf.constant(classes, dtype=tf.int32), axis=1, batch_dims=1)
    gradients = tape.gradient(picked, activation)
    if gradients is None:
        raise ValueError(
            f"The class score does not depend on layer {layer_name!r}; choose a layer "
            f"on the path to the pooled features. Received: layer_name={layer_name!r}"
        )
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(channel_weights * activation, axis=-1)).numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    return np.nan_to_num(cam, nan=0.0).astype(np.float32)


def default_layer_name(base: keras.Model) -> str:
    """The layer Grad-CAM explains by default: the base's last convolutional activation.

    A registered backbone names it in its spec (`BackboneSpec.gradcam_layer`:
    `"head_relu"` for the inverted-residual networks, `"block5_conv3"` for
    VGG16, `"mixed_10"` for Inception-v3; for a keras.applications base, a
    layer inside the nested application). Only a base the registry does not
    know, or one whose spec names no layer, falls back to its last layer with
    a 4-D output.

    Args:
        base: A tlkit backbone (see `tlkit.models.find_base`).

    Returns:
        The layer name.

    Raises:
        ValueError: If the base has no layer with a 4-D output.
    """
    spec = BACKBONES.get(base.name)
    if spec is not None and spec.gradcam_layer and _contains(base, spec.gradcam_layer):
        return spec.gradcam_layer
    return _last_four_dimensional_layer(base)


def _last_four_dimensional_layer(base: keras.Model) -> str:
    for layer in reversed(base.layers):
        if isinstance(layer, keras.Model):
            try:
                return _last_four_dimensional_layer(layer)
            except ValueError:
                continue
        if isinstance(layer, (keras.layers.InputLayer, ImagePreprocessing)):
            continue
        if _rank(layer) == 4:
            return layer.name
    raise ValueError(
        "Found no layer with a 4-D (batch, height, width, channels) output to explain; "
        f"pass layer_name= explicitly. Received: base={base.name!r}"
    )


# ---------------------------------------------------------------------------
# Overlay
# ---------------------------------------------------------------------------


def overlay_heatmap(
    image: Any, heatmap: Any, alpha: float = 0.4, colormap: str = "jet"
) -> np.ndarray:
    """Blends a heat map, resized to the image, over the image.

    Args:
        image: One image, (H, W, 3) RGB, (H, W, 1) or (H, W) grey, values in
            0..255 (uint8 or float).
        heatmap: One heat map (h, w) with values in 0..1, e.g. `grad_cam(...)[0]`.
        alpha: Weight of the coloured heat map, in [0, 1]. Defaults to 0.4.
        colormap: A matplotlib colormap name. Defaults to `"jet"`.

    Returns:
        uint8 array (H, W, 3).

    Raises:
        ValueError: On shapes that are not one image and one 2-D heat map, an
            `alpha` outside [0, 1] or an unknown colormap.

    Example:

    >>> overlay = overlay_heatmap(np.zeros((64, 64, 3)), np.ones((7, 7)))
    >>> overlay.shape, overlay.dtype
    ((64, 64, 3), dtype('uint8'))
    """
    import matplotlib

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., np.newaxis], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            "`image` must be one image of shape (H, W, 3), (H, W, 1) or (H, W); pass "
            f"images[i], not the whole batch. Received: image.shape={np.shape(image)}"
        )
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(
            "`heatmap` must be one 2-D map (h, w), e.g. grad_cam(...)[0]. "
            f"Received: heatmap.shape={heatmap.shape}"
        )
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be between 0 and 1, e.g. 0.4. Received: alpha={alpha}")
    if colormap not in matplotlib.colormaps:
        raise ValueError(
            "`colormap` must be a matplotlib colormap name such as 'jet' or 'viridis'. "
            f"Received: colormap={colormap!r}"
        )
    height, width = image.shape[:2]
    resized = tf.image.resize(heatmap[..., np.newaxis], (height, width), method="bilinear")
    resized = np.clip(np.nan_to_num(resized.numpy()[..., 0]), 0.0, 1.0)
    colours = matplotlib.colormaps[colormap](resized)[..., :3] * 255.0
    blended = (1.0 - alpha) * np.clip(image, 0.0, 255.0) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


def _rank(layer) -> int | None:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return None
    return len(shape)


def _contains(model: keras.Model, layer_name: str) -> bool:
    for layer in model.layers:
        if layer.name == layer_name:
            return True
        if isinstance(layer, keras.Model) and _contains(layer, layer_name):
            return True
    return False


def _split_model(model: keras.Model, layer_name: str):
    """A callable images -> (activation of `layer_name`, model output).

    A layer directly in `model` gives a functional sub-model; a layer inside
    a nested model (keras.applications bases) is reached by running the
    chain of outer layers and splitting the nested model.
    """
    names = [layer.name for layer in model.layers]
    if layer_name in names:
        layer = model.get_layer(layer_name)
        if _rank(layer) != 4 or isinstance(layer, keras.Model):
            raise ValueError(
                f"Grad-CAM needs a layer with a 4-D (batch, height, width, channels) output; "
                f"{layer_name!r} has output shape {getattr(layer.output, 'shape', None)}. Use "
                f"the default or e.g. {default_layer_name(model)!r}. "
                f"Received: layer_name={layer_name!r}"
            )
        return keras.Model(model.inputs, [layer.output, model.output], name=f"{model.name}_split")
    for index, layer in enumerate(model.layers):
        if isinstance(layer, keras.Model) and _contains(layer, layer_name):
            inner = _split_model(layer, layer_name)
            before = [item for item in model.layers[:index] if not _is_input(item)]
            after = list(model.layers[index + 1 :])

            def run(x, before=before, inner=inner, after=after):
                for item in before:
                    x = item(x)
                activation, x = inner(x)
                for item in after:
                    x = item(x)
                return activation, x

            return run
    raise ValueError(
        f"No layer named {layer_name!r} in the base {model.name!r}. Use the default "
        f"({default_layer_name(model)!r}) or a 4-D layer from `base.layers`. "
        f"Received: layer_name={layer_name!r}"
    )


def _is_input(layer) -> bool:
    return isinstance(layer, keras.layers.InputLayer)


def _outer_layers(model: keras.Model, base: keras.Model):
    """The outer layers to run before the base (resizing) and after it (the head).

    Augmentation layers between the resizing and the base are skipped.
    """
    layers = [layer for layer in model.layers if not _is_input(layer)]
    position = layers.index(base)
    before = [layer for layer in layers[:position] if isinstance(layer, keras.layers.Resizing)]
    return before, layers[position + 1 :]


def _class_scores(after, pooled):
    """Runs the layers after the base; the last softmax Dense gives its logits."""
    x = pooled
    for layer_index, layer in enumerate(after):
        last = layer_index == len(after) - 1 or all(
            not layer_.weights for layer_ in after[layer_index + 1 :]
        )
        if isinstance(layer, keras.Model):
            x = _class_scores([item for item in layer.layers if not _is_input(item)], x)
        elif last and isinstance(layer, keras.layers.Dense) and _is_softmax(layer.activation):
            x = keras.ops.matmul(x, layer.kernel)
            if layer.use_bias:
                x = x + layer.bias
        else:
            x = layer(x, training=False) if _takes_training(layer) else layer(x)
    return x


def _is_softmax(activation) -> bool:
    return (
        activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"
    )


def _takes_training(layer) -> bool:
    return isinstance(layer, (keras.layers.Dropout, keras.layers.BatchNormalization))


def _as_image_batch(images) -> np.ndarray:
    if isinstance(images, tf.Tensor):
        images = images.numpy()
    array = np.asarray(images, dtype=np.float32)
    if array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
        hint = " Add a batch axis with images[None]." if array.ndim == 3 else ""
        raise ValueError(
            "`images` must be a non-empty batch of RGB images of shape (N, H, W, 3) with "
            f"values in 0..255.{hint} Received: images.shape={array.shape}"
        )
    return array


def _class_indices(class_index, count: int, num_classes: int) -> np.ndarray | None:
    if class_index is None:
        return None
    classes = np.asarray(class_index)
    if classes.ndim == 0:
        classes = np.full(count, int(classes))
    if classes.shape != (count,) or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(
            f"`class_index` must be None, an int or {count} ints (one per image). "
            f"Received: class_index={class_index!r}"
        )
    if classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(
            f"`class_index` must be in 0..{num_classes - 1} for a {num_classes}-class model. "
            f"Received: class_index={class_index!r}"
        )
    return classes.astype(np.int64)
