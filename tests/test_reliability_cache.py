"""Reliability: the feature cache is keyed by file content, not by names, sizes and times."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import tlkit
from tlkit.data import from_directory
from tlkit.features import extract_features

SIZE = 32


def _make_folder(root, count=3):
    """Two classes of same-sized BMPs: `red/` is red-ish, `blue/` is blue-ish."""
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[..., channel] = 255
            Image.fromarray(pixels).save(root / name / f"{index}.bmp")
    return root


def _copy_with_swapped_classes(source, target):
    """`cp -p`, then swap the bytes of red/i and blue/i keeping sizes and times."""
    if shutil.which("cp"):
        subprocess.run(["cp", "-rp", str(source), str(target)], check=True)
    else:  # pragma: no cover - every CI image has cp
        shutil.copytree(source, target, copy_function=shutil.copy2)
    for red in sorted((target / "red").iterdir()):
        blue = target / "blue" / red.name
        times = [(path, os.stat(path)) for path in (red, blue)]
        red_bytes, blue_bytes = red.read_bytes(), blue.read_bytes()
        red.write_bytes(blue_bytes)
        blue.write_bytes(red_bytes)
        for path, stat in times:
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return target


def test_a_copy_with_other_pixels_does_not_reuse_cached_features(tmp_path):
    first = from_directory(_make_folder(tmp_path / "A"), validation_split=0.0)
    second = from_directory(
        _copy_with_swapped_classes(tmp_path / "A", tmp_path / "B"), validation_split=0.0
    )
    # The attack: names, sizes, mtimes and labels agree, so the cheap fingerprint does too.
    assert first.train.fingerprint() == second.train.fingerprint()
    assert first.train.content_fingerprint() != second.train.content_fingerprint()

    base = tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE, weights=None)
    cache = tmp_path / "cache"
    cached_first = extract_features(base, first.train, cache=cache, progress=False)
    from_copy = extract_features(base, second.train, cache=cache, progress=False)
    assert not from_copy.from_cache and from_copy.path != cached_first.path
    fresh = extract_features(base, second.train, cache=False, progress=False)
    np.testing.assert_allclose(from_copy.features, fresh.features, rtol=1e-5, atol=1e-5)
    # And the features really differ: a shared cache would have given B the features of A.
    assert not np.allclose(from_copy.features, cached_first.features, rtol=1e-2, atol=0)
    # A second read of the same folder still hits the cache.
    assert extract_features(base, second.train, cache=cache, progress=False).from_cache


def test_content_fingerprint_follows_an_edit_that_keeps_size_and_time(tmp_path):
    dataset = from_directory(_make_folder(tmp_path / "A"), validation_split=0.0)
    before = dataset.train.content_fingerprint()
    assert dataset.train.content_fingerprint() == before  # Stable (and remembered).
    path = tmp_path / "A" / "red" / "0.bmp"
    stat = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    assert dataset.train.content_fingerprint() != before


@pytest.mark.slow
def test_content_fingerprint_of_flower_photos(shared_datasets):
    folder = shared_datasets / "flower_photos"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    dataset = from_directory(folder, validation_split=0.0)
    digest = dataset.train.content_fingerprint()
    assert len(digest) == 64 and digest == dataset.train.content_fingerprint()


# ---------------------------------------------------------------------------
# E: damaged cache files are found, named and built again.
# ---------------------------------------------------------------------------


def test_a_truncated_feature_cache_file_is_named_and_rebuilt(tmp_path):
    dataset = from_directory(_make_folder(tmp_path / "A"), validation_split=0.0)
    base = tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE, weights=None)
    cache = tmp_path / "cache"
    first = extract_features(base, dataset.train, cache=cache, progress=False)
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=f"feature cache file {first.path} is damaged"):
        again = extract_features(base, dataset.train, cache=cache, progress=False)
    assert not again.from_cache
    np.testing.assert_allclose(again.features, first.features, rtol=1e-5, atol=1e-6)
    # Stored again, whole: the next run reads it.
    assert extract_features(base, dataset.train, cache=cache, progress=False).from_cache


@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_a_damaged_converted_weights_file_is_named_and_converted_again(
    tmp_path, monkeypatch, damage
):
    from tlkit._io import sha256_file
    from tlkit.backbones import get_backbone
    from tlkit.backbones.registry import converted_weights_path

    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path / "cache"))
    spec = get_backbone("mobilenet_v2")
    target = converted_weights_path(spec)
    original = target.read_bytes()
    checksum = tmp_path / "cache" / "checksums" / "weights" / f"{target.name}.sha256"
    assert checksum.read_text().strip() == sha256_file(target)
    if damage == "truncated":
        target.write_bytes(original[: len(original) // 3])
    else:
        # Another valid weights file of the same network: loads fine, predicts wrongly.
        other = tlkit.build_backbone("mobilenet_v2", weights=None, include_top=True)
        other.save_weights(str(target))
    with pytest.warns(UserWarning, match=f"cache file {target} is damaged or was replaced"):
        again = converted_weights_path(spec)
    assert again == target
    model = tlkit.build_backbone("mobilenet_v2", include_top=True)  # Loads the rebuilt file.
    reference = tlkit.build_backbone("mobilenet_v2", weights=None, include_top=True)
    reference.load_weights(str(target))
    for mine, theirs in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    # The rebuilt file is the real conversion: ImageNet weights, not the replacement.
    if damage == "replaced":
        kernel = np.asarray(model.get_layer("predictions").kernel)
        assert not np.array_equal(kernel, np.asarray(other.get_layer("predictions").kernel))


def test_resume_refuses_a_copy_with_other_pixels(tmp_path, tlkit_cache_dir):
    """The checkpoint's data check is by content too, not by names, sizes and times."""
    first = from_directory(_make_folder(tmp_path / "A", count=4), validation_split=0.5)
    config = tlkit.TrainConfig(
        backbone="mobilenet_v2", image_size=SIZE, epochs=1, fine_tune_epochs=1, batch_size=4
    )
    out = tmp_path / "run"
    tlkit.train_run(first, config, out=out, progress=False)
    state_path = out / "checkpoints" / "state.json"
    state = json.loads(state_path.read_text())
    state["complete"] = False  # As if the run had been killed after its last checkpoint.
    state_path.write_text(json.dumps(state))

    second = from_directory(
        _copy_with_swapped_classes(tmp_path / "A", tmp_path / "B"), validation_split=0.5
    )
    assert first.train.fingerprint() == second.train.fingerprint()  # The cheap key agrees.
    with pytest.raises(ValueError, match="The data changed"):
        tlkit.train_run(second, config, out=out, resume=True, progress=False)
