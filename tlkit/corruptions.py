"""Image corruptions at graded severities, in the style of ImageNet-C.

Robustness is measured by corrupting the *test* images (never training ones) at
severities 1 to 5 and reporting accuracy per corruption and severity
(Hendrycks and Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019). The corruptions here are the ones a
camera on a car meets: darkness (dusk, tunnels), motion blur (speed),
fog, sensor noise and JPEG artefacts (compressed video streams).

They are written with TensorFlow ops (not the `imagecorruptions` package, which
pins old scikit-image and Wand/ImageMagick for its motion blur) and follow
ImageNet-C's recipes in simplified form; the severities are our own, chosen so
that severity 5 is hard but still legible to a person.

Every function takes and returns float32 RGB images with values in 0..255,
shape `(batch, height, width, 3)`.

Example:

```python
dark = corrupt(images, "darkness", severity=3)
```
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

CORRUPTIONS = ("darkness", "motion_blur", "fog", "gaussian_noise", "jpeg")
SEVERITIES = (1, 2, 3, 4, 5)

# One value per severity 1..5.
_DARKNESS = (0.6, 0.45, 0.32, 0.22, 0.14)  # Brightness scale, then a gamma of 1.3.
_MOTION_BLUR = (0.04, 0.07, 0.10, 0.14, 0.18)  # Blur length as a share of the width.
_FOG = (0.25, 0.4, 0.5, 0.6, 0.7)  # Opacity of the fog layer.
_NOISE = (8.0, 16.0, 24.0, 36.0, 50.0)  # Standard deviation in 0..255 units.
_JPEG = (50, 30, 18, 11, 7)  # JPEG quality.


def corrupt(images, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupts a batch of images.

    Args:
        images: float or uint8 RGB images in 0..255, `(batch, height, width, 3)`.
        kind: One of `CORRUPTIONS`: "darkness", "motion_blur", "fog",
            "gaussian_noise" or "jpeg".
        severity: 1 (mild) to 5 (severe).
        seed: Seed of the random parts (noise, fog pattern). Defaults to 0.

    Returns:
        float32 images of the same shape, clipped to 0..255.

    Raises:
        ValueError: If `kind`, `severity` or the image shape is invalid.

    Example:

    >>> corrupt(np.full((1, 8, 8, 3), 200.0), "darkness", 5).max() < 40
    True
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption. Expected one of {CORRUPTIONS}. Received: {kind=}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"`severity` must be an int from 1 to 5. Received: {severity=}")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            "`images` must be a batch of RGB images (batch, height, width, 3). "
            f"Received: images.shape={images.shape}"
        )
    index = severity - 1
    if kind == "darkness":
        # Scale the light, then a gamma curve: shadows sink faster than highlights.
        out = 255.0 * (images / 255.0 * _DARKNESS[index]) ** 1.3
    elif kind == "motion_blur":
        out = _motion_blur(images, max(2, round(_MOTION_BLUR[index] * images.shape[2])))
    elif kind == "fog":
        out = _fog(images, _FOG[index], seed)
    elif kind == "gaussian_noise":
        noise = np.random.default_rng(seed).normal(0.0, _NOISE[index], images.shape)
        out = images + noise.astype(np.float32)
    else:
        out = _jpeg(images, _JPEG[index])
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def _motion_blur(images: np.ndarray, length: int) -> np.ndarray:
    # A horizontal line kernel: the car moves, the sign smears sideways.
    kernel = np.zeros((1, length, 3, 1), dtype=np.float32)
    kernel[0, :, :, 0] = 1.0 / length
    # Edge padding keeps the borders from darkening (zero padding would).
    left, right = (length - 1) // 2, length // 2
    padded = np.pad(images, ((0, 0), (0, 0), (left, right), (0, 0)), mode="edge")
    return tf.nn.depthwise_conv2d(padded, kernel, strides=(1, 1, 1, 1), padding="VALID").numpy()


def _fog(images: np.ndarray, opacity: float, seed: int) -> np.ndarray:
    # A smooth, uneven grey haze: coarse noise upsampled bilinearly, blended over the image.
    batch, height, width, _ = images.shape
    coarse = np.random.default_rng(seed).uniform(0.7, 1.0, (batch, 4, 4, 1)).astype(np.float32)
    haze = tf.image.resize(coarse, (height, width), method="bilinear").numpy() * 230.0
    alpha = opacity * haze / 230.0
    return (1.0 - alpha) * images + alpha * haze


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    encoded = [
        tf.io.decode_jpeg(tf.io.encode_jpeg(np.round(image).astype(np.uint8), quality=quality))
        for image in images
    ]
    return np.stack([image.numpy() for image in encoded]).astype(np.float32)
