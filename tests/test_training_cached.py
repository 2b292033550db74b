"""train_run fine-tuning on cached activations (`fine_tune_on="activations"`)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import tlkit
from tlkit.data import ImageDataset, ImageSplit
from tlkit.models import find_base
from tlkit.training import predict_split

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 64


def _split(name, count, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[labels]
    images = np.clip(colours[:, None, None, :] + rng.normal(0, 70, (count, SIZE, SIZE, 3)), 0, 255)
    return ImageSplit(name, ["red", "green", "blue"], labels, images=images.astype(np.uint8))


@pytest.fixture(scope="module")
def colours():
    return ImageDataset(
        "colours",
        ["red", "green", "blue"],
        _split("train", 18, 0),
        _split("validation", 9, 1),
        _split("test", 12, 2),
    )


def _weights(model, layer_name):
    return [w.numpy().copy() for w in find_base(model).get_layer(layer_name).weights]


def test_fine_tuning_on_activations_changes_only_the_blocks_above_the_cut(colours, tmp_path):
    common = dict(backbone="mobilenet_v2", image_size=SIZE, epochs=2, backend="keras", seed=3)
    frozen = tlkit.train_run(colours, tlkit.TrainConfig(**common), progress=False, log=print)
    config = tlkit.TrainConfig(
        **common,
        fine_tune_epochs=2,
        fine_tune_on="activations",
        fine_tune_from="block16",
        fine_tune_learning_rate=1e-3,
        views=2,
        augmentation="natural",
    )
    lines = []
    result = tlkit.train_run(
        colours, config, out=tmp_path / "run", progress=False, log=lines.append
    )
    assert any("Activations entering block16" in line for line in lines)
    assert result.metrics["evaluated_from"] == "images"
    assert len(result.histories["fine_tune"]["loss"]) == 2
    assert "val_accuracy" in result.histories["fine_tune"]
    # Same seed and head: below the cut the weights are the pretrained ones, above they moved.
    for before, after in zip(
        _weights(frozen.model, "stem_conv"), _weights(result.model, "stem_conv"), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    convolutions = [
        layer.name
        for layer in find_base(result.model).layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    top = convolutions[-1]
    moved = [
        not np.allclose(before, after)
        for before, after in zip(
            _weights(frozen.model, top), _weights(result.model, top), strict=True
        )
    ]
    assert any(moved)
    # Metrics are the saved model's own, end to end on the test images.
    probabilities, labels = predict_split(result.model, colours.test, SIZE)
    expected = tlkit.evaluation.classification_metrics(labels, probabilities, colours.class_names)
    assert result.metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert (tmp_path / "run" / "model.keras").is_file()


def test_fine_tuning_on_activations_is_reproducible_after_a_resume(colours, tmp_path):
    config = tlkit.TrainConfig(
        backbone="mobilenet_v2",
        image_size=SIZE,
        epochs=1,
        backend="keras",
        fine_tune_epochs=1,
        fine_tune_on="activations",
        fine_tune_blocks=2,
        fine_tune_learning_rate=1e-3,
        deterministic=True,
    )
    whole = tlkit.train_run(colours, config, out=tmp_path / "whole", progress=False, log=print)
    # Interrupt after the head: drop the finished marker and the final files, as a kill would.
    state_path = tmp_path / "whole" / "checkpoints" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(complete=False, fine_tune_epochs_done=0)
    state_path.write_text(json.dumps(state))
    resumed = tlkit.train_run(
        colours, config, out=tmp_path / "whole", resume=True, progress=False, log=print
    )
    assert resumed.metrics["resumed"] is True
    np.testing.assert_allclose(
        resumed.histories["fine_tune"]["loss"], whole.histories["fine_tune"]["loss"], rtol=1e-5
    )


def test_bad_fine_tune_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="fine_tune_on must be one of"):
        tlkit.TrainConfig(fine_tune_on="pixels")
    with pytest.raises(ValueError, match="fine_tune_from must name a block"):
        tlkit.TrainConfig(
            backbone="mobilenet_v2", fine_tune_epochs=1, fine_tune_from="block99"
        ).validate()
