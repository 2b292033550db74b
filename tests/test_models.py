"""Classifiers on a frozen base, unfreezing by block, fine-tuning and saving."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit
from tlkit.data import ImageSplit
from tlkit.fine_tuning import fine_tune, fine_tune_cached, split_at_block
from tlkit.heads import build_head
from tlkit.models import block_names, find_base, get_class_names, unfreeze

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 64
CLASS_NAMES = ["red", "green", "blue"]


def _build(weights=None):
    keras.utils.set_random_seed(0)
    return tlkit.build_classifier(
        "mobilenet_v2", num_classes=3, image_size=SIZE, weights=weights, class_names=CLASS_NAMES
    )


@pytest.fixture(scope="module")
def pretrained_classifier(tlkit_cache_dir):
    """Shared by tests that do not change the model."""
    return _build("imagenet")


@pytest.fixture
def classifier():
    """A fresh classifier with a randomly initialised base (faster to build)."""
    return _build()


def _images(count=6, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def _batches(count=6):
    labels = np.arange(count) % 3
    return tf.data.Dataset.from_tensor_slices((_images(count), labels)).batch(count)


def _bn_values(base):
    return {
        f"{layer.name}/{weight.path}": weight.numpy().copy()
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for weight in layer.weights
    }


# ---------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------


def test_classifier_has_a_frozen_base_and_softmax_output(pretrained_classifier):
    classifier = pretrained_classifier
    base = find_base(classifier)
    assert base.trainable_weights == []
    head_weights = {weight.path for weight in classifier.get_layer("head").trainable_weights}
    assert {weight.path for weight in classifier.trainable_weights} == head_weights
    assert len(head_weights) == 2  # Dense kernel and bias.
    # Any input size: the model resizes to its own.
    probabilities = classifier.predict(_images(2, size=80), verbose=0)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": 3, "dropout_rate": 1.0}, "dropout_rate"),
        ({"num_classes": 3, "dropout_rate": -0.1}, "dropout_rate"),
    ],
)
def test_build_head_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=f"Received: {message}="):
        build_head(1280, **arguments)


def test_class_names_must_match_num_classes():
    with pytest.raises(ValueError, match="class names"):
        tlkit.build_classifier("mobilenet_v2", 2, SIZE, weights=None, class_names=["a", "b", "c"])


# ---------------------------------------------------------------------------
# Unfreezing.
# ---------------------------------------------------------------------------


def test_unfreeze_two_blocks_keeps_batch_norm_frozen(classifier):
    base = find_base(classifier)
    assert block_names(base) == ["stem", *[f"block{i}" for i in range(1, 18)], "head"]
    chosen = unfreeze(classifier, 2, learning_rate=3e-4)
    assert chosen == ["block17", "head"]
    trainable_layers = {layer.name for layer in base.layers if layer.trainable_weights}
    assert trainable_layers == {
        "block17_expand_conv",
        "block17_depthwise_conv",
        "block17_project_conv",
        "head_conv",
    }
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 52 and not any(layer.trainable for layer in norms)
    assert float(keras.ops.convert_to_numpy(classifier.optimizer.learning_rate)) == pytest.approx(
        3e-4
    )


def test_unfreeze_by_name_list_and_all(classifier):
    assert unfreeze(classifier, "block16", recompile=False) == ["block16", "block17", "head"]
    base = find_base(classifier)
    assert base.get_layer("block16_expand_conv").trainable_weights
    assert not base.get_layer("block15_project_conv").trainable_weights

    assert unfreeze(classifier, ["stem", "head"], recompile=False) == ["stem", "head"]
    assert base.get_layer("stem_conv").trainable_weights
    assert not base.get_layer("block16_expand_conv").trainable_weights  # Re-frozen.

    assert len(unfreeze(classifier, "all", recompile=False)) == 19
    assert unfreeze(classifier, 0, recompile=False) == []
    assert not any(layer.trainable_weights for layer in base.layers)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("block99", "Unknown block"),
        (["stem", "nope"], "Unknown blocks"),
        (20, "between 0 and 19"),
        (-1, "between"),
    ],
)
def test_unfreeze_rejects_bad_blocks(pretrained_classifier, blocks, message):
    with pytest.raises(ValueError, match=message):
        unfreeze(pretrained_classifier, blocks)
    assert find_base(pretrained_classifier).trainable_weights == []  # Nothing changed.


def test_unfreeze_needs_a_tlkit_base():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="build_classifier"):
        unfreeze(model)


@pytest.mark.slow
def test_fine_tune_moves_only_unfrozen_kernels_and_never_batch_norm():
    classifier = _build("imagenet")
    base = find_base(classifier)
    norms_before = _bn_values(base)
    unfrozen_before = base.get_layer("head_conv").kernel.numpy().copy()
    frozen_before = base.get_layer("block16_project_conv").kernel.numpy().copy()

    # One step with the base frozen, then one with the last two blocks unfrozen.
    histories = fine_tune(
        classifier,
        _batches(),
        epochs=1,
        freeze_epochs=1,
        blocks=2,
        fine_tune_learning_rate=1e-2,
        verbose=0,
    )

    assert set(histories) == {"head", "fine_tune"}
    assert len(histories["head"]["loss"]) == 1 and len(histories["fine_tune"]["loss"]) == 1
    norms_after = _bn_values(base)
    assert norms_after.keys() == norms_before.keys()
    for key, value in norms_before.items():  # gamma, beta, moving mean and variance.
        np.testing.assert_array_equal(norms_after[key], value, err_msg=key)
    assert not np.array_equal(base.get_layer("head_conv").kernel.numpy(), unfrozen_before)
    np.testing.assert_array_equal(
        base.get_layer("block16_project_conv").kernel.numpy(), frozen_before
    )
    assert float(keras.ops.convert_to_numpy(classifier.optimizer.learning_rate)) == pytest.approx(
        1e-2
    )


# ---------------------------------------------------------------------------
# Fine-tuning the top blocks on cached activations.
# ---------------------------------------------------------------------------


def _image_split(count=6, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
    return ImageSplit("train", CLASS_NAMES, np.arange(count) % 3, images=images)


def _random_base():
    keras.utils.set_random_seed(0)
    return tlkit.build_feature_extractor("mobilenet_v2", SIZE, weights=None)


@pytest.mark.slow
def test_fine_tune_cached_trains_the_top_blocks_and_assembles_the_classifier(tmp_path):
    base, head, split = _random_base(), build_head(1280, 3), _image_split()
    norms_before = _bn_values(base)
    top_before = base.get_layer("block17_project_conv").kernel.numpy().copy()
    head_conv_before = base.get_layer("head_conv").kernel.numpy().copy()
    below_before = base.get_layer("block16_project_conv").kernel.numpy().copy()
    dense_before = head.get_layer("predictions").kernel.numpy().copy()

    model, history = fine_tune_cached(
        base,
        head,
        split,
        validation_split=split,
        views=2,
        epochs=2,
        learning_rate=1e-2,
        cache=tmp_path,
        progress=False,
    )

    assert len(history["loss"]) == 2 and len(history["val_accuracy"]) == 2
    # The top two blocks (the default) and the head moved; the block below and BatchNorm did not.
    assert not np.array_equal(base.get_layer("block17_project_conv").kernel.numpy(), top_before)
    assert not np.array_equal(base.get_layer("head_conv").kernel.numpy(), head_conv_before)
    assert not np.array_equal(head.get_layer("predictions").kernel.numpy(), dense_before)
    np.testing.assert_array_equal(
        base.get_layer("block16_project_conv").kernel.numpy(), below_before
    )
    norms_after = _bn_values(base)
    assert norms_after.keys() == norms_before.keys()
    for key, value in norms_before.items():  # gamma, beta, moving mean and variance.
        np.testing.assert_array_equal(norms_after[key], value, err_msg=key)

    # The classifier takes raw images and computes head(upper(lower(x))) with the tuned weights.
    assert find_base(model) is base and model.get_layer("head") is head
    assert get_class_names(model) == CLASS_NAMES
    lower, upper = split_at_block(base, "block17")
    images = split.images.astype("float32")
    expected = head(upper(lower(images, training=False), training=False), training=False)
    np.testing.assert_allclose(
        model.predict(images, verbose=0), keras.ops.convert_to_numpy(expected), rtol=1e-5, atol=1e-6
    )
    assert base.trainable_weights == []  # Frozen again in the returned classifier.

    # A fresh base on a subset reuses the cached activations of the whole split.
    cached = sorted(tmp_path.iterdir())
    assert len(cached) == 2  # Train (2 views) and validation.
    _, history = fine_tune_cached(
        _random_base(),
        build_head(1280, 3),
        split,
        indices=[0, 1, 2],
        views=2,
        epochs=1,
        cache=tmp_path,
        progress=False,
    )
    assert sorted(tmp_path.iterdir()) == cached and len(history["loss"]) == 1


@pytest.mark.slow
def test_fine_tune_cached_passes_class_weights_to_training(tmp_path):
    base, head, split = _random_base(), build_head(1280, 3), _image_split()
    top_before = base.get_layer("block17_project_conv").kernel.numpy().copy()
    # Every class weighted 0: no loss, no gradient, nothing moves.
    _, history = fine_tune_cached(
        base,
        head,
        split,
        views=1,
        epochs=1,
        learning_rate=1e-2,
        cache=tmp_path,
        progress=False,
        class_weight={0: 0.0, 1: 0.0, 2: 0.0},
    )
    assert history["loss"] == [0.0]
    np.testing.assert_array_equal(base.get_layer("block17_project_conv").kernel.numpy(), top_before)


@pytest.fixture(scope="module")
def random_base():
    """A base for argument checks, which fail before anything trains."""
    return _random_base()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"head": (1024, 3)}, "Received: head.input_shape"),
        ({"head": (1280, 4)}, "Received: head.output_shape"),
        ({"views": 0}, "Received: views=0"),
        ({"epochs": 2.5}, "Received: epochs=2.5"),
        ({"block": "stem"}, "Received: block='stem'"),
        ({"indices": [99]}, "indices in 99..99"),
        ({"class_weight": "inverse"}, "class_weight must be None, 'balanced'"),
    ],
)
def test_fine_tune_cached_rejects_bad_arguments(random_base, tmp_path, arguments, message):
    arguments = {"head": (1280, 3), "views": 1, "epochs": 1, **arguments}
    arguments["head"] = build_head(*arguments["head"])
    with pytest.raises(ValueError, match=message):
        fine_tune_cached(
            random_base, train_split=_image_split(), cache=tmp_path, progress=False, **arguments
        )


# ---------------------------------------------------------------------------
# Saving, loading, augmentation at inference.
# ---------------------------------------------------------------------------


def test_save_and_safe_load_round_trip(classifier, tmp_path):
    unfreeze(classifier, 1)
    path = tmp_path / "model.keras"
    classifier.save(path)
    loaded = tlkit.load_classifier(path)
    images = _images(3, size=72, seed=5)
    np.testing.assert_allclose(
        loaded.predict(images, verbose=0),
        classifier.predict(images, verbose=0),
        rtol=1e-6,
        atol=1e-7,
    )
    assert get_class_names(loaded) == CLASS_NAMES
    assert get_class_names(find_base(loaded)) is None

    with pytest.raises(FileNotFoundError, match="model.keras"):
        tlkit.load_classifier(tmp_path / "missing.keras")
    (tmp_path / "model.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.keras"):
        tlkit.load_classifier(tmp_path / "model.h5")


def test_augmentation_is_inactive_in_predict():
    keras.utils.set_random_seed(0)
    base = tlkit.build_feature_extractor("mobilenet_v2", SIZE, weights=None)
    augmentation = tlkit.build_augmentation("natural", seed=1)
    augmented = tlkit.build_classifier(
        "mobilenet_v2", 3, SIZE, augmentation=augmentation, base=base
    )
    plain = tlkit.build_classifier(
        "mobilenet_v2", 3, SIZE, base=base, head=augmented.get_layer("head")
    )
    images = _images(4, seed=3)
    # The layer really augments in training mode...
    assert not np.allclose(augmentation(images, training=True), images)
    # ...but predict sees the images unchanged: same as the model without it.
    first = augmented.predict(images, verbose=0)
    np.testing.assert_array_equal(first, augmented.predict(images, verbose=0))
    np.testing.assert_allclose(first, plain.predict(images, verbose=0), rtol=1e-6, atol=1e-7)
