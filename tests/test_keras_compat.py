"""Each reader of Keras internals in tlkit._keras_compat, checked against the installed Keras.

The functions read private attributes with safe defaults (an empty list, None), so
a Keras release that renames one would make tlkit silently skip a check or a
reseeding. These tests fail instead: each asserts that the attribute is there
and holds what tlkit expects.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np

from tlkit import _keras_compat


def _nested_model():
    inner_inputs = keras.Input((4,))
    inner = keras.Model(
        inner_inputs,
        keras.layers.BatchNormalization(name="inner_bn")(
            keras.layers.Dense(3, name="inner_dense")(inner_inputs)
        ),
        name="inner",
    )
    inputs = keras.Input((4,))
    x = inner(inputs, training=False)
    x = keras.layers.Dropout(0.5, seed=1, name="dropout")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="outer"), inner


def test_every_function_has_a_test():
    functions = [
        name
        for name, value in inspect.getmembers(_keras_compat, inspect.isfunction)
        if value.__module__ == _keras_compat.__name__ and not name.startswith("_")
    ]
    assert functions, "tlkit._keras_compat defines no functions"
    missing = [name for name in functions if f"test_{name}" not in globals()]
    assert not missing, f"add a test for each Keras internal read: {missing}"


def test_flatten_layers():
    model, inner = _nested_model()
    names = [layer.name for layer in _keras_compat.flatten_layers(model, include_self=False)]
    assert {"inner", "inner_dense", "inner_bn", "dropout", "predictions"} <= set(names)
    assert "outer" not in names
    with_self = list(_keras_compat.flatten_layers(model, include_self=True))
    assert with_self[0] is model
    # A model cut from the middle of another sees the layers it shares (what
    # tlkit.fine_tuning.build_upper_classifier relies on).
    cut = keras.Model(inner.layers[1].output, inner.output)
    assert "inner_bn" in [layer.name for layer in _keras_compat.flatten_layers(cut)]


def test_seed_generators():
    model, _ = _nested_model()
    generators = _keras_compat.seed_generators(model.get_layer("dropout"))
    assert generators, "Keras no longer keeps Dropout's SeedGenerator in _seed_generators"
    assert all(isinstance(generator, keras.random.SeedGenerator) for generator in generators)
    assert _keras_compat.seed_generators(model.get_layer("predictions")) == []
    # tlkit.training.reseed_layers assigns the state: it must be a 2-element variable.
    state = generators[0].state
    state.assign(np.asarray([7, 0], dtype=state.dtype))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(state), [7, 0])


def test_reseed_layers():
    augmentation = keras.Sequential([keras.layers.RandomTranslation(0.3, 0.3, seed=1)])
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    _keras_compat.reseed_layers(augmentation, 5)
    first = keras.ops.convert_to_numpy(augmentation(images, training=True))
    second = keras.ops.convert_to_numpy(augmentation(images, training=True))
    assert not np.allclose(first, second), "the layer drew the same numbers twice"
    _keras_compat.reseed_layers(augmentation, 5)
    again = keras.ops.convert_to_numpy(augmentation(images, training=True))
    np.testing.assert_allclose(again, first)


def test_compiled_trainable_state():
    model, inner = _nested_model()
    assert _keras_compat.compiled_trainable_state(model) is None
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    snapshot = _keras_compat.compiled_trainable_state(model)
    assert snapshot is not None, "Keras no longer records _compiled_trainable_state"
    assert snapshot[model.get_layer("predictions")] is True
    inner.trainable = False
    assert snapshot[inner] is True  # The snapshot keeps the state at compile time.


def test_optimizer_variables():
    model, _ = _nested_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert _keras_compat.optimizer_variables(model.optimizer) == []
    model.fit(np.zeros((4, 4), "float32"), np.zeros(4, "int32"), epochs=1, verbose=0)
    known = {id(variable) for variable in _keras_compat.optimizer_variables(model.optimizer)}
    assert known, "Keras no longer keeps the optimizer's variables in _trainable_variables"
    assert known == {id(variable) for variable in model.trainable_variables}


def test_inbound_nodes():
    model, inner = _nested_model()
    nodes = _keras_compat.inbound_nodes(inner)
    assert nodes, "Keras no longer records a layer's calls in _inbound_nodes"
    assert any(node.arguments.kwargs.get("training") is False for node in nodes)
    assert _keras_compat.inbound_nodes(keras.layers.Dense(2)) == []
