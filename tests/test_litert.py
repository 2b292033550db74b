"""LiteRT: a frozen base converted once, checked against Keras, cached.

Also as the fast path of extract_features.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tlkit
from tlkit import inference, litert
from tlkit.data import ImageSplit
from tlkit.features import extract_features
from tlkit.inference import forward_function

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 64


@pytest.fixture(scope="module")
def base(tlkit_cache_dir):
    return tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.float32)


def test_converted_model_matches_keras_and_is_cached(base, images, tmp_path):
    first = litert.LiteRTModel(base, cache=tmp_path, batch_size=2)  # 2 + 2 + 1: a short last batch
    assert not first.from_cache and first.path.is_file() and first.path.parent == tmp_path
    assert first.check["max_relative_difference"] <= litert.TOLERANCE
    expected = base.predict(images, verbose=0)
    received = first(images)
    assert received.shape == expected.shape and received.dtype == np.float32
    np.testing.assert_allclose(received, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    second = litert.LiteRTModel(base, cache=tmp_path)
    assert second.from_cache and second.path == first.path
    np.testing.assert_array_equal(second(images), received)
    assert second(images[:0]).shape == (0, expected.shape[1])


def test_changed_weights_are_converted_again(images, tmp_path):
    random_base = tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE, weights=None)
    before = litert.LiteRTModel(random_base, cache=tmp_path)
    kernel = random_base.get_layer("head_conv").kernel
    kernel.assign(kernel.numpy() * 2.0)
    after = litert.LiteRTModel(random_base, cache=tmp_path)
    assert not after.from_cache and after.path != before.path
    np.testing.assert_allclose(
        after(images), random_base.predict(images, verbose=0), rtol=1e-4, atol=1e-3
    )


def test_a_wrong_conversion_is_refused(base, monkeypatch):
    other = tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE, weights=None)
    wrong = litert.convert(other, SIZE)  # The same architecture with other weights.
    monkeypatch.setattr(litert, "convert", lambda model, image_size: wrong)
    with pytest.raises(ValueError, match="does not match Keras.*backend='keras'"):
        litert.LiteRTModel(base, cache=False, conversion="in_process")


def test_subprocess_conversion_gives_the_same_model_as_in_process(base, images, tmp_path):
    # Not cached yet: converts in a child process, checked against the child's Keras outputs.
    isolated = litert.LiteRTModel(base, cache=tmp_path, conversion="subprocess")
    assert isolated.converted_in == "subprocess" and not isolated.from_cache
    assert '"converted_in": "subprocess"' in isolated.path.with_suffix(".json").read_text()
    here = litert.LiteRTModel(base, cache=False)  # The default: in this process.
    assert here.converted_in == "in_process"
    assert isolated.content == here.content, "the same converter on the same model"
    np.testing.assert_array_equal(isolated(images), here(images))


class _UnregisteredScale(keras.layers.Layer):
    """A custom layer the subprocess cannot load (not registered with Keras)."""

    def call(self, inputs):
        return inputs * 2.0


def test_a_failed_subprocess_conversion_falls_back_with_a_warning(tmp_path):
    inputs = keras.Input((16, 16, 3))
    features = keras.layers.Conv2D(4, 3)(_UnregisteredScale()(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(features))
    with pytest.warns(UserWarning, match="in a subprocess did not work.*in this process instead"):
        converted = litert.LiteRTModel(model, cache=tmp_path, conversion="subprocess")
    assert converted.converted_in == "in_process"
    probe = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(converted(probe), model.predict(probe, verbose=0), rtol=1e-4)
    with pytest.raises(ValueError, match="conversion must be one of"):
        litert.LiteRTModel(model, cache=False, conversion="thread")


def test_bad_inputs_get_clear_errors(base, images, tmp_path):
    model = litert.LiteRTModel(base, cache=tmp_path)
    with pytest.raises(ValueError, match=r"resize them to 64 px"):
        model(images[:, :32, :32])
    any_size = tlkit.build_backbone("mobilenet_v2", image_size=None, weights=None)
    with pytest.raises(ValueError, match="pass image_size="):
        litert.LiteRTModel(any_size, cache=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        litert.LiteRTModel(base, cache=tmp_path, batch_size=0)


def test_auto_backend_converts_when_it_pays_off_and_falls_back_to_keras(
    base, images, monkeypatch, tmp_path
):
    assert litert.available()
    split = ImageSplit(
        "train", ["a", "b"], np.arange(len(images)) % 2, images=images.astype(np.uint8)
    )
    keras_features = extract_features(base, split, cache=False, progress=False, backend="keras")
    calls = []
    original = litert.LiteRTModel
    monkeypatch.setattr(litert, "LiteRTModel", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path))  # Nothing converted yet.
    extract_features(base, split, cache=False, progress=False, backend="auto")
    assert not calls, "5 images do not pay for a conversion"
    monkeypatch.setattr(inference, "LITERT_MIN_IMAGES", 5)
    auto = extract_features(base, split, cache=False, progress=False, backend="auto")
    assert calls, "backend='auto' should use LiteRT on a machine without a GPU"
    np.testing.assert_allclose(auto.features, keras_features.features, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(inference, "LITERT_MIN_IMAGES", 1000)
    calls.clear()
    extract_features(base, split, cache=False, progress=False, backend="auto")
    assert calls, "a cached conversion is always used"

    def broken(*args, **kwargs):
        raise RuntimeError("converter failed")

    monkeypatch.setattr(litert, "LiteRTModel", broken)
    with pytest.warns(UserWarning, match="LiteRT could not run .*using Keras"):
        forward = forward_function(base, SIZE, "auto")
    np.testing.assert_allclose(forward(images), keras_features.features, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="converter failed"):
        forward_function(base, SIZE, "litert")  # Asked for explicitly: no silent fallback.
