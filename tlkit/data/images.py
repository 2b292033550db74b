"""Decoding image files into float32 RGB arrays, and cheap checks at scan time.

Every file tlkit reads goes through `load_image`, so one set of rules applies
everywhere:

- EXIF orientation is honoured (`ImageOps.exif_transpose`), so a phone photo
  taken in portrait comes out in portrait.
- Every PIL mode becomes 8-bit RGB. Grey (`L`, `1`) is repeated on three
  channels; palette (`P`) is expanded; `CMYK`, `YCbCr`, `LAB` and `HSV` are
  converted by PIL. 16-bit images (`I;16*`, and `I`, which is how PIL opens
  16-bit PNG and TIFF files) are scaled from 0..65535 to 0..255, not clipped.
  32-bit float images (`F`) are clipped to 0..255.
- Transparency (`RGBA`, `LA`, `PA`, palette with a transparent colour) is
  composited onto a white background, so transparent pixels do not turn into
  whatever colour happened to be stored under them (often black).
- Resizing stretches to the requested size (no crop, like
  `keras.utils.image_dataset_from_directory` by default) with PIL's bilinear
  filter, which is antialiased when downscaling, and `reducing_gap=3.0`, which
  first shrinks by an integer factor for speed on large images. JPEG files are
  decoded at reduced scale with `draft()` when that still leaves at least the
  requested size.
- Images with more than `MAX_IMAGE_PIXELS` pixels are refused from the header,
  before decoding (decompression-bomb guard); PIL's own `DecompressionBombError`
  is reported the same way. The global `PIL.Image.MAX_IMAGE_PIXELS` is left
  untouched.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageDecodeError",
    "check_image",
    "is_image_file",
    "load_image",
    "load_image_batches",
    "normalize_image_size",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# About 100 megapixels (a 10000 x 10000 image). Larger images are refused.
MAX_IMAGE_PIXELS = 100_000_000

_RESAMPLE = Image.Resampling.BILINEAR
_REDUCING_GAP = 3.0
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height.
_EXIF_ORIENTATION_TAG = 0x0112


class ImageDecodeError(ValueError):
    """An image file could not be read or decoded.

    Attributes:
        path: The file that failed.
        reason: A short description of what went wrong.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"Could not decode image {self.path!r}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    """Returns whether `path` has one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def normalize_image_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Turns an `image_size` argument into `(height, width)`.

    Args:
        image_size: `None`, an int (square), or a `(height, width)` pair.

    Returns:
        `None` or a `(height, width)` tuple of positive ints.

    Raises:
        ValueError: If `image_size` is not one of those forms.
    """
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(
            "`image_size` must be None, a positive int or a (height, width) pair of "
            f"positive ints, e.g. 224 or (224, 224). Received: image_size={image_size!r}"
        )
    if min(size) <= 0:
        raise ValueError(
            f"`image_size` must be positive, e.g. 224. Received: image_size={image_size!r}"
        )
    return size


def load_image(
    path: str | os.PathLike, image_size: int | tuple[int, int] | None = None
) -> np.ndarray:
    """Reads an image file as a float32 RGB array with values in 0..255.

    See the module docstring for how modes, transparency, EXIF orientation and
    resizing are handled.

    Args:
        path: The image file.
        image_size: Output size, an int (square) or `(height, width)`. `None`
            keeps the size of the file (after EXIF rotation). Defaults to `None`.

    Returns:
        A float32 array of shape `(height, width, 3)`, RGB, values in 0..255.

    Raises:
        ImageDecodeError: If the file is missing, not an image, truncated,
            corrupt, or larger than `MAX_IMAGE_PIXELS`.
        ValueError: If `image_size` is malformed.

    Example:

    >>> image = load_image("flower_photos/daisy/5547758_eea9edfd54_n.jpg", 224)
    >>> image.shape, image.dtype
    ((224, 224, 3), dtype('float32'))
    """
    size = normalize_image_size(image_size)
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            _check_pixel_count(path, image)
            if size is not None and image.format == "JPEG":
                _draft(image, size)
            image = ImageOps.exif_transpose(image)
            array = _to_rgb_array(image, size)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(path, f"too many pixels ({error})") from error
    except FileNotFoundError as error:
        raise ImageDecodeError(path, "file not found") from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(path, "not a recognised image format") from error
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as error:
        raise ImageDecodeError(path, f"{type(error).__name__}: {error}") from error
    return array


def load_image_batches(
    paths: Sequence[str | os.PathLike],
    image_size: int | tuple[int, int],
    batch_size: int = 32,
    workers: int | None = None,
    ahead: int | None = None,
    dtype: str = "float32",
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Decodes files with `load_image` in a thread pool, ahead of the consumer, in order.

    Pillow releases the GIL while it decodes and resizes, so the workers run
    beside whatever the consumer does between batches (a LiteRT `invoke` also
    releases it). At most `ahead` batches are decoded or waiting at a time, so
    memory stays flat however many files there are. A hand-written pool rather
    than `tf.data` with `tf.numpy_function`: that path cost ~2.5x the CPU time
    of the decoding itself per image on the 2-core machine of
    `bench/throughput.py`, which on a CPU is time taken from the model.

    Args:
        paths: Image files.
        image_size: Output size, an int or `(height, width)`.
        batch_size: Images per yielded batch. Defaults to 32.
        workers: Decoding threads. Defaults to the CPUs this process may use.
        ahead: Batches decoded ahead. Defaults to `2 * workers`.
        dtype: `"float32"` or `"uint8"`. uint8 is exact (every `load_image`
            pixel is a whole number 0..255, from an 8-bit RGB image) and holds
            the look-ahead in a quarter of the memory. Defaults to `"float32"`.

    Yields:
        `(images, valid, failures)`: `(k, height, width, 3)` arrays of the files
        that decoded, in order; the positions in `paths` of those images
        (int64); and `(position, reason)` of the files that failed.

    Raises:
        ValueError: On a malformed `image_size` or `batch_size`.
    """
    size = normalize_image_size(image_size)
    if size is None:
        raise ValueError("load_image_batches needs an image_size, e.g. 224. Received: None")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer. Received: batch_size={batch_size!r}"
        )
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8'. Received: dtype={dtype!r}")
    paths = [os.fspath(path) for path in paths]
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    ahead = ahead or 2 * workers

    def decode(start: int):
        chunk = paths[start : start + batch_size]
        images = np.empty((len(chunk), *size, 3), dtype)
        kept, failures = [], []
        for offset, path in enumerate(chunk):
            try:
                images[len(kept)] = load_image(path, size)
                kept.append(start + offset)
            except ImageDecodeError as error:
                failures.append((start + offset, error.reason))
        return images[: len(kept)], np.asarray(kept, np.int64), failures

    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(workers, thread_name_prefix="tlkit-decode") as pool:
        pending = deque(pool.submit(decode, start) for start in islice(starts, ahead))
        try:
            while pending:
                result = pending.popleft().result()
                for start in starts:
                    pending.append(pool.submit(decode, start))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()


def check_image(path: str | os.PathLike) -> str | None:
    """Checks cheaply whether a file looks like a readable image.

    Opens the header, checks the pixel count, and runs PIL's `verify()` (which
    checks PNG chunk CRCs, for example) without decoding pixels. A JPEG whose
    last bytes lack the end-of-image marker is suspected to be truncated and is
    decoded fully; since that is rare, the check stays fast.

    Args:
        path: The file to check.

    Returns:
        `None` when the file looks fine, else a short reason.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            _check_pixel_count(path, image)
            image_format = image.format
            image.verify()
        if image_format == "JPEG" and not _has_jpeg_end_marker(path):
            load_image(path)  # Decodes fully; raises if the data really is cut short.
    except ImageDecodeError as error:
        return error.reason
    except Image.DecompressionBombError as error:
        return f"too many pixels ({error})"
    except UnidentifiedImageError:
        return "not a recognised image format"
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as error:
        return f"{type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------------------
# Private helpers.
# ---------------------------------------------------------------------------


def _check_pixel_count(path: str, image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            path,
            f"image is {width}x{height} = {width * height} pixels, more than the "
            f"limit of {MAX_IMAGE_PIXELS} (tlkit.data.images.MAX_IMAGE_PIXELS); "
            "downscale it or raise the limit if you trust the file",
        )
    if width <= 0 or height <= 0:
        raise ImageDecodeError(path, f"image has no pixels ({width}x{height})")


def _has_jpeg_end_marker(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, os.path.getsize(path) - 4096))
        return b"\xff\xd9" in handle.read()


def _draft(image: Image.Image, size: tuple[int, int]) -> None:
    height, width = size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # A broken EXIF block should not stop decoding.
        orientation = 1
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    # draft() picks the smallest JPEG scale (1/1, 1/2, 1/4, 1/8) that is still at
    # least the requested size, so quality after the final resize is unchanged.
    image.draft("RGB", (width, height))


def _to_rgb_array(image: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    image = _to_rgb_image(image)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), _RESAMPLE, reducing_gap=_REDUCING_GAP)
    return np.asarray(image, dtype=np.float32)


def _to_rgb_image(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        image.load()
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
        grey = Image.fromarray(np.round(values).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 255)
        return Image.fromarray(np.round(values).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's converters are correct for these.
    return image.convert("RGB")
