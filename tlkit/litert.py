"""Frozen models on LiteRT: the fast CPU path for feature extraction.

A frozen base computes a fixed function, so it can run on any inference
engine that gives the same numbers. On a CPU, LiteRT (formerly TensorFlow
Lite) with its XNNPACK kernels ran EfficientNet-Lite0 and MobileNetV2 about
1.8 to 2.7x faster than Keras `predict` (loaded to quiet) on the 2-core machine of
`bench/throughput.py`, with features equal to Keras' within 2.2e-6 relative
(checked at 1e-4 on every conversion).

`LiteRTModel` converts a Keras model once (float32, no quantisation), checks
the converted model against Keras on a fixed input, and keeps the result in
the tlkit cache (`$TLKIT_CACHE_DIR/litert/`), keyed by the model's
architecture, weight values and input size, so later runs skip conversion.
With `conversion="subprocess"` the converter runs in a separate Python process
(`convert_in_subprocess`), so the converter's memory (and that of the first eager
Keras call) does not count in the caller's own peak RSS; if that process
fails, the conversion runs in this process with a warning. It is not the
default: while the child converts, parent and child are both resident (the
machine's peak rose from ~1.45 to ~1.9 GB for `train` on cats_and_dogs_filtered,
one loaded run), and a fresh process adds 7 to 12 s to a cold conversion.
A `.tflite` file is a flatbuffer of operators from LiteRT's built-in set: loading one
runs no code from the file.

Example:
    >>> base = tlkit.build_feature_extractor("efficientnet_lite0", 224)
    >>> fast = LiteRTModel(base)
    >>> features = fast(images)  # numpy float32, equal to base.predict(images)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np

from tlkit._cpu import usable_cores
from tlkit._io import atomic_path, cache_dir, write_json
from tlkit._keras_compat import flatten_layers
from tlkit.fingerprint import preprocessing_modes, weights_fingerprint

_FORMAT_VERSION = 1
# Max |LiteRT - Keras| / max |Keras| on the check input. Fused float32 kernels
# differ from TensorFlow's in round-off only (measured ~2e-6 on both offline
# backbones); a wrong conversion is off by orders of magnitude.
TOLERANCE = 1e-4
CONVERSIONS = ("subprocess", "in_process")
# A conversion takes ~10 s on 2 busy cores; far longer means a hung process.
SUBPROCESS_TIMEOUT_S = 900


def available() -> bool:
    """Whether a LiteRT interpreter can be imported (`ai-edge-litert` or `tf.lite`)."""
    try:
        _interpreter_class()
    except ImportError:
        return False
    return True


class LiteRTModel:
    """A frozen Keras model converted to LiteRT, callable on numpy batches.

    Args:
        model: A Keras model with one image input and one output, used for
            inference only (its weights are read once; later changes to the
            Keras model are not seen: build a new `LiteRTModel`).
        image_size: Square input size. Defaults to the model's input size;
            required when the model takes any size.
        cache: True for the default cache folder, a folder path, or False to
            convert in memory every time. Defaults to True.
        num_threads: CPU threads for XNNPACK in each interpreter. Defaults
            to the CPUs this process may use divided by `interpreters`.
        batch_size: Images per `invoke`. XNNPACK parallelises inside each
            image, so small batches lose nothing; 1 was fastest in
            `bench/throughput.py`. Defaults to 1.
        interpreters: Independent interpreters that each take a contiguous
            part of every call, run from a thread pool (`invoke` releases the
            GIL). With one thread each, no thread waits at XNNPACK's barriers
            for another that the OS has given to image decoding, which
            matters on a busy or a 2-core machine; `tlkit.inference` picks
            the faster setting by measuring. Defaults to 1.
        conversion: Where the converter runs when the cache has no
            conversion: `"subprocess"` (a fresh Python process,
            `convert_in_subprocess`, so the converter's memory is not this
            process'; on failure it converts in this process with a warning)
            or `"in_process"`. Both give the same flatbuffer; the
            subprocess lowers this process' own peak, not the machine's.
            Defaults to `"in_process"`.

    Attributes:
        converted_in: `"subprocess"` or `"in_process"`: where this model was
            converted; None when it was read from the cache.

    Raises:
        ImportError: If no LiteRT interpreter is installed.
        ValueError: On a model without a fixed input size and no
            `image_size`, an unknown `conversion`, or if the converted
            model's outputs differ from Keras' (then use the Keras path).
    """

    def __init__(
        self,
        model: keras.Model,
        image_size: int | None = None,
        cache: bool | str | os.PathLike = True,
        num_threads: int | None = None,
        batch_size: int = 1,
        interpreters: int = 1,
        conversion: str = "in_process",
    ):
        shape = model.input_shape
        if isinstance(shape, list) or len(shape) != 4:
            raise ValueError(
                "LiteRTModel takes a model with one image input of shape (batch, height, "
                f"width, channels). Received: input_shape={shape}"
            )
        image_size = image_size or shape[1]
        if not image_size:
            raise ValueError(
                "The model takes any image size; pass image_size=, e.g. LiteRTModel(base, "
                f"image_size=224). Received: input_shape={shape}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive integer. Received: batch_size={batch_size!r}"
            )
        if not isinstance(interpreters, int) or interpreters < 1:
            raise ValueError(
                f"interpreters must be a positive integer. Received: interpreters={interpreters!r}"
            )
        if conversion not in CONVERSIONS:
            raise ValueError(
                f"conversion must be one of {list(CONVERSIONS)}. "
                f"Received: conversion={conversion!r}"
            )
        self.image_size = int(image_size)
        self.channels = int(shape[-1])
        self.batch_size = batch_size
        self.interpreters = interpreters
        self.num_threads = num_threads or max(1, usable_cores() // interpreters)
        self.path: Path | None = None
        self.from_cache = False
        self.converted_in: str | None = None
        self.check: dict = {}
        content = None
        if cache is not False:
            self.path = cached_path(model, self.image_size, cache)
            check_path = self.path.with_suffix(".json")
            if self.path.is_file() and check_path.is_file():
                content = self.path.read_bytes()
                self.check = json.loads(check_path.read_text())
                self.from_cache = True
        if content is None:
            content, expected, self.converted_in = _convert_where(
                model, self.image_size, conversion
            )
            self.check = self._verify(model, content, expected)
            self.check["converted_in"] = self.converted_in
            if self.path is not None:
                with atomic_path(self.path) as temporary:
                    temporary.write_bytes(content)
                write_json(self.path.with_suffix(".json"), self.check)
        self.content = content
        # The interpreter that checked a fresh conversion is kept: each new one packs
        # its own copy of the weights (XNNPACK), ~25 MiB for EfficientNet-Lite0.
        checked = getattr(self, "_workers", [])[:interpreters]
        self._workers = checked + [
            _Worker(content, self.num_threads) for _ in range(interpreters - len(checked))
        ]
        self._interpreter = self._workers[0].interpreter
        self._pool = ThreadPoolExecutor(interpreters) if interpreters > 1 else None

    def with_settings(self, num_threads: int, batch_size: int, interpreters: int) -> LiteRTModel:
        """The same converted model with other thread, batch and interpreter counts.

        Nothing is converted or checked again (the flatbuffer is shared).

        Returns:
            A new `LiteRTModel`.
        """
        other = object.__new__(LiteRTModel)
        other.__dict__.update(self.__dict__)
        other.num_threads, other.batch_size, other.interpreters = (
            num_threads,
            batch_size,
            interpreters,
        )
        other._workers = [_Worker(self.content, num_threads) for _ in range(interpreters)]
        other._interpreter = other._workers[0].interpreter
        other._pool = ThreadPoolExecutor(interpreters) if interpreters > 1 else None
        return other

    def __call__(self, images) -> np.ndarray:
        """Runs the model on a batch of images.

        Args:
            images: Array-like (N, size, size, channels) in the model's input
                range (tlkit bases: raw 0..255 pixels).

        Returns:
            float32 numpy array of the model's outputs, N rows.

        Raises:
            ValueError: On images of another size or channel count.
        """
        images = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"Expected images of shape (N, {', '.join(map(str, expected))}); resize them to "
                f"{self.image_size} px first. Received: shape={images.shape}"
            )
        if len(images) == 0:
            output_shape = self._interpreter.get_output_details()[0]["shape"][1:]
            return np.zeros((0, *output_shape), np.float32)
        if self._pool is None or len(images) < 2:
            return self._workers[0].run(images, self.batch_size)
        parts = np.array_split(images, min(len(self._workers), len(images)))
        batch_size = [self.batch_size] * len(parts)
        return np.concatenate(list(self._pool.map(_Worker.run, self._workers, parts, batch_size)))

    def _load(self, content: bytes):
        worker = _Worker(content, self.num_threads)
        self._workers = [worker]
        self._pool = None
        return worker.interpreter

    def _verify(
        self, model: keras.Model, content: bytes, expected: np.ndarray | None = None
    ) -> dict:
        """Compares the converted model with Keras on `check_input`.

        `expected` is Keras' output on that input when it was computed
        elsewhere (by the conversion subprocess, on the model as saved from
        this one); else Keras runs here.
        """
        self._interpreter = self._load(content)
        probe = check_input(self.image_size, self.channels)
        if expected is None:
            expected = keras.ops.convert_to_numpy(model(probe, training=False))
        received = self(probe)
        scale = float(np.max(np.abs(expected))) or 1.0
        difference = float(np.max(np.abs(received - expected))) / scale
        if not np.isfinite(difference) or difference > TOLERANCE:
            raise ValueError(
                f"The LiteRT conversion of {model.name} does not match Keras (max relative "
                f"difference {difference:.2e} > {TOLERANCE}); use backend='keras' for this "
                "model."
            )
        return {
            "model": model.name,
            "image_size": self.image_size,
            "max_relative_difference": difference,
            "tolerance": TOLERANCE,
        }


class _Worker:
    """One interpreter and the input batch size it is allocated for."""

    def __init__(self, content: bytes, num_threads: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice.
            self.interpreter = _interpreter_class()(model_content=content, num_threads=num_threads)
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.allocated = 0

    def run(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        outputs = [
            self.invoke(images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        ]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def invoke(self, chunk: np.ndarray) -> np.ndarray:
        interpreter = self.interpreter
        if len(chunk) != self.allocated:
            interpreter.resize_tensor_input(self.input_index, [len(chunk), *chunk.shape[1:]])
            interpreter.allocate_tensors()
            self.allocated = len(chunk)
        interpreter.set_tensor(self.input_index, np.ascontiguousarray(chunk))
        interpreter.invoke()
        return interpreter.get_tensor(self.output_index).copy()


def cached_path(
    model: keras.Model, image_size: int, cache: bool | str | os.PathLike = True
) -> Path:
    """Where the conversion of `model` at `image_size` is (or would be) cached.

    Args:
        model: The Keras model.
        image_size: Square input size.
        cache: True for the default folder (`$TLKIT_CACHE_DIR/litert`) or a folder.

    Returns:
        The `.tflite` path; its check record is the same path with `.json`.
    """
    folder = Path(cache) if not isinstance(cache, bool) else cache_dir() / "litert"
    return folder / f"{model.name}-{image_size}px-{_conversion_key(model, image_size)[:24]}.tflite"


def convert(model: keras.Model, image_size: int) -> bytes:
    """Converts a Keras model to a float32 LiteRT flatbuffer with a fixed image size.

    The model is traced once as a `tf.function` and its variables frozen into
    the flatbuffer (`from_concrete_functions`); `from_keras_model` would first
    export a SavedModel to a temporary folder and read it back. The conversion
    time is in `bench/results/throughput_default_path` ("LiteRT conversion s").

    Args:
        model: The Keras model (inference mode is used).
        image_size: Square input size of the converted model.

    Returns:
        The `.tflite` bytes (built-in operators only, dynamic batch).
    """
    import tensorflow as tf

    channels = model.input_shape[-1]
    function = tf.function(lambda images: model(images, training=False), autograph=False)
    signature = tf.TensorSpec([None, image_size, image_size, channels], tf.float32, name="images")
    with _quiet():
        concrete = function.get_concrete_function(signature)
        holder = tf.Module()  # Tracks the tf.Variables under the Keras 3 variables.
        holder.variables_to_freeze = [variable.value for variable in model.variables]
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
        return converter.convert()


def check_input(image_size: int, channels: int = 3) -> np.ndarray:
    """The fixed input on which every conversion is checked against Keras: 2 random images.

    Args:
        image_size: Square image size.
        channels: Channels per pixel. Defaults to 3.

    Returns:
        float32 array (2, image_size, image_size, channels) of values in 0..255.
    """
    shape = (2, int(image_size), int(image_size), int(channels))
    return np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)


def convert_in_subprocess(
    model: keras.Model, image_size: int, timeout: float = SUBPROCESS_TIMEOUT_S
) -> tuple[bytes, np.ndarray]:
    """`convert` run in a fresh Python process, so its memory is freed with that process.

    The model is saved as a `.keras` file in a temporary folder and converted
    by `python -m tlkit._litert_worker` (which loads it with
    `safe_mode=True`); the child also runs the loaded Keras model on
    `check_input`, so this process need not run Keras to check the
    conversion (the first eager Keras call of a base costs ~150 MiB). The
    folder is then removed. The child imports the same `tlkit` as this
    process and sees no GPU (the converter does not need one).

    This lowers the peak of the calling process, not of the machine: while
    the child runs (~15 s on 2 busy cores), both processes hold memory, the
    child up to ~1.2 GB for EfficientNet-Lite0 at 224 px.

    Args:
        model: The Keras model; it must be savable as `.keras` (tlkit models
            are; a model with unregistered custom layers is not loadable).
        image_size: Square input size of the converted model.
        timeout: Seconds before the child is killed. Defaults to
            `SUBPROCESS_TIMEOUT_S`.

    Returns:
        `(content, expected)`: the `.tflite` bytes, the same as
        `convert(model, image_size)` gives, and the Keras model's float32
        outputs on `check_input(image_size, channels)`.

    Raises:
        RuntimeError: If the child fails or times out; the message ends with
            the last lines it wrote to stderr.
    """
    package_root = str(Path(__file__).resolve().parents[1])
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [package_root, *filter(None, [environment.get("PYTHONPATH")])]
    )
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    environment["CUDA_VISIBLE_DEVICES"] = ""  # Leave the accelerator's memory to the caller.
    with tempfile.TemporaryDirectory(prefix="tlkit-litert-") as folder:
        model_path = Path(folder) / "model.keras"
        output_path = Path(folder) / "model.tflite"
        expected_path = Path(folder) / "expected.npy"
        model.save(model_path)
        command = [sys.executable, "-m", "tlkit._litert_worker", str(model_path)]
        command += [str(int(image_size)), str(output_path), str(expected_path)]
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, env=environment, timeout=timeout
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(
                f"Converting {model.name} to LiteRT in a subprocess took over {timeout} s. "
                f"Received: timeout={timeout}"
            ) from error
        if completed.returncode != 0 or not (output_path.is_file() and expected_path.is_file()):
            tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
            raise RuntimeError(
                f"Converting {model.name} to LiteRT in a subprocess failed (exit code "
                f"{completed.returncode}). Received: stderr={tail!r}"
            )
        return output_path.read_bytes(), np.load(expected_path, allow_pickle=False)


def _convert_where(
    model: keras.Model, image_size: int, conversion: str
) -> tuple[bytes, np.ndarray | None, str]:
    """Converted bytes, Keras' check outputs if computed there, and where (`LiteRTModel`)."""
    if conversion == "subprocess":
        try:
            content, expected = convert_in_subprocess(model, image_size)
            return content, expected, "subprocess"
        except Exception as error:  # noqa: BLE001 - any failure there: convert here instead.
            warnings.warn(
                f"LiteRT conversion of {model.name} in a subprocess did not work "
                f"({type(error).__name__}: {error}); converting in this process instead, "
                "which needs ~400 MB more memory here. Pass conversion='in_process' to "
                "skip the attempt.",
                stacklevel=3,
            )
    return convert(model, image_size), None, "in_process"


def _conversion_key(model: keras.Model, image_size: int) -> str:
    """sha256 over what defines the converted model: layers, weights, size, versions."""
    import tensorflow as tf

    layers = [
        (type(layer).__name__, layer.name) for layer in flatten_layers(model, include_self=False)
    ]
    parts = {
        "format": _FORMAT_VERSION,
        "tensorflow": tf.__version__,
        "name": model.name,
        "layers": layers,
        "inputs": str(model.input_shape),
        "outputs": str(model.output_shape),
        "weights": weights_fingerprint(model),
        "preprocessing": preprocessing_modes(model),
        "image_size": int(image_size),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # tf.lite's copy is deprecated but still there in TF 2.21.
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter


@contextlib.contextmanager
def _quiet():
    """Silences the converter: Keras prints the exported signature, absl logs INFO."""
    loggers = [logging.getLogger(name) for name in ("absl", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
