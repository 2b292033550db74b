"""Autoencoder pretraining on unlabelled images, and classifiers on its encoder."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit
from tlkit.data import ImageSplit
from tlkit.unsupervised import (
    build_autoencoder,
    encoder_classifier,
    load_images,
    pooled_encoder,
    pretrain_autoencoder,
)

SIZE = 32


def _images(count=48, seed=0):
    """Smooth random images (blurred blobs), which an autoencoder can learn to reconstruct."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, 4, 4, 3)).astype("float32")
    return tf.image.resize(coarse, (SIZE, SIZE)).numpy().clip(0, 255).astype("uint8")


def test_shapes_and_nested_models():
    autoencoder = build_autoencoder(SIZE, filters=(8, 16), seed=0)
    encoder, decoder = autoencoder.get_layer("encoder"), autoencoder.get_layer("decoder")
    assert encoder.output_shape == (None, SIZE // 4, SIZE // 4, 16)
    assert decoder.output_shape == (None, SIZE, SIZE, 3)
    output = autoencoder.predict(_images(4), verbose=0)
    assert output.shape == (4, SIZE, SIZE, 3) and output.min() >= 0 and output.max() <= 1
    assert pooled_encoder(encoder).output_shape == (None, 16)


def test_reconstruction_loss_decreases():
    keras.utils.set_random_seed(0)
    images = _images()
    autoencoder, history = pretrain_autoencoder(
        images,
        build_autoencoder(SIZE, filters=(8, 16)),
        epochs=6,
        batch_size=16,
        learning_rate=3e-3,
        validation_data=images[:16],
    )
    assert len(history["loss"]) == 6 and "val_loss" in history
    # Measured: 0.050 -> 0.038 over 6 epochs, falling every epoch.
    assert history["loss"][-1] < 0.85 * history["loss"][0], history["loss"]


def test_pretrain_takes_splits_and_datasets():
    images = _images(16)
    split = ImageSplit("train", ["a", "b"], np.arange(16) % 2, images=images)
    _, from_split = pretrain_autoencoder(split, image_size=SIZE, epochs=1, batch_size=8)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(16))).batch(8)
    _, from_dataset = pretrain_autoencoder(dataset, image_size=SIZE, epochs=1)
    assert len(from_split["loss"]) == len(from_dataset["loss"]) == 1
    assert load_images(split, 16).shape == (16, 16, 16, 3)


def test_encoder_weights_are_shared_with_the_classifier():
    autoencoder = build_autoencoder(SIZE, filters=(8, 16))
    encoder = autoencoder.get_layer("encoder")
    frozen = encoder_classifier(encoder, num_classes=3)
    assert frozen.get_layer("encoder") is encoder
    assert frozen.output_shape == (None, 3)
    assert len(frozen.trainable_weights) == 2  # Only the head's kernel and bias.
    before = [weight.numpy().copy() for weight in encoder.weights]
    labels = np.arange(16) % 3
    frozen.fit(_images(16, seed=1), labels, epochs=1, verbose=0)
    for old, new in zip(before, encoder.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())

    tuned = encoder_classifier(encoder, num_classes=3, fine_tune=True)
    assert len(tuned.trainable_weights) > 2
    tuned.fit(_images(16, seed=1), labels, epochs=1, verbose=0)
    kernel = encoder.get_layer("block1_down_conv").kernel.numpy()
    assert not np.array_equal(kernel, before[0])
    # The autoencoder sees the fine-tuned encoder: one set of weights.
    np.testing.assert_array_equal(
        autoencoder.get_layer("encoder").get_layer("block1_down_conv").kernel.numpy(), kernel
    )


def test_classifier_takes_any_image_size_and_a_trained_head():
    encoder = build_autoencoder(SIZE, filters=(8, 16)).get_layer("encoder")
    head = tlkit.build_head(16, 2)
    classifier = encoder_classifier(encoder, 2, head=head)
    assert classifier.predict(np.zeros((2, 50, 70, 3), "float32"), verbose=0).shape == (2, 2)
    with pytest.raises(ValueError, match="Received: head input"):
        encoder_classifier(encoder, 3, head=head)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_autoencoder(30, filters=(8, 16)), "image_size=30"),
        (lambda: build_autoencoder(32, filters=()), "filters=()"),
        (lambda: pretrain_autoencoder("photos/", image_size=SIZE), "data=str"),
        (
            lambda: pretrain_autoencoder(np.zeros((2, 8, 8)), image_size=SIZE),
            r"data.shape=\(2, 8, 8\)",
        ),
        (lambda: pretrain_autoencoder(np.zeros((2, 8, 8, 3)), epochs=0), "epochs=0"),
        (
            lambda: encoder_classifier(build_autoencoder(SIZE).get_layer("encoder"), 1),
            "num_classes=1",
        ),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
