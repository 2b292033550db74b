"""The input normalisation each backbone was trained with, as a Keras layer.

Every tlkit backbone takes raw RGB values in 0..255 and normalises them inside
the model, so a user can never feed the wrong range (see STYLE.md). The layer is
registered with Keras, so saved models reload in safe mode without code.
"""

from __future__ import annotations

import keras
from keras import ops

# Per-channel mean and standard deviation in 0..255 units, by mode.
_MODES = {
    # torchvision / timm ImageNet statistics.
    "torch": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    # Inception-style scaling to [-1, 1] (keras.applications "tf" mode).
    "tf": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    # TensorFlow EfficientNet-Lite checkpoints: (x - 127) / 128.
    "lite": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    # TensorFlow's 2015 Inception-v3 graph used for FID: (x - 128) / 128.
    "fid": ((128.0, 128.0, 128.0), (128.0, 128.0, 128.0)),
    # Caffe-style: BGR order, ImageNet mean subtracted, no scaling.
    "caffe": ((103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    # The model normalises by itself (keras.applications EfficientNet, ConvNeXt).
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

PREPROCESSING_MODES = tuple(_MODES)


@keras.saving.register_keras_serializable(package="tlkit")
class ImagePreprocessing(keras.layers.Layer):
    """Normalises raw 0..255 RGB images the way a backbone expects.

    Args:
        mode: One of `PREPROCESSING_MODES`: `"torch"` (ImageNet mean/std),
            `"tf"` (to [-1, 1]), `"lite"` ((x - 127) / 128), `"fid"`
            ((x - 128) / 128), `"caffe"` (BGR,
            mean subtracted) or `"none"`. Defaults to `"torch"`.

    Example:
        >>> layer = ImagePreprocessing("tf")
        >>> layer(np.full((1, 2, 2, 3), 255.0)).numpy().max()
        1.0
    """

    def __init__(self, mode: str = "torch", **kwargs):
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(
                f"Unknown preprocessing mode. Expected one of {PREPROCESSING_MODES}. "
                f"Received: mode={mode!r}"
            )
        self.mode = mode
        mean, std = _MODES[mode]
        self._mean = mean
        self._scale = tuple(1.0 / s for s in std)

    def call(self, inputs):
        inputs = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            inputs = ops.flip(inputs, axis=-1)  # RGB -> BGR
        if self.mode == "none":
            return inputs
        mean = ops.convert_to_tensor(self._mean, dtype=self.compute_dtype)
        scale = ops.convert_to_tensor(self._scale, dtype=self.compute_dtype)
        return (inputs - mean) * scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
