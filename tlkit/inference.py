"""What runs a frozen model: the Keras, XLA and LiteRT backends and their forward functions.

`extract_features` (`tlkit.features`) asks `forward_function` for a callable
that maps a batch of images to outputs; `"auto"` picks LiteRT on a CPU when it
pays off. `inference_function` keeps one compiled `tf.function` per model.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
import warnings
import weakref
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlkit import litert
from tlkit._cpu import cpu_facts
from tlkit._io import cache_dir, write_json

_FORWARD_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
BACKENDS = ("auto", "keras", "xla", "litert")
# Converting a base to LiteRT took 2.9 to 4.3 s on 2 quiet cores (`litert.convert`;
# bench/results/throughput_default_path), the time Keras needs for ~400 images at
# 224 px; LiteRT saves ~60 % per image, so "auto" converts from 1000 on.
LITERT_MIN_IMAGES = 1000
# The start-up probe of LiteRT settings times each candidate on this many calls
# (after one untimed warm-up call each), interleaved; it needs this many images.
PROBE_ROUNDS = 3
PROBE_CHUNK = 16  # images per probe call: (1 + PROBE_ROUNDS) x 3 candidates = 192 images
PROBE_MIN_IMAGES = 600
# Another candidate replaces the first (one single-thread interpreter per core) only
# if its median is this much faster: a 16-image call is ~60 ms, so one rescheduled
# thread moves a median by several percent. In the quiet interleaved run of
# bench/throughput.py the first was the fastest for both offline backbones (287 vs
# 242 images/s for EfficientNet-Lite0, 425 vs 333 for MobileNetV2), yet a 2-round
# probe without this margin chose all cores in one interpreter for Lite0.
PROBE_MARGIN = 1.1
_SETTINGS_FORMAT = 2


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
                return _litert_forward(base, image_size, images)
            except Exception as error:  # noqa: BLE001 - any converter failure means: use Keras.
                warnings.warn(
                    f"LiteRT could not run {base.name} ({type(error).__name__}: {error}); "
                    "using Keras. Pass backend='keras' to skip the attempt.",
                    stacklevel=2,
                )
                backend = "keras"
    if backend == "litert":
        return _litert_forward(base, image_size, images)
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


def _litert_forward(base: keras.Model, image_size: int, images: int | None = None):
    return LiteRTRunner(litert.LiteRTModel(base, image_size), base.name, images)


def litert_candidates(cores: int) -> list[dict]:
    """The LiteRT settings the start-up probe tries on a machine with `cores` CPUs.

    First (the setting of runs too short to probe, and the one another must
    beat by `PROBE_MARGIN`): one single-threaded interpreter per core, at
    batch 1, so no thread waits at XNNPACK's barriers while image decoding
    takes a core. Then one interpreter on all cores at batch 1 and at batch 8.
    """
    candidates = []
    if cores > 1:
        candidates.append({"num_threads": 1, "batch_size": 1, "interpreters": cores})
    candidates.append({"num_threads": cores, "batch_size": 1, "interpreters": 1})
    candidates.append({"num_threads": cores, "batch_size": 8, "interpreters": 1})
    return candidates


def settings_path(model_name: str, image_size: int) -> Path:
    """Where the probed LiteRT settings of a model on this machine are kept (JSON).

    The key covers the CPU model, its vector flags, the usable cores, the model
    name, the image size and the LiteRT version, so another machine (or the same
    one with fewer cores allowed) probes again.
    """
    parts = {
        "format": _SETTINGS_FORMAT,
        "cpu": {k: v for k, v in cpu_facts().items() if k != "max_mhz"},
        "model": model_name,
        "image_size": int(image_size),
        "litert": _litert_version(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "litert" / f"settings-{model_name}-{image_size}px-{key}.json"


def read_settings(path: Path) -> dict | None:
    """The settings stored at `path` (plain JSON, never code), or None if absent or malformed."""
    try:
        record = json.loads(path.read_text())
        chosen = record["chosen"]
        if not all(isinstance(chosen[k], int) and chosen[k] >= 1 for k in _SETTING_KEYS):
            return None
        return {k: chosen[k] for k in _SETTING_KEYS}
    except (OSError, ValueError, KeyError, TypeError):
        return None


_SETTING_KEYS = ("num_threads", "batch_size", "interpreters")


class LiteRTRunner:
    """A `LiteRTModel` with thread, batch and interpreter counts chosen for this machine.

    The first images of a long extraction (at least `PROBE_MIN_IMAGES`) are
    run in chunks of `PROBE_CHUNK` by the candidates of `litert_candidates` in
    turn, A B C A B C... (one untimed warm-up chunk each first), on the real
    batches (so image decoding competes for the CPU as it will later, and
    no image is computed twice); the fastest median images/s wins if it beats
    the first candidate's by `PROBE_MARGIN` (else the first stays), and is
    stored as JSON at `settings_path`, written atomically. Later runs on this
    machine read it and skip the probe; shorter runs without a stored choice
    use the first candidate. Every setting computes the same function (float32
    round-off aside), so the choice never changes what the features mean.

    Args:
        model: The converted model.
        model_name: Name for the settings file (the base's name).
        images: How many images this extraction will run, or None if unknown.
    """

    def __init__(self, model: litert.LiteRTModel, model_name: str, images: int | None = None):
        self.model = model
        self.path = settings_path(model_name, model.image_size)
        stored = read_settings(self.path)
        self.probe: dict | None = None
        self._queue: list = []
        if stored is not None:
            self.settings = stored
        else:
            candidates = litert_candidates(cpu_facts()["usable_cores"])
            self.settings = candidates[0]
            if images is not None and images >= PROBE_MIN_IMAGES:
                models = [self._with(c) for c in candidates]
                # Warm-up call of each, then PROBE_ROUNDS timed rounds, interleaved.
                self._queue = [(i, False) for i in range(len(candidates))] + [
                    (i, True) for _ in range(PROBE_ROUNDS) for i in range(len(candidates))
                ]
                self._candidates, self._models = candidates, models
                self._times: list[list[float]] = [[] for _ in candidates]
        self._model = self._with(self.settings) if not self._queue else None

    def _with(self, settings: dict) -> litert.LiteRTModel:
        model = self.model
        if all(getattr(model, key) == settings[key] for key in _SETTING_KEYS):
            return model
        return model.with_settings(**settings)

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(keras.ops.convert_to_numpy(images), dtype=np.float32)
        if not self._queue:
            return self._model(images)
        # Probing: chunks of PROBE_CHUNK images, each run by the next candidate in turn.
        outputs = []
        for start in range(0, len(images), PROBE_CHUNK):
            chunk = images[start : start + PROBE_CHUNK]
            if not self._queue:
                outputs.append(self._model(images[start:]))
                break
            index, timed = self._queue.pop(0)
            clock = time.perf_counter()
            outputs.append(self._models[index](chunk))
            if timed:
                self._times[index].append(len(chunk) / (time.perf_counter() - clock))
            if not self._queue:
                self._finish_probe()
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _finish_probe(self) -> None:
        speeds = [statistics.median(times) if times else 0.0 for times in self._times]
        best = int(np.argmax(speeds))
        if speeds[best] < PROBE_MARGIN * speeds[0]:
            best = 0
        self.settings = self._candidates[best]
        self._model = self._models[best]
        self.probe = {
            "chosen": self.settings,
            "candidates": [
                {**c, "images_per_second": round(s, 1)}
                for c, s in zip(self._candidates, speeds, strict=True)
            ],
            "cpu": cpu_facts(),
            "probed_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        self._models = self._candidates = None
        try:
            write_json(self.path, self.probe)
        except OSError as error:  # A read-only cache only means: probe again next time.
            warnings.warn(f"Could not store LiteRT settings at {self.path}: {error}", stacklevel=3)


def _litert_version() -> str:
    try:
        from importlib.metadata import version

        return version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - tf.lite's interpreter: the TensorFlow version decides.
        return f"tf-{tf.__version__}"


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
