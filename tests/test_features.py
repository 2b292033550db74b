"""The feature cache: frozen-base features computed once, keyed by everything that changes them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tlkit
from tlkit.data import ImageSplit
from tlkit.features import FeatureSet, cache_key, extract_features
from tlkit.fine_tuning import build_upper_classifier, split_at_block
from tlkit.heads import build_head, train_head

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 64
COUNT = 6


def _split(seed=0, count=COUNT):
    images = np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
    return ImageSplit("train", ["a", "b"], np.arange(count) % 2, images=images)


@pytest.fixture(scope="module")
def base(tlkit_cache_dir):
    return tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE)


@pytest.fixture(scope="module")
def split():
    return _split()


def test_features_match_the_base_and_are_cached(base, split, tmp_path):
    first = extract_features(base, split, batch_size=4, cache=tmp_path, progress=False)
    assert first.features.shape == (COUNT, 1280) and first.features.dtype == np.float32
    np.testing.assert_array_equal(first.labels, split.labels)
    assert not first.from_cache and first.path.is_file() and first.path.parent == tmp_path
    # Two batches (4 + 2), concatenated in order: the same as running the base directly.
    direct = base.predict(split.images.astype("float32"), verbose=0)
    np.testing.assert_allclose(first.features, direct, rtol=1e-4, atol=1e-4)

    second = extract_features(base, split, batch_size=4, cache=tmp_path, progress=False)
    assert second.from_cache and second.path == first.path
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.labels, first.labels)


def test_default_cache_folder_is_under_the_cache_dir(base, split, tlkit_cache_dir):
    features = extract_features(base, split, progress=False)
    assert features.path.parent == tlkit_cache_dir / "features"
    assert features.path.name.startswith(f"{base.name}-{SIZE}px-")
    assert extract_features(base, split, cache=False, progress=False).path is None


def test_changed_weights_miss_the_cache(split, tmp_path):
    base = tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE, weights=None)
    before = extract_features(base, split, cache=tmp_path, progress=False)
    key = cache_key(base, split, SIZE, 1, None, 0)
    kernel = base.get_layer("head_conv").kernel
    changed = kernel.numpy()
    changed[0, 0, 0, 0] += 1.0  # One weight of a few hundred thousand.
    kernel.assign(changed)
    assert cache_key(base, split, SIZE, 1, None, 0) != key
    after = extract_features(base, split, cache=tmp_path, progress=False)
    assert not after.from_cache and after.path != before.path
    assert not np.array_equal(after.features, before.features)


def test_changed_data_or_settings_change_the_key(base, split):
    key = cache_key(base, split, SIZE, 1, None, 0)
    assert cache_key(base, split, SIZE, 1, None, 0) == key  # Deterministic.
    images = split.images.copy()
    images[3, 10, 10, 1] ^= 1  # One bit of one pixel.
    edited = ImageSplit("train", ["a", "b"], split.labels, images=images)
    relabelled = ImageSplit("train", ["a", "b"], 1 - split.labels, images=split.images)
    assert cache_key(base, edited, SIZE, 1, None, 0) != key
    assert cache_key(base, relabelled, SIZE, 1, None, 0) != key
    assert cache_key(base, split, SIZE + 32, 1, None, 0) != key
    augmentation = tlkit.build_augmentation("light", seed=0)
    assert cache_key(base, split, SIZE, 2, augmentation, 0) != cache_key(
        base, split, SIZE, 2, tlkit.build_augmentation("natural", seed=0), 0
    )


@pytest.mark.slow
def test_augmented_views(base, split):
    plain = extract_features(base, split, cache=False, progress=False)
    viewed = extract_features(
        base, split, views=3, augmentation="natural", seed=1, cache=False, progress=False
    )
    assert viewed.features.shape == (3 * COUNT, 1280) and viewed.views == 3
    np.testing.assert_array_equal(viewed.labels, np.tile(split.labels, 3))
    view0, view1, view2 = viewed.features.reshape(3, COUNT, -1)
    np.testing.assert_allclose(view0, plain.features, rtol=1e-5, atol=1e-5)
    assert not np.allclose(view1, view0, atol=1e-3)
    assert not np.allclose(view2, view0, atol=1e-3)
    assert not np.allclose(view2, view1, atol=1e-3)  # Each view draws new augmentations.


@pytest.mark.parametrize(("views", "augmentation"), [(3, None), (0, "natural"), (1.5, "natural")])
def test_bad_views(base, split, views, augmentation):
    with pytest.raises(ValueError, match="Received: views="):
        extract_features(base, split, views=views, augmentation=augmentation, progress=False)


def test_train_head_learns_a_separable_problem():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20).astype(np.int32)
    centres = rng.normal(0, 3, (3, 16))
    features = (centres[labels] + rng.normal(0, 0.5, (60, 16))).astype(np.float32)
    train = FeatureSet(features[::2], labels[::2], views=1)
    validation = FeatureSet(features[1::2], labels[1::2], views=1)
    head = tlkit.build_head(16, 3, dropout_rate=0.0)
    history = train_head(head, train, validation, epochs=30, batch_size=8, learning_rate=1e-2)
    assert len(history["loss"]) == 30
    assert history["loss"][-1] < history["loss"][0] / 4
    assert history["val_accuracy"][-1] == 1.0
    predicted = head.predict(validation.features, verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(predicted, validation.labels)


def test_feature_set_dataset_keeps_pairs_when_shuffled():
    features = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    labels = np.arange(10, dtype=np.int32)
    batches = list(FeatureSet(features, labels, views=1).to_dataset(4, shuffle=True, seed=0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    seen = np.concatenate([y.numpy() for _, y in batches])
    assert sorted(seen) == list(range(10)) and list(seen) != list(range(10))
    for x, y in batches:
        np.testing.assert_array_equal(x.numpy()[:, 0], y.numpy())


def test_every_backend_gives_the_same_features(base, split):
    plain = extract_features(
        base, split, batch_size=4, cache=False, progress=False, backend="keras"
    )
    for backend in ("xla", "litert", "auto"):
        other = extract_features(
            base, split, batch_size=4, cache=False, progress=False, backend=backend
        )
        np.testing.assert_allclose(other.features, plain.features, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="backend must be one of"):
        extract_features(base, split, cache=False, progress=False, backend="onnx")


def test_split_at_block_recomposes_the_base(base, split, tmp_path):
    lower, upper = split_at_block(base, "block16")
    images = split.images.astype("float32")
    np.testing.assert_allclose(upper(lower(images)), base(images), rtol=1e-5, atol=1e-5)
    activations = extract_features(lower, split, batch_size=4, cache=tmp_path, progress=False)
    assert activations.features.shape == (COUNT, *lower.output_shape[1:])
    assert activations.path.name.startswith(f"{lower.name}-{SIZE}px-")
    assert set(upper.layers[1:]) <= set(base.layers)  # Shared layers: training upper tunes base.


@pytest.mark.parametrize("block", ["stem", "block99", "head_conv"])
def test_split_at_block_rejects_bad_blocks(base, block):
    with pytest.raises(ValueError, match="Received: block="):
        split_at_block(base, block)


def test_build_upper_classifier_trains_only_non_batch_norm_layers():
    base = tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE)
    lower, upper = split_at_block(base, "block17")
    head = build_head(1280, 2)
    model = build_upper_classifier(upper, head, learning_rate=1e-3)
    batch_norms = [w.path for w in model.trainable_weights if "_bn" in w.path]
    assert not batch_norms and model.trainable_weights
    frozen = base.get_layer("block17_project_bn").moving_mean.numpy().copy()
    before = base.get_layer("block17_project_conv").kernel.numpy().copy()
    activations = lower(
        np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    )
    model.fit(activations, np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    assert not np.array_equal(base.get_layer("block17_project_conv").kernel.numpy(), before)
    np.testing.assert_array_equal(base.get_layer("block17_project_bn").moving_mean.numpy(), frozen)


def test_float16_activations_round_float32_ones_and_have_their_own_cache_key(base, split, tmp_path):
    lower, _ = split_at_block(base, "block16")
    full = extract_features(lower, split, cache=tmp_path, progress=False, backend="keras")
    half = extract_features(
        lower, split, cache=tmp_path, progress=False, backend="litert", dtype="float16"
    )
    assert full.features.dtype == np.float32 and half.features.dtype == np.float16
    assert half.path != full.path and not half.from_cache
    scale = np.abs(full.features).max()
    # float16 keeps 11 significant bits: rounding of at most 2**-11 relative, plus
    # LiteRT's float32 round-off (checked at 1e-4 of the largest value).
    np.testing.assert_allclose(half.features, full.features, rtol=2**-11, atol=1e-4 * scale)
    assert np.abs(half.features.astype(np.float32) - full.features).max() > 0  # Really rounded.
    again = extract_features(lower, split, cache=tmp_path, progress=False, dtype="float16")
    assert again.from_cache and again.features.dtype == np.float16
    np.testing.assert_array_equal(again.features, half.features)
    key = cache_key(lower, split, SIZE, 1, None, 0)
    assert cache_key(lower, split, SIZE, 1, None, 0, "float32") == key  # Old caches stay valid.
    assert cache_key(lower, split, SIZE, 1, None, 0, "float16") != key
    with pytest.raises(ValueError, match="dtype must be one of"):
        extract_features(lower, split, cache=False, progress=False, dtype="int8")


def test_features_beyond_the_float16_range_are_refused(split):
    inputs = keras.Input((SIZE, SIZE, 3))
    large = keras.layers.GlobalMaxPooling2D()(keras.layers.Rescaling(1000.0)(inputs))
    model = keras.Model(inputs, large)  # Up to 255000, beyond float16's 65504.
    with pytest.raises(ValueError, match="exceed the float16 range.*dtype='float32'"):
        extract_features(model, split, cache=False, progress=False, dtype="float16")


def test_fine_tuning_on_float16_activations_trains_like_float32(base, split, tmp_path):
    losses, changes = {}, {}
    for dtype in ("float32", "float16"):
        keras.utils.set_random_seed(0)
        fresh = tlkit.build_feature_extractor("mobilenet_v2", image_size=SIZE)
        before = fresh.get_layer("block17_project_conv").kernel.numpy().copy()
        keras.utils.set_random_seed(0)
        head = build_head(1280, 2)
        _, history = tlkit.fine_tune_cached(
            fresh,
            head,
            split,
            block="block17",
            views=1,
            epochs=3,
            batch_size=2,
            cache=tmp_path,
            progress=False,
            backend="keras",
            cache_dtype=dtype,
        )
        losses[dtype] = np.array(history["loss"])
        changes[dtype] = fresh.get_layer("block17_project_conv").kernel.numpy() - before
    moved = np.abs(changes["float32"]).max()
    assert moved > 0  # Measured: 8.9e-5; float16 differs from float32 by 1.7e-5.
    assert np.abs(changes["float16"] - changes["float32"]).max() < 0.5 * moved
    # Losses per epoch (measured 0.719, 0.948, 0.743) agree to ~3e-4 relative.
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=2e-3)
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        tlkit.fine_tune_cached(base, build_head(1280, 2), split, cache_dtype="half")
    with pytest.raises(ValueError, match="backend must be one of"):
        tlkit.fine_tune_cached(base, build_head(1280, 2), split, backend="onnx")
