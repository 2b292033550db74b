"""train_run's evaluation: from cached features without fine-tuning.

It equals the whole model on images.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image

import tlkit
from tlkit.data import ImageDataset, ImageSplit
from tlkit.training import predict_split

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 64


def _split(name, count, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    # Three colour families with noise: learnable, but not every image is easy.
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[labels]
    images = np.clip(colours[:, None, None, :] + rng.normal(0, 70, (count, SIZE, SIZE, 3)), 0, 255)
    return ImageSplit(name, ["red", "green", "blue"], labels, images=images.astype(np.uint8))


@pytest.mark.slow
def test_evaluation_from_cached_features_equals_the_model_on_images():
    dataset = ImageDataset(
        "colours",
        ["red", "green", "blue"],
        _split("train", 18, 0),
        _split("validation", 9, 1),
        _split("test", 12, 2),
    )
    config = tlkit.TrainConfig(backbone="mobilenet_v2", image_size=SIZE, epochs=2, backend="keras")
    result = tlkit.train_run(dataset, config, progress=False, log=lambda *_: None)
    assert result.metrics["evaluated_on"] == "test"
    assert result.metrics["evaluated_from"] == "cached features"

    probabilities, labels = predict_split(result.model, dataset.test, SIZE)
    np.testing.assert_array_equal(labels, dataset.test.labels)
    expected = tlkit.evaluation.classification_metrics(labels, probabilities, dataset.class_names)
    assert result.metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert result.metrics["accuracy"] == pytest.approx(expected["accuracy"])
    for key in ("log_loss", "roc_auc"):
        if key in expected:
            assert result.metrics[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        tlkit.TrainConfig(backend="tensorrt")


def test_a_dataset_that_is_not_one_is_a_clear_error():
    with pytest.raises(TypeError, match="must be a tlkit.data.ImageDataset.*Received: list"):
        tlkit.train_run([1, 2, 3], tlkit.TrainConfig(epochs=1), progress=False)


def test_a_folder_path_is_loaded_like_the_command_line(tmp_path):
    for channel, name in ((0, "red"), (2, "blue")):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for number in range(5):
            image = np.zeros((40, 40, 3), np.uint8)
            image[..., channel] = 200 + number
            Image.fromarray(image).save(folder / f"{number}.png")
    lines = []
    config = tlkit.TrainConfig(backbone="mobilenet_v2", image_size=32, epochs=1, backend="keras")
    result = tlkit.train_run(tmp_path / "images", config, progress=False, log=lines.append)
    assert result.metrics["class_names"] == ["blue", "red"]
    assert any(line.startswith("Data: folder") for line in lines), lines


def test_unknown_fine_tune_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="fine_tune_schedule must be one of"):
        tlkit.TrainConfig(fine_tune_schedule="linear")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_cosine_schedule_decays_the_fine_tuning_rate_to_zero_over_its_steps(schedule):
    dataset = ImageDataset(
        "colours", ["red", "green", "blue"], _split("train", 18, 0), _split("validation", 9, 1)
    )
    config = tlkit.TrainConfig(
        backbone="mobilenet_v2",
        image_size=SIZE,
        epochs=1,
        fine_tune_epochs=2,
        fine_tune_learning_rate=1e-4,
        fine_tune_schedule=schedule,
        backend="keras",
    )
    result = tlkit.train_run(dataset, config, progress=False, log=lambda *_: None)
    optimizer = result.model.optimizer
    assert int(optimizer.iterations) == 2  # 18 images, batch 32: one step per epoch
    final = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    assert final == pytest.approx(0.0 if schedule == "cosine" else 1e-4, abs=1e-9)
    assert result.metrics["config"]["fine_tune_schedule"] == schedule
