"""The fast extraction path: files decoded by a thread pool, LiteRT settings probed per machine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import tlkit
from tlkit import _cpu, inference, litert
from tlkit.data import ImageSplit
from tlkit.data.images import load_image, load_image_batches
from tlkit.features import extract_features

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 64


@pytest.fixture(scope="module")
def base(tlkit_cache_dir):
    return tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE)


def _photos(shared_datasets, count):
    from tlkit import data

    flowers = data.load("tf_flowers", download=False)
    return flowers.train.paths[:count]


def _write_images(folder, count, broken=()):
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"{index}.jpg"
        if index in broken:
            path.write_bytes(b"not a jpeg")
        else:
            pixels = rng.integers(0, 256, (40 + index, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_batches_come_in_order_with_failures_reported(tmp_path):
    paths = _write_images(tmp_path, 7, broken={2, 5})
    batches = list(load_image_batches(paths, SIZE, batch_size=3, workers=2, ahead=1))
    kept = np.concatenate([positions for _, positions, _ in batches])
    np.testing.assert_array_equal(kept, [0, 1, 3, 4, 6])
    assert [position for _, _, failures in batches for position, _ in failures] == [2, 5]
    images = np.concatenate([images for images, _, _ in batches])
    assert images.shape == (5, SIZE, SIZE, 3) and images.dtype == np.float32
    for image, position in zip(images, kept, strict=True):
        np.testing.assert_array_equal(image, load_image(paths[position], SIZE))
    exact = np.concatenate([x for x, _, _ in load_image_batches(paths, SIZE, 3, dtype="uint8")])
    assert exact.dtype == np.uint8
    np.testing.assert_array_equal(exact, images)  # uint8 holds load_image's pixels exactly
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        next(load_image_batches(paths, SIZE, batch_size=0))


def test_broken_files_are_dropped_and_recorded(base, tmp_path):
    paths = _write_images(tmp_path, 5, broken={1})
    split = ImageSplit("train", ["a", "b"], [0, 1, 0, 1, 1], paths=paths)
    features = extract_features(base, split, SIZE, batch_size=2, cache=False, progress=False)
    np.testing.assert_array_equal(features.labels, [0, 0, 1, 1])
    assert len(features.features) == 4
    assert [skipped for skipped in split.report.skipped if paths[1] in str(skipped)]


def test_files_path_equals_tf_data_path_on_real_photos(base, converted, shared_datasets):
    paths = _photos(shared_datasets, 10)
    split = ImageSplit("flowers", ["any"], [0] * len(paths), paths=paths)
    images = np.concatenate([x.numpy() for x, _ in split.to_dataset(SIZE, batch_size=4)])
    expected = base.predict(images, verbose=0)  # the tf.data decoding path, Keras
    for backend in ("keras", "litert"):
        received = extract_features(
            base, split, SIZE, batch_size=4, cache=False, progress=False, backend=backend
        ).features
        np.testing.assert_allclose(
            received, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=backend
        )


@pytest.fixture(scope="module")
def converted(base):
    """The LiteRT conversion, once, in the session's cache (the tests below share it)."""
    return litert.LiteRTModel(base)


def test_more_interpreters_give_the_same_outputs(base, converted):
    images = np.random.default_rng(2).uniform(0, 255, (5, SIZE, SIZE, 3)).astype(np.float32)
    one = converted
    two = one.with_settings(num_threads=1, batch_size=2, interpreters=2)
    assert two.interpreters == 2 and two.path == one.path
    np.testing.assert_allclose(two(images), one(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Received: interpreters=0"):
        litert.LiteRTModel(base, interpreters=0)


def test_probe_picks_a_candidate_stores_it_and_later_runs_reuse_it(
    base, converted, shared_datasets, monkeypatch
):
    monkeypatch.setattr(inference, "PROBE_MIN_IMAGES", 8)
    # batch_size=4 below: (1 warm-up + PROBE_ROUNDS) calls x 3 candidates x 4 images = 48.
    paths = _photos(shared_datasets, 60)
    split = ImageSplit("flowers", ["any"], [0] * len(paths), paths=paths)
    model = converted
    runner = inference.LiteRTRunner(model, base.name, images=len(paths))
    runner.path.unlink(missing_ok=True)
    try:
        _check_probe(base, split, model, runner, len(paths))
    finally:
        runner.path.unlink(missing_ok=True)


def _check_probe(base, split, model, runner, count):
    features = extract_features(base, split, SIZE, batch_size=4, cache=False, progress=False)
    record = json.loads(runner.path.read_text())
    candidates = inference.litert_candidates(_cpu.usable_cores())
    assert record["chosen"] in candidates
    assert [c["images_per_second"] > 0 for c in record["candidates"]] == [True] * len(candidates)
    assert record["cpu"]["cpu_model"] == _cpu.cpu_facts()["cpu_model"]
    reference = extract_features(
        base, split, SIZE, batch_size=4, cache=False, progress=False, backend="keras"
    ).features
    np.testing.assert_allclose(features.features, reference, rtol=1e-4, atol=1e-3)
    again = inference.LiteRTRunner(model, base.name, images=count)
    assert again.settings == record["chosen"] and not again._queue  # no second probe

    runner.path.write_text('{"chosen": {"num_threads": "__import__(\'os\')"}}')
    assert inference.read_settings(runner.path) is None  # malformed: probe again, run nothing


@pytest.mark.parametrize(
    ("speeds", "chosen"),
    [([100.0, 109.0, 50.0], 0), ([100.0, 111.0, 50.0], 1), ([100.0, 50.0, 130.0], 2)],
)
def test_probe_keeps_the_first_candidate_unless_another_is_clearly_faster(speeds, chosen, tmp_path):
    candidates = inference.litert_candidates(2)
    assert candidates[0] == {"num_threads": 1, "batch_size": 1, "interpreters": 2}
    runner = object.__new__(inference.LiteRTRunner)
    runner.path = tmp_path / "settings.json"
    runner._candidates, runner._models = candidates, [f"model {i}" for i in range(3)]
    runner._times = [[speed * 0.9, speed, speed * 1.2] for speed in speeds]  # median: speed
    runner._finish_probe()
    assert runner.settings == candidates[chosen] and runner._model == f"model {chosen}"
    assert inference.read_settings(runner.path) == candidates[chosen]
