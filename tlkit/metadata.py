"""One way to carry metadata inside a saved model: an identity layer with a config.

A `.keras` file keeps every layer's `get_config()`, so an identity layer at
the model's output is a safe place for what a model needs to be used after
loading (its class names, a detector's anchor settings). Classifiers
(`tlkit.models.ClassNames`) and detectors (`tlkit.detect.DetectionOutput`)
both subclass `ModelMetadata`, so `find_metadata` and
`tlkit.models.get_class_names` read either. Loading stays `safe_mode=True`:
the layers are registered Keras classes, no code is stored.
"""

from __future__ import annotations

import keras


class ModelMetadata(keras.layers.Layer):
    """An identity layer whose config carries a model's metadata (base class).

    Subclasses add their own fields to `get_config` and register themselves
    with `keras.saving.register_keras_serializable(package="tlkit")`.

    Args:
        class_names: The class names, in label order.
        **kwargs: Passed to `keras.layers.Layer`.
    """

    def __init__(self, class_names, **kwargs):
        super().__init__(**kwargs)
        self.class_names = [str(name) for name in class_names]

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "class_names": list(self.class_names)}


def find_metadata(model: keras.Model) -> ModelMetadata | None:
    """The `ModelMetadata` layer of a tlkit model, or None if it has none.

    Args:
        model: A classifier, a detector or any Keras model.

    Returns:
        The first `ModelMetadata` layer among the model's own layers, or None.
    """
    for layer in model.layers:
        if isinstance(layer, ModelMetadata):
            return layer
    return None
