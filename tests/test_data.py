"""Tests of tlkit.data: decoding, folder loading, splits and tf.data pipelines (offline)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from tlkit.data import (
    DataReport,
    ImageDecodeError,
    ImageSplit,
    check_image,
    from_directory,
    load_image,
)
from tlkit.data import images as images_module

# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _save(image: Image.Image, path, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def _noise_jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _solid(color, size=(8, 6), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _make_classes(root, counts: dict[str, int]) -> None:
    for class_index, (name, count) in enumerate(counts.items()):
        for index in range(count):
            _save(_solid((class_index * 40, index % 256, 7)), root / name / f"{index:03d}.png")


@pytest.fixture
def messy_folder(tmp_path):
    """A two-class folder with every awkward file the loader must cope with."""
    root = tmp_path / "messy"
    _save(_solid(90, mode="L"), root / "cats" / "grey.png")
    _save(_solid((10, 20, 30, 255), mode="RGBA"), root / "cats" / "rgba.png")
    _save(_solid((1, 2, 3)), root / "cats" / "UPPER.PNG")
    _save(_solid((4, 5, 6)), root / "cats" / "café_ü.png")
    _save(_solid((7, 8, 9)), root / "cats" / "nested" / "deeper" / "inner.png")
    _save(_solid((1, 1, 1)), root / "cats" / ".hidden.png")
    _save(_solid((1, 1, 1)), root / "cats" / ".hidden_folder" / "x.png")
    (root / "cats" / "notes.txt").write_text("not an image, no image extension")
    _save(_solid((200, 0, 0), size=(1, 1)), root / "dogs" / "tiny.png")
    _save(_solid((0, 200, 0)), root / "dogs" / "ok.jpg")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "text.jpg").write_text("this is text, not a JPEG")
    data = _noise_jpeg_bytes()
    (root / "dogs" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return root


# ---------------------------------------------------------------------------
# load_image: modes, EXIF, resizing, errors.
# ---------------------------------------------------------------------------


def test_load_image_grey_becomes_three_equal_channels(tmp_path):
    path = _save(_solid(100, mode="L"), tmp_path / "grey.png")
    image = load_image(path)
    assert image.shape == (6, 8, 3) and image.dtype == np.float32
    np.testing.assert_array_equal(image, np.full((6, 8, 3), 100.0, np.float32))


def test_load_image_rgba_composites_on_white(tmp_path):
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # Opaque red stays red.
    pixels[0, 1] = (0, 0, 0, 0)  # Fully transparent black becomes white.
    pixels[1, 0] = (0, 0, 0, 128)  # Half-transparent black becomes mid grey.
    path = _save(Image.fromarray(pixels, mode="RGBA"), tmp_path / "alpha.png")
    image = load_image(path)
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(image[0, 1], [255, 255, 255])
    assert 120 <= image[1, 0, 0] <= 135


def test_load_image_grey_alpha_and_palette(tmp_path):
    grey_alpha = Image.new("LA", (3, 3), (50, 0))
    path = _save(grey_alpha, tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(path)[1, 1], [255, 255, 255])

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    palette.putpixel((3, 3), 1)
    path = _save(palette, tmp_path / "palette.png")
    image = load_image(path)
    np.testing.assert_array_equal(image[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(image[3, 3], [200, 100, 50])


def test_load_image_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.shape == (16, 16, 3)
    red, green, blue = image[8, 8]
    assert red > 200 and green < 60 and blue < 60, image[8, 8]


def test_load_image_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "sixteen.png")
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    np.testing.assert_array_equal(image[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_load_image_honours_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # Stored landscape: 40 wide, 20 high.
    pixels[:, :20] = (255, 0, 0)  # Left half red.
    pixels[:, 20:] = (0, 0, 255)  # Right half blue.
    exif = Image.Exif()
    exif[0x0112] = 6  # "Rotate 90 CW to display": the left edge ends up on top.
    path = _save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (40, 20, 3)
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 60  # Top is red.
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 60  # Bottom is blue.
    resized = load_image(path, image_size=(20, 10))
    assert resized.shape == (20, 10, 3)
    assert resized[2, 5, 0] > 200 and resized[18, 5, 2] > 200


def test_load_image_resizes_with_draft_and_keeps_range(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_noise_jpeg_bytes(size=(400, 300)))
    image = load_image(path, image_size=50)
    assert image.shape == (50, 50, 3)
    assert 0.0 <= image.min() and image.max() <= 255.0
    # Antialiased downscaling averages noise towards the middle of the range.
    assert image.std() < load_image(path).std()
    assert load_image(path, image_size=(30, 40)).shape == (30, 40, 3)


def test_load_image_one_pixel(tmp_path):
    path = _save(_solid((9, 99, 199), size=(1, 1)), tmp_path / "one.png")
    np.testing.assert_array_equal(load_image(path), [[[9, 99, 199]]])
    assert load_image(path, 4).shape == (4, 4, 3)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "not a recognised image format"),
        (b"plain text pretending to be a JPEG", "not a recognised image format"),
    ],
)
def test_load_image_rejects_non_images(tmp_path, content, expected):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=expected) as caught:
        load_image(path)
    assert caught.value.path == str(path)
    assert isinstance(caught.value, ValueError)


def test_load_image_rejects_truncated_jpeg_and_missing_file(tmp_path):
    data = _noise_jpeg_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    path = _save(_solid((1, 2, 3), size=(20, 20)), tmp_path / "bomb.png")
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="more than the limit of 100"):
        load_image(path)
    assert "more than the limit" in check_image(path)


def test_real_20000_by_20000_image_is_refused_before_decoding(tmp_path):
    # 400 megapixels: a 1-bit PNG of it is small on disk but would take 1.2 GB as RGB.
    bomb = tmp_path / "photos" / "big"
    bomb.mkdir(parents=True)
    Image.new("1", (20000, 20000)).save(bomb / "huge.png")
    for index in range(2):
        _save(_solid((9, 9, 9 * index)), bomb / f"fine{index}.png")
        (tmp_path / "photos" / "other").mkdir(exist_ok=True)
        _save(_solid((200, 9, 9 * index)), tmp_path / "photos" / "other" / f"o{index}.png")
    with pytest.raises(ImageDecodeError, match="limit"):
        load_image(bomb / "huge.png")
    dataset = from_directory(tmp_path / "photos", validation_split=0.0)
    assert [path for path, _ in dataset.report.skipped] == [str(bomb / "huge.png")]
    assert len(dataset.train) == 4


def test_check_image_reasons(tmp_path):
    good = _save(_solid((1, 2, 3)), tmp_path / "good.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    data = _noise_jpeg_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    assert check_image(good) is None
    assert check_image(empty) == "empty file (0 bytes)"
    assert "truncated" in check_image(truncated)


def test_image_size_validation(tmp_path):
    path = _save(_solid((1, 2, 3)), tmp_path / "x.png")
    for bad in (0, -3, (2,), "224", (2.5, 3)):
        with pytest.raises(ValueError, match="Received: image_size="):
            load_image(path, bad)


# ---------------------------------------------------------------------------
# from_directory.
# ---------------------------------------------------------------------------


def test_from_directory_messy_folder(messy_folder):
    dataset = from_directory(messy_folder, validation_split=0.0)
    assert dataset.class_names == ["cats", "dogs"]
    assert dataset.validation is None and dataset.test is None
    names = sorted(os.path.basename(path) for path in dataset.train.paths)
    assert names == sorted(
        ["grey.png", "rgba.png", "UPPER.PNG", "café_ü.png", "inner.png", "tiny.png", "ok.jpg"]
    )
    skipped = {os.path.basename(path): reason for path, reason in dataset.report.skipped}
    assert set(skipped) == {"empty.jpg", "text.jpg", "truncated.jpg"}
    assert "0 bytes" in skipped["empty.jpg"]
    assert "truncated" in skipped["truncated.jpg"]
    assert dataset.report.class_counts["train"] == {"cats": 5, "dogs": 2}
    text = str(dataset.report)
    assert "truncated.jpg" in text and "skipped: 3" in text


def test_from_directory_pipeline_over_messy_folder(messy_folder):
    dataset = from_directory(messy_folder, image_size=12, validation_split=0.0)
    batches = list(dataset.train.to_dataset(batch_size=3))
    images = np.concatenate([batch[0].numpy() for batch in batches])
    labels = np.concatenate([batch[1].numpy() for batch in batches])
    assert images.shape == (7, 12, 12, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, dataset.train.labels)
    assert labels.dtype == np.int32
    unsized = from_directory(messy_folder, validation_split=0.0).train
    unbatched = next(iter(unsized.to_dataset(batch_size=None)))
    assert unbatched[0].shape == (6, 8, 3)  # Original size of the first cat image.


def test_file_failing_at_run_time_is_dropped_and_recorded(tmp_path):
    root = tmp_path / "set"
    _make_classes(root, {"a": 3, "b": 3})
    dataset = from_directory(root, validation_split=0.0)
    victim = dataset.train.paths[1]
    with open(victim, "wb") as handle:  # Corrupted after the scan.
        handle.write(b"garbage")
    labels = [
        label
        for _, batch_labels in dataset.train.to_dataset(image_size=8, batch_size=2)
        for label in batch_labels.numpy()
    ]
    assert labels == [0, 0, 1, 1, 1]
    assert [path for path, _ in dataset.report.skipped] == [victim]
    assert "run time" in dataset.report.skipped[0][1]
    # A second epoch adds no duplicate entry.
    list(dataset.train.to_dataset(image_size=8, batch_size=2))
    assert len(dataset.report.skipped) == 1
    with pytest.raises(Exception, match="Could not decode image"):
        list(dataset.train.to_dataset(image_size=8, batch_size=2, drop_invalid=False))


def test_missing_and_non_folder_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*Received: path="):
        from_directory(tmp_path / "nowhere")
    file_path = tmp_path / "file.png"
    _save(_solid((1, 2, 3)), file_path)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        from_directory(file_path)


def test_no_class_folders_hints_at_loose_images(tmp_path):
    _save(_solid((1, 2, 3)), tmp_path / "loose.png")
    with pytest.raises(ValueError, match="No class folders") as caught:
        from_directory(tmp_path)
    assert "move them into one sub-folder per class" in str(caught.value)


def test_empty_class_is_named(tmp_path):
    _make_classes(tmp_path, {"apples": 2, "pears": 2})
    (tmp_path / "plums").mkdir()
    (tmp_path / "plums" / "fake.jpg").write_text("text")
    with pytest.raises(ValueError, match="no readable images") as caught:
        from_directory(tmp_path)
    assert "'plums' (1 unreadable)" in str(caught.value)
    assert "apples" not in str(caught.value).split("Received")[0].split(":", 1)[1]


def test_single_class_and_no_images(tmp_path):
    _make_classes(tmp_path / "one", {"only": 3})
    with pytest.raises(ValueError, match="at least two classes") as caught:
        from_directory(tmp_path / "one")
    assert "class_names=['only']" in str(caught.value)
    for name in ("a", "b"):
        (tmp_path / "none" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="No readable images"):
        from_directory(tmp_path / "none")


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"validation_split": 1.0}, "validation_split"),
        ({"test_split": -0.1}, "test_split"),
        ({"validation_split": 0.5, "test_split": 0.5}, "below 1"),
    ],
)
def test_bad_split_fractions(tmp_path, arguments, match):
    _make_classes(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match=match):
        from_directory(tmp_path, **arguments)


def test_stratified_split_is_seeded_and_deterministic(tmp_path):
    _make_classes(tmp_path, {"a": 20, "b": 10, "c": 30})
    first = from_directory(tmp_path, validation_split=0.2, test_split=0.1, seed=3)
    again = from_directory(tmp_path, validation_split=0.2, test_split=0.1, seed=3)
    other = from_directory(tmp_path, validation_split=0.2, test_split=0.1, seed=4)
    assert first.validation.class_counts() == {"a": 4, "b": 2, "c": 6}
    assert first.test.class_counts() == {"a": 2, "b": 1, "c": 3}
    assert first.train.class_counts() == {"a": 14, "b": 7, "c": 21}
    for split in ("train", "validation", "test"):
        assert getattr(first, split).paths == getattr(again, split).paths
    assert first.validation.paths != other.validation.paths
    everything = first.train.paths + first.validation.paths + first.test.paths
    assert len(set(everything)) == 60  # Disjoint and complete.


def test_split_folders_are_used_as_they_are(tmp_path):
    _make_classes(tmp_path / "train", {"cats": 4, "dogs": 3})
    _make_classes(tmp_path / "val", {"cats": 2, "dogs": 1})
    dataset = from_directory(tmp_path, validation_split=0.5)
    assert dataset.class_names == ["cats", "dogs"]
    assert (len(dataset.train), len(dataset.validation), dataset.test) == (7, 3, None)
    assert all("/val/" in path for path in dataset.validation.paths)
    _make_classes(tmp_path / "test", {"birds": 1})
    with pytest.raises(ValueError, match="birds"):
        from_directory(tmp_path)


# ---------------------------------------------------------------------------
# ImageSplit: fingerprint, subset, in-memory pipelines.
# ---------------------------------------------------------------------------


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    _make_classes(tmp_path, {"a": 3, "b": 3})
    split = from_directory(tmp_path, validation_split=0.0).train
    before = split.fingerprint()
    assert len(before) == 64 and before == split.fingerprint()
    assert from_directory(tmp_path, validation_split=0.0).train.fingerprint() == before
    path = split.paths[0]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = split.fingerprint()
    assert touched != before
    _save(_solid((255, 255, 255), size=(9, 9)), tmp_path / "a" / "000.png")
    assert split.fingerprint() not in (before, touched)


def test_fingerprint_of_arrays_and_labels():
    images = np.zeros((4, 5, 5), np.uint8)
    split = ImageSplit("train", ["x", "y"], [0, 1, 0, 1], images=images)
    changed = images.copy()
    changed[2, 1, 1] = 1
    assert (
        split.fingerprint()
        != ImageSplit("train", ["x", "y"], [0, 1, 0, 1], images=changed).fingerprint()
    )
    assert (
        split.fingerprint()
        != ImageSplit("train", ["x", "y"], [0, 1, 1, 1], images=images).fingerprint()
    )
    assert (
        split.fingerprint()
        == ImageSplit("t", ["x", "y"], [0, 1, 0, 1], images=images.copy()).fingerprint()
    )


def test_subset_and_split(tmp_path):
    _make_classes(tmp_path, {"a": 5, "b": 5})
    split = from_directory(tmp_path, validation_split=0.0).train
    part = split.subset([9, 0, 4])
    assert part.paths == [split.paths[9], split.paths[0], split.paths[4]]
    np.testing.assert_array_equal(part.labels, [1, 0, 0])
    assert part.report.class_counts["train"] == {"a": 2, "b": 1}
    assert len(split.subset(split.labels == 1)) == 5
    with pytest.raises(ValueError, match="Received: indices"):
        split.subset([10])
    rest, held_out = split.split(0.2, seed=1)
    assert (len(rest), len(held_out)) == (8, 2)
    assert held_out.class_counts() == {"a": 1, "b": 1}
    assert not set(rest.paths) & set(held_out.paths)


def test_in_memory_grey_split_pipeline():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
    labels = np.arange(10) % 2
    split = ImageSplit("train", ["even", "odd"], labels, images=images)
    batch_images, batch_labels = next(iter(split.to_dataset(image_size=None, batch_size=4)))
    assert batch_images.shape == (4, 6, 6, 3) and batch_images.dtype.name == "float32"
    np.testing.assert_array_equal(batch_images.numpy()[..., 1], images[:4].astype(np.float32))
    np.testing.assert_array_equal(batch_labels.numpy(), [0, 1, 0, 1])
    resized = next(iter(split.to_dataset(image_size=12, batch_size=None)))[0]
    assert resized.shape == (12, 12, 3)
    assert 0.0 <= float(resized.numpy().min()) and float(resized.numpy().max()) <= 255.0


def test_shuffle_is_seeded_and_repeat_works():
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1)
    split = ImageSplit("train", ["a", "b"], np.zeros(20, np.int32), images=images)

    def order(dataset):
        return [int(x[0, 0, 0]) for x, _ in dataset]

    plain = order(split.to_dataset(batch_size=None))
    assert plain == list(range(20))
    first = order(split.to_dataset(batch_size=None, shuffle=True, seed=5))
    assert sorted(first) == plain and first != plain
    assert first == order(split.to_dataset(batch_size=None, shuffle=True, seed=5))
    repeated = split.to_dataset(batch_size=8, repeat=True).take(6)
    assert sum(int(x.shape[0]) for x, _ in repeated) == 48


def test_split_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        ImageSplit("train", ["a"], [0])
    with pytest.raises(ValueError, match="uint8"):
        ImageSplit("train", ["a"], [0], images=np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="labels in 0..2"):
        ImageSplit("train", ["a", "b"], [0, 2], images=np.zeros((2, 2, 2), np.uint8))
    _make_classes(tmp_path, {"a": 1, "b": 1})
    files = from_directory(tmp_path, validation_split=0.0).train
    with pytest.raises(ValueError, match="batching needs `image_size`"):
        files.to_dataset()
    with pytest.raises(ValueError, match="batch_size"):
        files.to_dataset(image_size=8, batch_size=0)


def test_report_summary_is_short():
    report = DataReport(class_counts={"train": {"a": 1}})
    for index in range(40):
        report.add_skipped(f"/x/{index}.jpg", "broken")
    report.add_skipped("/x/0.jpg", "broken again")  # Duplicates are ignored.
    text = str(report)
    assert len(text.splitlines()) <= 20
    assert "skipped: 40 file(s)" in text and "/x/0.jpg: broken" in text and "30 more" in text
    assert report.to_dict()["skipped"][0] == ["/x/0.jpg", "broken"]
