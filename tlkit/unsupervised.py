"""Unsupervised pretraining: a convolutional autoencoder whose encoder becomes a base.

Before ImageNet weights were everywhere, a common way to use unlabelled images
was to pretrain a network to reconstruct them (Hinton & Salakhutdinov 2006;
Masci et al. 2011, "Stacked convolutional auto-encoders") and then train a
classifier on the encoder. It is the honest baseline for "I have many
unlabelled photos and no pretrained model": the notebooks compare it with
ImageNet transfer, which wins by a wide margin on natural photos.

Example:
    >>> autoencoder, history = pretrain_autoencoder(unlabelled_images, epochs=10)
    >>> classifier = encoder_classifier(autoencoder.get_layer("encoder"), num_classes=5)
    >>> classifier.fit(train_dataset, epochs=10)
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.data import ImageSplit
from tlkit.heads import build_head, compile_classifier

# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def build_autoencoder(
    image_size: int = 64,
    filters: tuple[int, ...] = (32, 64, 128),
    seed: int = 0,
) -> keras.Model:
    """A convolutional autoencoder for raw 0..255 RGB images of one size.

    The encoder (`Rescaling(1/255)`, then one stride-2 `Conv2D` + BatchNorm +
    ReLU block per entry of `filters`, each followed by a 3x3 conv) halves the
    image once per block; the decoder mirrors it with `Conv2DTranspose` and
    ends in a sigmoid, so the output is the image scaled to 0..1. Train it with
    `pretrain_autoencoder`, which builds the 0..1 targets.

    Args:
        image_size: Square input size; divisible by `2 ** len(filters)`.
            Defaults to 64.
        filters: Channels of the encoder blocks, input to output. Defaults to
            (32, 64, 128): a 64 px image becomes an 8 x 8 x 128 code.
        seed: Seed of the weight initialisers. Defaults to 0.

    Returns:
        A `keras.Model` named `"autoencoder"` with two nested models,
        `get_layer("encoder")` (image -> feature map) and
        `get_layer("decoder")` (feature map -> image in 0..1).

    Raises:
        ValueError: If `filters` is empty or `image_size` is not divisible by
            `2 ** len(filters)`.

    Example:
        >>> autoencoder = build_autoencoder(64)
        >>> autoencoder.get_layer("encoder").output_shape
        (None, 8, 8, 128)
    """
    filters = tuple(int(value) for value in filters)
    if not filters or min(filters) < 1:
        raise ValueError(
            f"filters must be a non-empty tuple of positive ints. Received: filters={filters!r}"
        )
    factor = 2 ** len(filters)
    if not isinstance(image_size, (int, np.integer)) or image_size < factor or image_size % factor:
        raise ValueError(
            f"image_size must be a positive multiple of {factor} (the encoder halves it "
            f"{len(filters)} times), e.g. 64. Received: image_size={image_size!r}"
        )
    initializer = keras.initializers.HeNormal(seed=seed)

    image = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(image)
    for index, width in enumerate(filters):
        x = _conv_block(x, width, 2, f"block{index + 1}_down", initializer)
        x = _conv_block(x, width, 1, f"block{index + 1}_conv", initializer)
    encoder = keras.Model(image, x, name="encoder")

    code = keras.Input(shape=encoder.output_shape[1:], name="code")
    x = code
    for index, width in enumerate(reversed(filters)):
        x = keras.layers.Conv2DTranspose(
            width,
            3,
            strides=2,
            padding="same",
            kernel_initializer=initializer,
            name=f"up{index + 1}_transpose",
        )(x)
        x = keras.layers.ReLU(name=f"up{index + 1}_relu")(x)
    reconstruction = keras.layers.Conv2D(
        3,
        3,
        padding="same",
        activation="sigmoid",
        kernel_initializer=initializer,
        name="reconstruction",
    )(x)
    decoder = keras.Model(code, reconstruction, name="decoder")

    outputs = decoder(encoder(image))
    return keras.Model(image, outputs, name="autoencoder")


def pooled_encoder(encoder: keras.Model, name: str = "pooled_encoder") -> keras.Model:
    """The encoder followed by global average pooling: image -> feature vector.

    It shares the encoder's weights, so it can fill a feature cache
    (`tlkit.extract_features`) and the head trained there fits
    `encoder_classifier(..., head=head)`.

    Args:
        encoder: `autoencoder.get_layer("encoder")`.
        name: Model name. Defaults to `"pooled_encoder"`.

    Returns:
        A non-trainable view of the encoder, output shape `(batch, channels)`.
    """
    inputs = keras.Input(shape=encoder.input_shape[1:], name="image")
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(encoder(inputs, training=False))
    model = keras.Model(inputs, outputs, name=name)
    model.trainable = False
    return model


def encoder_classifier(
    encoder: keras.Model,
    num_classes: int,
    fine_tune: bool = False,
    dropout_rate: float = 0.2,
    learning_rate: float = 1e-3,
    head: keras.Model | None = None,
) -> keras.Model:
    """A classifier on a pretrained encoder, with the encoder frozen or fine-tuned.

    The classifier takes raw 0..255 RGB images of any size, resizes them to
    the encoder's input size, runs the encoder with `training=False` (its
    BatchNorm statistics stay as pretrained, as for `tlkit.build_classifier`),
    pools and classifies. The encoder is the same object as in the
    autoencoder, so its weights are shared, not copied: fine-tuning the
    classifier changes the autoencoder's encoder too.

    Args:
        encoder: `autoencoder.get_layer("encoder")`.
        num_classes: Number of classes, at least 2.
        fine_tune: Whether the encoder's weights train with the head.
            Defaults to False (frozen).
        dropout_rate: Dropout before the classifier. Defaults to 0.2.
        learning_rate: Adam learning rate. Defaults to 1e-3.
        head: A head from `tlkit.build_head(channels, num_classes)` to reuse,
            e.g. one trained on `pooled_encoder` features. Defaults to None.

    Returns:
        A compiled `keras.Model` (sparse categorical cross-entropy, accuracy).

    Raises:
        ValueError: On a bad `num_classes` or a head that does not fit.

    Example:
        >>> classifier = encoder_classifier(autoencoder.get_layer("encoder"), 5)
        >>> classifier.fit(few_labelled.to_dataset(64), epochs=20)
    """
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 2
    ):
        raise ValueError(
            f"num_classes must be an int of at least 2. Received: num_classes={num_classes!r}"
        )
    channels = encoder.output_shape[-1]
    if head is None:
        head = build_head(channels, int(num_classes), dropout_rate)
    elif head.input_shape[-1] != channels or head.output_shape[-1] != num_classes:
        raise ValueError(
            f"The head must map {channels} features to {num_classes} classes. "
            f"Received: head input {head.input_shape}, output {head.output_shape}"
        )
    encoder.trainable = bool(fine_tune)
    size = encoder.input_shape[1:3]
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = keras.layers.Resizing(*size, name="resize")(inputs)
    x = encoder(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = head(x)
    model = keras.Model(inputs, outputs, name="encoder_classifier")
    compile_classifier(model, learning_rate=learning_rate)
    return model


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def pretrain_autoencoder(
    data: Any,
    autoencoder: keras.Model | None = None,
    image_size: int = 64,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    validation_data: Any = None,
    seed: int = 0,
    callbacks=None,
    verbose: int | str = 0,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Trains an autoencoder to reconstruct unlabelled images (mean squared error).

    Labels, if any, are ignored: this is the unsupervised step.

    Args:
        data: The images: a `tlkit.data.ImageSplit`, a uint8 or float array
            `(N, H, W, 3)` with values in 0..255, or a `tf.data.Dataset` of
            image batches or `(images, labels)` batches.
        autoencoder: A model from `build_autoencoder`, or None to build one
            for `image_size`. Defaults to None.
        image_size: Size the images are resized to. Defaults to 64 (or the
            autoencoder's input size when one is given).
        epochs: Epochs. Defaults to 10.
        batch_size: Batch size (for splits and arrays). Defaults to 32.
        learning_rate: Adam learning rate. Defaults to 1e-3.
        validation_data: Images to report `val_loss` on, in any form `data`
            takes, or None. Defaults to None.
        seed: Shuffle and initialiser seed. Defaults to 0.
        callbacks: Keras callbacks. Defaults to None.
        verbose: Keras verbosity. Defaults to 0.

    Returns:
        `(autoencoder, history)`; history holds `loss` (and `val_loss`) per epoch.

    Raises:
        ValueError: On data of an unsupported type or shape, or epochs < 1.

    Example:
        >>> autoencoder, history = pretrain_autoencoder(flowers.train, epochs=5)
        >>> history["loss"][-1] < history["loss"][0]
        True
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive int. Received: epochs={epochs!r}")
    if autoencoder is None:
        autoencoder = build_autoencoder(image_size, seed=seed)
    size = autoencoder.input_shape[1]
    train = _reconstruction_dataset(data, size, batch_size, shuffle=True, seed=seed)
    validation = (
        _reconstruction_dataset(validation_data, size, batch_size, shuffle=False, seed=seed)
        if validation_data is not None
        else None
    )
    autoencoder.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    history = autoencoder.fit(
        train,
        validation_data=validation,
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # `train` is shuffled in its tf.data pipeline; Keras would warn.
        verbose=verbose,
    )
    return autoencoder, history.history


def load_images(split, image_size: int, batch_size: int = 128) -> np.ndarray:
    """Decodes a split's images once, resized, into a uint8 array.

    Small images fit in memory; decoding each JPEG once instead of every epoch
    is what makes several epochs of an autoencoder or a small CNN fast on a CPU.

    Args:
        split: A `tlkit.data.ImageSplit`.
        image_size: Square output size.
        batch_size: Images decoded per batch. Defaults to 128.

    Returns:
        A uint8 array `(len(split), image_size, image_size, 3)` (fewer rows if
        files fail to decode; those are listed in `split.report.skipped`).
    """
    batches = [
        np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)
        for images, _ in split.to_dataset(image_size, batch_size=batch_size, shuffle=False)
    ]
    if not batches:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.concatenate(batches)


# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


def _conv_block(x, width, strides, name, initializer):
    x = keras.layers.Conv2D(
        width,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer=initializer,
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _reconstruction_dataset(data, size, batch_size, shuffle, seed):
    """`(images in 0..255, images in 0..1)` batches from a split, an array or a dataset."""
    if isinstance(data, ImageSplit):
        dataset = data.to_dataset(size, batch_size=batch_size, shuffle=shuffle, seed=seed)
    elif isinstance(data, np.ndarray):
        if data.ndim != 4 or data.shape[-1] != 3:
            raise ValueError(
                "An image array must have shape (N, height, width, 3). "
                f"Received: data.shape={data.shape}"
            )
        dataset = tf.data.Dataset.from_tensor_slices(data)
        if shuffle:
            dataset = dataset.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size)
    elif isinstance(data, tf.data.Dataset):
        dataset = data
    else:
        raise ValueError(
            "data must be a tlkit.data.ImageSplit, a numpy array of images or a tf.data.Dataset. "
            f"Received: data={type(data).__name__}"
        )

    def to_pair(*element):
        images = tf.cast(element[0], tf.float32)  # Labels, if any, are dropped.
        if images.shape.rank != 4:
            raise ValueError(
                "The dataset must yield batches of images (batch, height, width, 3). "
                f"Received: element shape={images.shape}"
            )
        if tuple(images.shape[1:3]) != (size, size):
            images = tf.clip_by_value(
                tf.image.resize(images, (size, size), antialias=True), 0.0, 255.0
            )
        return images, images / 255.0

    return dataset.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
