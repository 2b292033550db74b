"""Tests for tlkit.augment: presets, config round trip, tf.data, seeding, MixUp/CutMix."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tlkit import augment  # noqa: E402

IMAGE_SHAPE = (4, 24, 24, 3)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, IMAGE_SHAPE).astype("float32")


def _layer_names(pipeline):
    return [layer.__class__.__name__ for layer in pipeline.layers]


# ---------------------------------------------------------------------------
# Presets and building
# ---------------------------------------------------------------------------


def test_list_presets_matches_presets():
    presets = augment.list_presets()
    assert {"natural", "light", "tutorial", "medical", "signs", "none"} <= set(presets)
    assert all(isinstance(text, str) and text for text in presets.values())


@pytest.mark.parametrize("preset", sorted(augment.PRESETS))
def test_every_preset_builds_and_keeps_shape(preset, images):
    pipeline = augment.build_augmentation(preset, seed=1)
    assert isinstance(pipeline, keras.Sequential)
    assert pipeline.name == "augmentation"
    output = np.asarray(pipeline(images, training=True))
    assert output.shape == images.shape


def test_tutorial_preset_is_the_tensorflow_tutorial():
    pipeline = augment.build_augmentation("tutorial", seed=0)
    flip, rotation = pipeline.layers
    assert isinstance(flip, keras.layers.RandomFlip) and flip.mode == "horizontal"
    assert isinstance(rotation, keras.layers.RandomRotation)
    assert rotation.get_config()["factor"] == (-0.2, 0.2)


def test_natural_preset_layers():
    assert _layer_names(augment.build_augmentation("natural")) == [
        "RandomFlip",
        "RandomRotation",
        "RandomZoom",
        "RandomTranslation",
        "RandomContrast",
        "RandomBrightness",
    ]


def test_medical_preset_has_no_flip_and_small_rotation():
    pipeline = augment.build_augmentation("medical")
    assert not any(isinstance(layer, keras.layers.RandomFlip) for layer in pipeline.layers)
    (rotation,) = [
        layer for layer in pipeline.layers if isinstance(layer, keras.layers.RandomRotation)
    ]
    # The factor is a fraction of a full turn: 5 degrees is 5 / 360.
    assert max(abs(bound) for bound in rotation.get_config()["factor"]) * 360 <= 5 + 1e-9


def test_signs_preset_never_mirrors_and_blurs():
    pipeline = augment.build_augmentation("signs", seed=0)
    assert _layer_names(pipeline) == [
        "RandomRotation",
        "RandomZoom",
        "RandomTranslation",
        "RandomContrast",
        "RandomBrightness",
        "RandomGaussianBlur",
    ]
    # A sign whose left half is bright: a flip would put the bright half on the
    # right (keep_left -> keep_right); the preset's shifts and rotations never do.
    sided = np.zeros((64, 32, 32, 3), dtype="float32")
    sided[:, :, :16] = 200.0
    output = np.asarray(pipeline(sided, training=True))
    assert output.shape == sided.shape
    left, right = output[:, :, :12].mean(axis=(1, 2, 3)), output[:, :, 20:].mean(axis=(1, 2, 3))
    assert np.all(left > right)
    flipped = np.asarray(augment.build_augmentation("signs", seed=0, flip="horizontal")(sided))
    assert np.any(flipped[:, :, :12].mean(axis=(1, 2, 3)) < flipped[:, :, 20:].mean(axis=(1, 2, 3)))
    # Blur alone smooths a checkerboard: neighbouring pixels move closer together.
    checker = np.indices((32, 32)).sum(axis=0) % 2 * 255.0
    checker = np.tile(checker[None, :, :, None], (16, 1, 1, 3)).astype("float32")
    blur = augment.build_augmentation(
        "signs", seed=0, rotation=None, zoom=None, translation=None, contrast=None, brightness=None
    )
    blurred = np.asarray(blur(checker, training=True))
    steps = np.abs(np.diff(blurred[:, 8:24, 8:24, 0], axis=2)).mean(axis=(1, 2))
    assert steps.min() < 250.0  # Some images are blurred (a random share, random sigma).


def test_none_preset_is_identity(images):
    pipeline = augment.build_augmentation("none")
    assert _layer_names(pipeline) == ["Identity"]
    np.testing.assert_array_equal(np.asarray(pipeline(images, training=True)), images)


def test_overrides_change_and_remove_layers():
    pipeline = augment.build_augmentation("natural", rotation=0.3, flip=None, contrast=None)
    assert "RandomFlip" not in _layer_names(pipeline)
    assert "RandomContrast" not in _layer_names(pipeline)
    rotation = pipeline.get_layer("random_rotation")
    assert rotation.get_config()["factor"] == (-0.3, 0.3)


def test_brightness_and_contrast_use_the_0_255_range():
    pipeline = augment.build_augmentation("natural")
    for name in ("random_brightness", "random_contrast"):
        assert tuple(pipeline.get_layer(name).get_config()["value_range"]) == (0, 255)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="Received: preset='satellite'") as error:
        augment.build_augmentation("satellite")
    for name in augment.PRESETS:
        assert name in str(error.value)


def test_unknown_override_lists_valid_ones():
    with pytest.raises(ValueError, match="rotation") as error:
        augment.build_augmentation("natural", rotate=0.1)
    assert "Received: overrides=" in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [{"flip": "diagonal"}, {"rotation": "a lot"}, {"fill_mode": "mirror"}],
)
def test_invalid_override_values(overrides):
    with pytest.raises(ValueError, match="Received:"):
        augment.build_augmentation("natural", **overrides)


# ---------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------


def test_config_round_trip():
    pipeline = augment.build_augmentation("natural", seed=7)
    restored = keras.Sequential.from_config(pipeline.get_config())
    assert restored.name == "augmentation"
    assert len(restored.layers) == len(pipeline.layers)
    for original, copy in zip(pipeline.layers, restored.layers, strict=True):
        assert type(original) is type(copy)
        assert original.get_config() == copy.get_config()


def test_each_layer_gets_its_own_seed():
    pipeline = augment.build_augmentation("natural", seed=10)
    seeds = [layer.get_config()["seed"] for layer in pipeline.layers]
    assert len(set(seeds)) == len(seeds)
    # Removing one layer leaves the other layers' seeds as they were.
    without_flip = augment.build_augmentation("natural", seed=10, flip=None)
    assert [layer.get_config()["seed"] for layer in without_flip.layers] == seeds[1:]


def test_inactive_at_inference(images):
    pipeline = augment.build_augmentation("natural", seed=0)
    np.testing.assert_array_equal(np.asarray(pipeline(images, training=False)), images)
    # Inside a model, predict() runs with training=False.
    inputs = keras.Input(IMAGE_SHAPE[1:])
    model = keras.Model(inputs, pipeline(inputs))
    np.testing.assert_array_equal(model.predict(images, verbose=0), images)


def test_active_in_training(images):
    pipeline = augment.build_augmentation("natural", seed=0)
    assert not np.allclose(np.asarray(pipeline(images, training=True)), images)


def test_direct_call_without_training_argument_augments(images):
    # Documented caveat: Keras preprocessing layers default to training=True.
    pipeline = augment.build_augmentation("natural", seed=0)
    assert not np.allclose(np.asarray(pipeline(images)), images)


@pytest.mark.parametrize("preset", ["natural", "medical", "tutorial", "signs"])
def test_outputs_stay_in_0_255(preset):
    # Extreme pixels are where brightness and contrast would overshoot.
    extremes = np.zeros(IMAGE_SHAPE, dtype="float32")
    extremes[:, ::2] = 255.0
    pipeline = augment.build_augmentation(preset, seed=3, contrast=0.9, brightness=0.9)
    for _ in range(3):
        output = np.asarray(pipeline(extremes, training=True))
        assert output.min() >= 0.0 and output.max() <= 255.0


def test_same_seed_gives_same_outputs(images):
    # Holds for separately built pipelines as long as they see the same calls:
    # each layer's SeedGenerator starts from its seed and advances once per call.
    first = augment.build_augmentation("natural", seed=42)
    second = augment.build_augmentation("natural", seed=42)
    for _ in range(2):
        np.testing.assert_allclose(
            np.asarray(first(images, training=True)), np.asarray(second(images, training=True))
        )
    other = augment.build_augmentation("natural", seed=43)
    assert not np.allclose(
        np.asarray(other(images, training=True)), np.asarray(first(images, training=True))
    )


def test_signs_preset_is_seeded(images):
    first = augment.build_augmentation("signs", seed=7)
    second = augment.build_augmentation("signs", seed=7)
    np.testing.assert_allclose(
        np.asarray(first(images, training=True)), np.asarray(second(images, training=True))
    )
    np.testing.assert_array_equal(np.asarray(first(images, training=False)), images)


def test_runs_inside_tf_data(images):
    def run():
        pipeline = augment.build_augmentation("natural", seed=5)
        dataset = (
            tf.data.Dataset.from_tensor_slices(images)
            .batch(2)
            .map(lambda batch: pipeline(batch, training=True))
        )
        return np.concatenate(list(dataset.as_numpy_iterator()))

    first, second = run(), run()
    assert first.shape == images.shape
    assert first.min() >= 0.0 and first.max() <= 255.0
    assert not np.allclose(first, images)
    np.testing.assert_allclose(first, second)


# ---------------------------------------------------------------------------
# MixUp, CutMix
# ---------------------------------------------------------------------------


def _labelled_dataset(images, batch_size=4):
    labels = np.array([0, 1, 2, 1], dtype="int64")
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_mix_batches_soft_labels_and_convex_images(method, images):
    dataset = augment.mix_batches(_labelled_dataset(images), method, num_classes=3, seed=1)
    ((mixed_images, soft_labels),) = list(dataset.as_numpy_iterator())
    assert mixed_images.shape == images.shape and mixed_images.dtype == np.float32
    assert soft_labels.shape == (4, 3) and soft_labels.dtype == np.float32
    np.testing.assert_allclose(soft_labels.sum(axis=1), 1.0, atol=1e-5)
    assert soft_labels.min() >= 0.0
    # Every output pixel mixes the same pixel of two images in the batch, so it
    # lies between the batch's smallest and largest value at that position.
    tolerance = 1e-3
    assert np.all(mixed_images >= images.min(axis=0) - tolerance)
    assert np.all(mixed_images <= images.max(axis=0) + tolerance)


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_mix_batches_is_seeded(method, images):
    def run():
        dataset = augment.mix_batches(_labelled_dataset(images), method, num_classes=3, seed=9)
        return list(dataset.as_numpy_iterator())[0]

    (first_images, first_labels), (second_images, second_labels) = run(), run()
    np.testing.assert_allclose(first_images, second_images)
    np.testing.assert_allclose(first_labels, second_labels)


def test_mix_batches_accepts_one_hot_labels(images):
    one_hot = tf.one_hot([0, 1, 2, 1], 3)
    dataset = tf.data.Dataset.from_tensor_slices((images, one_hot)).batch(4)
    ((_, soft_labels),) = list(augment.mix_batches(dataset, seed=0).as_numpy_iterator())
    np.testing.assert_allclose(soft_labels.sum(axis=1), 1.0, atol=1e-5)


def test_mix_batches_errors(images):
    dataset = _labelled_dataset(images)
    with pytest.raises(ValueError, match="Received: method='cutout'"):
        augment.mix_batches(dataset, "cutout", num_classes=3)
    with pytest.raises(ValueError, match="Received: num_classes=None"):
        augment.mix_batches(dataset, "mixup")
    with pytest.raises(ValueError, match="Received: alpha=2"):
        augment.mix_batches(dataset, "cutmix", alpha=2, num_classes=3)
    unbatched = tf.data.Dataset.from_tensor_slices((images, np.zeros(4, dtype="int64")))
    with pytest.raises(ValueError, match="batch"):
        augment.mix_batches(unbatched, "mixup", num_classes=3)


def test_mixup_features():
    features = np.random.default_rng(1).normal(size=(16, 8)).astype("float32")
    labels = np.eye(4, dtype="float32")[np.arange(16) % 4]
    mixed, soft = augment.mixup_features(features, labels, alpha=0.4, seed=3)
    assert mixed.shape == features.shape and soft.shape == labels.shape
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(mixed >= features.min(axis=0) - 1e-5)
    assert np.all(mixed <= features.max(axis=0) + 1e-5)
    again, _ = augment.mixup_features(features, labels, alpha=0.4, seed=3)
    np.testing.assert_array_equal(mixed, again)
    with pytest.raises(ValueError, match="same number of rows"):
        augment.mixup_features(features, labels[:3])
