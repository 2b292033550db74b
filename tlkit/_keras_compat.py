"""The only place that reads Keras internals (private attributes of Keras 3 objects).

Keras has no public API for these; each function here names the private
attribute it reads, and `tests/test_keras_compat.py` has a test per function
that fails loudly when a Keras release renames or removes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np


def flatten_layers(model: keras.Layer, include_self: bool = True) -> Iterator[keras.Layer]:
    """Every layer tracked by `model`, nested ones included (`Layer._flatten_layers`).

    Unlike `model.layers`, this also walks into nested models and layers, and it
    sees the layers a model cut from the middle of another model shares.

    Args:
        model: A Keras layer or model.
        include_self: Whether to yield `model` itself first. Defaults to True.

    Returns:
        An iterator of layers, each once.
    """
    return model._flatten_layers(include_self=include_self)


def seed_generators(layer: keras.Layer) -> list:
    """The `keras.random.SeedGenerator`s a layer draws from (`Layer._seed_generators`).

    Args:
        layer: A Keras layer.

    Returns:
        A list (empty for a layer without randomness).
    """
    return getattr(layer, "_seed_generators", None) or []


def compiled_trainable_state(model: keras.Model) -> dict | None:
    """Each layer's `trainable` flag as it was at the last `compile`, or None.

    Keras 3 snapshots it in `compile` (`Model._compiled_trainable_state`), and
    the train step keeps using that state until the model is recompiled.

    Args:
        model: A Keras model.

    Returns:
        A dict layer -> bool, or None for a model never compiled.
    """
    return getattr(model, "_compiled_trainable_state", None)


def optimizer_variables(optimizer) -> list:
    """The model variables a built optimizer updates (`Optimizer._trainable_variables`).

    Args:
        optimizer: A Keras optimizer.

    Returns:
        A list of variables (empty before the optimizer is built).
    """
    return list(getattr(optimizer, "_trainable_variables", []))


def inbound_nodes(layer: keras.Layer) -> list:
    """The calls of a layer in functional models (`Layer._inbound_nodes`).

    Each node's `arguments.kwargs` holds the keyword arguments of that call
    (e.g. `training=False`).

    Args:
        layer: A Keras layer or model.

    Returns:
        A list of `keras` nodes (empty for a layer never called functionally).
    """
    return list(getattr(layer, "_inbound_nodes", []))


def reseed_layers(model: keras.Layer, seed: int) -> None:
    """Sets the random state of every augmentation and dropout layer from `seed`.

    Keras layers draw from their own `SeedGenerator`, whose state is not saved
    with the model and which `keras.utils.set_random_seed` does not reset, so a
    resumed run would draw other random numbers than the uninterrupted one.
    Keras has no public call to reseed built layers; this sets the states.

    Args:
        model: The model; nested models are included.
        seed: The seed; layer `i` gets state `(seed + i, 0)`.
    """
    generators = [
        generator
        for layer in flatten_layers(model, include_self=True)
        for generator in seed_generators(layer)
    ]
    for index, generator in enumerate(generators):
        generator.state.assign(np.asarray([seed + index, 0], dtype=generator.state.dtype))
