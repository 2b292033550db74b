"""What runs a frozen model: the Keras, XLA and LiteRT backends and their forward functions.

`extract_features` (`tlkit.features`) asks `forward_function` for a callable
that maps a batch of images to outputs; `"auto"` picks LiteRT on a CPU when it
pays off. `inference_function` keeps one compiled `tf.function` per model.
"""

from __future__ import annotations

import warnings
import weakref

import keras
import tensorflow as tf

from tlkit import litert

_FORWARD_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
BACKENDS = ("auto", "keras", "xla", "litert")
# Converting a base to LiteRT takes ~6 s on 2 cores, the time Keras needs for ~300
# images at 224 px; LiteRT saves ~60 % per image, so "auto" converts from 1000 on.
LITERT_MIN_IMAGES = 1000


def forward_function(
    base: keras.Model, image_size: int, backend: str = "auto", images: int | None = None
):
    """The inference function `extract_features` uses: images in, numpy-convertible out.

    Args:
        base: The frozen model.
        image_size: Square size of the images it will get.
        backend: One of `BACKENDS` (see `extract_features`).
        images: How many images it will get, for `"auto"`'s choice; None
            means many. Defaults to None.

    Returns:
        A callable taking a batch of images (tensor or array).

    Raises:
        ValueError: On an unknown backend, or backend `"litert"` with a model
            whose conversion does not match Keras.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}. Received: backend={backend!r}")
    if backend == "auto":
        backend = _automatic_backend(base, image_size, images)
        if backend == "litert":
            try:
                return _litert_forward(base, image_size)
            except Exception as error:  # noqa: BLE001 - any converter failure means: use Keras.
                warnings.warn(
                    f"LiteRT could not run {base.name} ({type(error).__name__}: {error}); "
                    "using Keras. Pass backend='keras' to skip the attempt.",
                    stacklevel=2,
                )
                backend = "keras"
    if backend == "litert":
        return _litert_forward(base, image_size)
    function = inference_function(base, jit_compile=backend == "xla")
    return lambda images: function(images).numpy()


def _automatic_backend(base: keras.Model, image_size: int, images: int | None) -> str:
    if (
        tf.distribute.has_strategy()
        or tf.config.list_logical_devices("GPU")
        or not litert.available()
    ):
        return "keras"
    if images is None or images >= LITERT_MIN_IMAGES:
        return "litert"
    return "litert" if litert.cached_path(base, image_size).is_file() else "keras"


def _litert_forward(base: keras.Model, image_size: int):
    model = litert.LiteRTModel(base, image_size)
    return lambda images: model(keras.ops.convert_to_numpy(images))


def inference_function(base: keras.Model, jit_compile: bool):
    """One compiled inference function per base and XLA setting, reused across calls.

    Building a new `tf.function` on every `extract_features` call retraces the
    model each time (and TensorFlow warns about it).
    """
    functions = _FORWARD_FUNCTIONS.setdefault(base, {})
    if jit_compile not in functions:
        functions[jit_compile] = tf.function(
            lambda images: base(images, training=False),
            reduce_retracing=True,
            autograph=False,  # Plain model call; AutoGraph only adds warnings here.
            jit_compile=jit_compile,
        )
    return functions[jit_compile]
